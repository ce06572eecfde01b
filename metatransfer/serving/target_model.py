"""MLflow pyfunc model (models-from-code) serving a fine-tuned target model.

Input: float32 images (batch, C, H, W) in [0, 1]. Output: one row per image with
`prediction` (class index), `label` (the full class name, `<dataset>/<class>`),
`class_name` (the name a person reads, e.g. "glioma"), `probabilities` (class
name -> probability, every class) and `prob_<i>` per class index (the fields
clients had before class names were added, unchanged).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class TargetModelPyfunc(PythonModel):
    """Loads the safetensors folder under the `model` artifact through the library."""

    def load_context(self, context: Any) -> None:
        from metatransfer.training.finetune import load_target_model

        from metatransfer.classnames import display_names

        self.model = load_target_model(context.artifacts["model"])
        spec = self.model.backbone_spec
        self.channels, self.size = spec.in_channels, spec.image_size
        self.class_names = display_names(self.model.class_names)

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads type hints as a schema
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


mlflow.models.set_model(TargetModelPyfunc())
