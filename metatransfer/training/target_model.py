"""The model shipped for a target: [input adapter +] the meta-learned backbone φ + a linear head.

`TargetModel` is what `metatransfer.training.finetune` builds and trains, the
`finetune` stage saves (`save_target_model`: safetensors + config +
checksums) and evaluation, the MLflow registry and serving load
(`load_target_model`). A target stored at its own channels or size
(`prepare.per_dataset`, heterogeneous transfer) gets a learned 1x1 input
adapter in front of φ (metatransfer/models/adapter.py); the saved config
records that input shape, and the model is served at it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metatransfer.artifacts import load_state, save_state
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec, build_backbone
from metatransfer.models.adapter import InputAdapter, pooled_features


class TargetModel(nn.Module):
    """[Input adapter +] backbone + linear head over the target classes: images → logits.

    Args:
        backbone: the backbone spec (same as the learner's).
        class_names: the target's class names, in label order.
        source_algorithm: which learner's φ initialised it (provenance).
        input_shape: (channels, image_size) of the target's images when they
            differ from the backbone's (heterogeneous transfer): other channels
            go through a learned 1x1 `InputAdapter`, another size through the
            backbone's pooling (metatransfer/models/adapter.py). None, or the
            backbone's own shape: no adapter, and the saved files are those of
            a model without the argument.
    """

    def __init__(self, backbone: BackboneSpec, class_names: list[str], source_algorithm: str,
                 input_shape: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.backbone_spec = backbone
        self.class_names = list(class_names)
        self.source_algorithm = source_algorithm
        self.backbone = build_backbone(backbone, track_running_stats=True)
        self.head = nn.Linear(self.backbone.out_dim, len(class_names))
        if input_shape is not None and tuple(input_shape) == (backbone.in_channels, backbone.image_size):
            input_shape = None
        self.input_shape = None if input_shape is None else (int(input_shape[0]), int(input_shape[1]))
        self.adapter: InputAdapter | None = None
        if self.input_shape is not None and self.input_shape[0] != backbone.in_channels:
            self.adapter = InputAdapter(self.input_shape[0], backbone.in_channels)

    @property
    def input_channels(self) -> int:
        """Channels of the images this model takes (the target's)."""
        return self.backbone_spec.in_channels if self.input_shape is None else self.input_shape[0]

    @property
    def input_size(self) -> int:
        """Side of the images this model takes (the target's)."""
        return self.backbone_spec.image_size if self.input_shape is None else self.input_shape[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, out_dim) of float images (B, C, H, W) at the model's input shape."""
        if self.input_shape is None:
            return self.backbone(x)
        if self.adapter is not None:
            x = self.adapter(x)
        return pooled_features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) for float images (B, C, H, W) in [0, 1]."""
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        """What `load_target_model` needs to rebuild this module."""
        config: dict[str, Any] = {
            "kind": "target_model",
            "backbone": asdict(self.backbone_spec),
            "class_names": self.class_names,
            "source_algorithm": self.source_algorithm,
        }
        if self.input_shape is not None:  # only then: a homogeneous model's config.json is unchanged
            config["input"] = {"channels": self.input_shape[0], "image_size": self.input_shape[1]}
        return config


def save_target_model(model: TargetModel, folder: str | Path, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Save weights (safetensors) + config + checksums atomically."""
    config = model.config()
    if extra:
        config["extra"] = extra
    return save_state(model.state_dict(), config, folder)


def load_target_model(folder: str | Path, expected_sha256: str | None = None) -> TargetModel:
    """Rebuild a TargetModel saved by `save_target_model` (checksums verified), in eval mode.

    Args:
        folder: the model folder.
        expected_sha256: optional SHA-256 of the weights recorded at training time
            (selection.json / the MLflow run); a different file is refused.

    Raises:
        ArtifactError: missing, altered or unsafe (e.g. pickled) files.
        ConfigError: the folder holds another kind of model.
    """
    state, config = load_state(folder, expected_sha256)
    if config.get("kind") != "target_model":
        raise ConfigError(f"{folder}: not a target model (config kind {config.get('kind')!r})")
    given = config.get("input")  # heterogeneous transfer: the target's own channels and size
    model = TargetModel(BackboneSpec(**config["backbone"]), config["class_names"], config["source_algorithm"],
                        input_shape=None if given is None else (int(given["channels"]), int(given["image_size"])))
    model.load_state_dict(state)
    model.eval()
    return model
