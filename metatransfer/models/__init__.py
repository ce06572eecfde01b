"""Backbones: feature extractors mapping images (B, C, H, W) to features (B, out_dim).

Every backbone exposes `out_dim` (flattened feature size), `feature_shape`
(the un-flattened map's (channels, h, w)) and `feature_map(x)`, and works for
square images of 16 px (28 for the deep ones to keep a spatial map) up to
224 px with 1 or 3 channels:

- conv4: four [conv3x3, BN, ReLU, max-pool 2] blocks, flattened: out_dim =
  hidden * (size // 16)^2 (64 at 28 px, 1600 at 84 px).
- resnet12: four residual blocks (64, 160, 320, 640), global average: 640.
- resnet18: torchvision's layout (ImageNet weights load directly), global
  average: 512; `stem` picks the ImageNet or the small-image stem.

External weights: `load_pretrained(backbone, path, sha256, root)` or
`build_backbone(spec, pretrained=PretrainedWeights(path, sha256), root=...)`.
docs/models.md has the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from metatransfer.errors import ConfigError
from metatransfer.models.conv4 import Conv4
from metatransfer.models.pretrained import (
    PretrainedWeights,
    PretrainedWeightsError,
    load_pretrained,
    sha256_file,
)
from metatransfer.models.resnet18 import STEMS

__all__ = [
    "BACKBONES",
    "STEMS",
    "BackboneSpec",
    "PretrainedWeights",
    "PretrainedWeightsError",
    "build_backbone",
    "load_pretrained",
    "sha256_file",
]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is built from (the `model` section of params.yaml).

    Only the architecture: saved models store this (asdict) and rebuild from
    it, so it names no file. Pre-trained weights are applied separately
    (`build_backbone(..., pretrained=...)` or `load_pretrained`).

    Attributes:
        stem: resnet18 only: "auto", "imagenet" or "small" (models/resnet18.py).
    """

    name: str = "conv4"
    in_channels: int = 1
    image_size: int = 28
    hidden: int = 64
    stem: str = "auto"


def _common_args(spec: BackboneSpec, track_running_stats: bool) -> dict:
    """The constructor arguments every backbone takes."""
    return {"in_channels": spec.in_channels, "image_size": spec.image_size, "track_running_stats": track_running_stats}


def _build_resnet12(spec: BackboneSpec, track_running_stats: bool) -> nn.Module:
    from metatransfer.models.resnet12 import ResNet12

    return ResNet12(**_common_args(spec, track_running_stats))


def _build_resnet18(spec: BackboneSpec, track_running_stats: bool) -> nn.Module:
    from metatransfer.models.resnet18 import ResNet18

    return ResNet18(stem=spec.stem, **_common_args(spec, track_running_stats))


def _build_conv4(spec: BackboneSpec, track_running_stats: bool) -> nn.Module:
    return Conv4(hidden=spec.hidden, **_common_args(spec, track_running_stats))


BACKBONES = {"conv4": _build_conv4, "resnet12": _build_resnet12, "resnet18": _build_resnet18}


def build_backbone(
    spec: BackboneSpec,
    track_running_stats: bool = True,
    pretrained: PretrainedWeights | tuple[str, str] | None = None,
    root: str | Path | None = None,
) -> nn.Module:
    """Build the backbone named by `spec.name`, optionally from external weights.

    Args:
        spec: the architecture.
        track_running_stats: False for per-batch BatchNorm statistics (MAML family).
        pretrained: (path, sha256) of a safetensors file to initialise from
            (see `load_pretrained`); None keeps the random initialisation.
        root: the project root that a relative `pretrained` path is relative to.

    Raises:
        ConfigError: unknown name (the message lists the valid ones), a bad
            stem; PretrainedWeightsError for a weights file that is missing,
            altered or does not fit.
    """
    try:
        factory = BACKBONES[spec.name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown backbone {spec.name!r}; valid: {sorted(BACKBONES)}"
        ) from None
    if spec.stem not in STEMS:
        raise ConfigError(f"model.stem: expected one of {list(STEMS)}, found {spec.stem!r}")
    backbone = factory(spec, track_running_stats)
    if pretrained is not None:
        if not isinstance(pretrained, PretrainedWeights):
            pretrained = PretrainedWeights(*pretrained)
        load_pretrained(backbone, pretrained.path, pretrained.sha256, root)
    return backbone
