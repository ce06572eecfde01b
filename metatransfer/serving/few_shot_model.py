"""MLflow pyfunc loader of a meta-learner that adapts on each request (the artifact holds no code).

Loaded like `target_model`: MLmodel names this installed module as its
`loader_module`; `_load_pyfunc` verifies the model folder before reading the
safetensors weights.

Input (named tensors): `support_x` float32 (S, C, H, W) in [0, 1],
`support_y` int64 (S,) labels 0..N-1, `query_x` float32 (Q, C, H, W).
Optional `description`: the task's description as free text (an inference
param `params={"description": ...}`, or a named input holding one string),
read by learners conditioned on it (`conditional`); others ignore it, and
without it they use their "no description" token.
Output: a table with `prediction` per query and `prob_<i>` for i < N.
New classes need no retraining: the support set defines them, so the answers
are the support set's labels as given (the client keeps its own label -> name
table); the model has no class names of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


class FewShotPredictor:
    """A meta-learner (safetensors) that runs its `adapt` per request."""

    def __init__(self, folder: str | Path) -> None:
        from metatransfer.artifacts import load_learner

        self.learner = load_learner(folder)
        spec = self.learner.backbone_spec
        self.channels, self.size = spec.in_channels, spec.image_size

    def predict(self, model_input, params=None):  # untyped: MLflow reads type hints as a schema
        """Adapt on the request's support set and classify its queries."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from metatransfer.serving.inputs import InputError, as_images, as_labels

        try:
            if not isinstance(model_input, dict):
                raise InputError("expected named inputs support_x, support_y, query_x")
            missing = [k for k in ("support_x", "support_y", "query_x") if k not in model_input]
            if missing:
                raise InputError(f"missing input(s) {missing}; expected support_x, support_y, query_x")
            sx = as_images(model_input["support_x"], "support_x", self.channels, self.size)
            sy, n_way = as_labels(model_input["support_y"], "support_y", len(sx))
            qx = as_images(model_input["query_x"], "query_x", self.channels, self.size)
            # MLflow passes the signature's default ("") when a request has no param: then the input may hold it.
            description = _description((params or {}).get("description") or model_input.get("description"))
        except InputError as exc:
            # The scoring server returns an MlflowException's message with a 400.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        set_description = getattr(self.learner, "set_description", None)
        if callable(set_description):  # per request: a request without one gets "no description"
            set_description({"text": description} if description else None)
        torch.manual_seed(0)  # learners with random heads answer the same request the same way
        predictor = self.learner.adapt(sx, sy, n_way, unlabeled_x=qx if self.learner.transductive else None)
        with torch.no_grad():
            probs = torch.softmax(predictor(qx), dim=1).numpy().astype(np.float64)
        out = pd.DataFrame({"prediction": probs.argmax(1).astype(np.int64)})
        for i in range(probs.shape[1]):
            out[f"prob_{i}"] = probs[:, i]
        return out


def _description(value: Any) -> str:
    """The request's optional description as text ("" when absent).

    Raises:
        InputError: anything but a string or an array/list holding exactly one string.
    """
    from metatransfer.serving.inputs import InputError

    if value is None:
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value, dtype=object).ravel())
        if len(items) != 1:
            raise InputError(f"description: expected one string, found {len(items)} items")
        value = items[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise InputError(f"description: expected a string, found {type(value).__name__}")
    return value


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> FewShotPredictor:
    """MLflow's loader entry point: verify the model folder, then load the learner.

    Raises:
        ArtifactError: see `target_model._load_pyfunc`.
    """
    from metatransfer.artifacts import check_model_folder

    check_model_folder(data_path)
    return FewShotPredictor(data_path)
