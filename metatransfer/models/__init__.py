"""Backbones: feature extractors mapping images (B, C, H, W) to features (B, out_dim).

Every backbone exposes `out_dim` (flattened feature size), `feature_shape`
(the un-flattened map's (channels, h, w)) and `feature_map(x)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from metatransfer.errors import ConfigError
from metatransfer.models.conv4 import Conv4


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is built from (the `model` section of params.yaml)."""

    name: str = "conv4"
    in_channels: int = 1
    image_size: int = 28
    hidden: int = 64


def _build_resnet12(spec: BackboneSpec, track_running_stats: bool) -> nn.Module:
    from metatransfer.models.resnet12 import ResNet12

    return ResNet12(
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        track_running_stats=track_running_stats,
    )


def _build_conv4(spec: BackboneSpec, track_running_stats: bool) -> nn.Module:
    return Conv4(
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        hidden=spec.hidden,
        track_running_stats=track_running_stats,
    )


BACKBONES = {"conv4": _build_conv4, "resnet12": _build_resnet12}


def build_backbone(spec: BackboneSpec, track_running_stats: bool = True) -> nn.Module:
    """Build the backbone named by `spec.name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    try:
        factory = BACKBONES[spec.name]
    except KeyError:
        raise ConfigError(
            f"model.name: unknown backbone {spec.name!r}; valid: {sorted(BACKBONES)}"
        ) from None
    return factory(spec, track_running_stats)
