"""MLflow pyfunc loader of a fine-tuned target model: the artifact holds data, never code.

The logged model's MLmodel names this installed module as its `loader_module`
and its `data` is the safetensors folder (`data/<method>/`). MLflow imports
this module from the installed package and calls `_load_pyfunc(data_path)`,
which verifies the whole model folder first (`artifacts.check_model_folder`:
this loader, no code paths, no Python file that differs from the installed
serving modules, no pickle) and only then reads the weights, checksums
verified. So neither `mlflow.pyfunc.load_model` nor `mlflow models serve`
imports or unpickles anything stored in the artifact.

Input: float32 images (batch, C, H, W) in [0, 1], at the target's shape (the
backbone's, or the target's own channels and size for a model with an input
adapter: config.json `input`). Output: one row per image with
`prediction` (class index), `label` (the full class name, `<dataset>/<class>`),
`class_name` (the name a person reads, e.g. "glioma"), `probabilities` (class
name -> probability, every class) and `prob_<i>` per class index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch


class TargetModelPredictor:
    """A target model loaded from its safetensors folder, answering pyfunc `predict` calls."""

    def __init__(self, folder: str | Path) -> None:
        from metatransfer.classnames import display_names
        from metatransfer.training.finetune import load_target_model

        self.model = load_target_model(folder)
        # The target's own shape (a heterogeneous target model has an input adapter), else the backbone's.
        self.channels, self.size = self.model.input_channels, self.model.input_size
        self.class_names = display_names(self.model.class_names)

    def predict(self, model_input, params=None):  # untyped: MLflow reads type hints as a schema
        """Class predictions and probabilities of a batch of images (see the module docstring)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from metatransfer.serving.inputs import InputError, as_images

        if isinstance(model_input, dict):
            model_input = model_input.get("images", next(iter(model_input.values())))
        try:
            x = as_images(model_input, "images", self.channels, self.size)
        except InputError as exc:
            # The scoring server returns an MlflowException's message with a 400;
            # anything else becomes a generic "unexpected error".
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1).numpy().astype(np.float64)
        pred = probs.argmax(1)
        out = pd.DataFrame({"prediction": pred.astype(np.int64),
                            "label": [self.model.class_names[i] for i in pred],
                            "class_name": [self.class_names[i] for i in pred],
                            "probabilities": [dict(zip(self.class_names, map(float, row))) for row in probs]})
        for i in range(probs.shape[1]):
            out[f"prob_{i}"] = probs[:, i]
        return out


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> TargetModelPredictor:
    """MLflow's loader entry point: verify the model folder, then load the weights.

    Args:
        data_path: the model's `data` folder (a safetensors target-model folder),
            inside the MLflow model folder that holds MLmodel.
        model_config: unused (MLflow passes it when the model has one).

    Raises:
        ArtifactError: the model folder holds code or pickles, names another
            loader, or its weights fail their checksums.
    """
    from metatransfer.artifacts import check_model_folder

    check_model_folder(data_path)
    return TargetModelPredictor(data_path)
