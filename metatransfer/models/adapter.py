"""Input adapter for heterogeneous transfer: a target's channels and size -> the backbone's.

A target prepared at its own shape (`prepare.per_dataset`) reaches a backbone
meta-trained on another channel count or resolution:

- **Channels:** `InputAdapter`, a learned 1x1 convolution from the target's
  channels to the backbone's, trained during target fine-tuning. It starts as
  the fixed conversion `prepare` applies (`identity_weights`): grey -> RGB
  copies the grey value to the three channels, RGB -> grey takes the ITU-R 601
  luma 0.299 R + 0.587 G + 0.114 B, equal counts start as the identity. So
  before the first step the adapted model sees what today's conversion gives.
  An unlabelled target (`finetune.unlabeled`, metatransfer/training/unsupervised.py)
  has no label to fit it with: its cluster model keeps this fixed conversion,
  and only its self-training steps (on confident pseudo-labels) train it.
- **Size:** convolutions do not depend on the image size. ResNet-12 and
  ResNet-18 end in a global average, so any size >= 16 gives the same
  `out_dim`. Conv-4 flattens its last map, whose side depends on the input
  size: `pooled_features` averages the map adaptively
  (`adaptive_avg_pool2d`) to the side it has at the backbone's own size, so
  the feature size, and the head over it, stay `out_dim`.

`convert_images` is the same fixed conversion on float images plus
`prepare`'s resizing (area when shrinking, antialiased bilinear when
enlarging): evaluation uses it to feed a target's episodes to learners that
have no adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights `prepare` converts RGB to grey with


def identity_weights(in_channels: int, out_channels: int) -> torch.Tensor:
    """The 1x1 convolution weights (out, in, 1, 1) of the fixed channel conversion.

    Args:
        in_channels: the target's channels (1 or 3).
        out_channels: the backbone's channels (1 or 3).

    Returns:
        Ones (grey -> RGB: a copy to every channel), the luma weights (RGB -> grey)
        or the identity (equal counts).

    Raises:
        ValueError: a pair other than 1/3 -> 1/3 (prepare stores only grey or RGB).
    """
    if in_channels == out_channels:
        return torch.eye(in_channels).view(in_channels, in_channels, 1, 1)
    if (in_channels, out_channels) == (1, 3):
        return torch.ones(3, 1, 1, 1)
    if (in_channels, out_channels) == (3, 1):
        return torch.tensor(LUMA).view(1, 3, 1, 1)
    raise ValueError(f"input adapter: channels must be 1 or 3 (grey or RGB), found {in_channels} -> {out_channels}")


class InputAdapter(nn.Module):
    """A learned 1x1 convolution from the target's channels to the backbone's.

    Args:
        in_channels: the target images' channels.
        out_channels: the backbone's input channels.

    At initialisation the weights are `identity_weights` and the bias zero, so
    `adapter(x)` is the fixed conversion of `x` (float images in [0, 1]).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(identity_weights(in_channels, out_channels))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.conv(x)


def flattens_map(backbone: nn.Module) -> bool:
    """True when the backbone's features are its flattened last map (Conv-4), so their size depends on the input size.

    A global-average backbone (ResNet-12/18) has `out_dim == feature_shape[0]`;
    a flattening one has `out_dim == prod(feature_shape)` (both hold for a 1x1
    map, where pooling to 1x1 and flattening is the global average too).
    """
    c, h, w = backbone.feature_shape
    return int(backbone.out_dim) == c * h * w


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features (B, out_dim) of images of any size >= 16: the map averaged adaptively to the backbone's own side.

    Args:
        backbone: a backbone of metatransfer.models (`feature_map`, `feature_shape`, `out_dim`).
        x: images (B, C, H, W) with the backbone's channels.
    """
    if not flattens_map(backbone):
        return backbone(x)  # a global average: any size gives out_dim features
    side = tuple(backbone.feature_shape[1:])
    return F.adaptive_avg_pool2d(backbone.feature_map(x), side).flatten(1)


def convert_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """The fixed conversion of float images to `channels` x `size`², as `prepare` does on uint8 (without rounding).

    Args:
        x: float images (B, C, H, W) in [0, 1], C 1 or 3.
        channels: 1 or 3.
        size: the output side.

    Returns:
        float32 (B, channels, size, size); `x` itself when the shape already fits.
    """
    _, c, h, w = x.shape
    if c != channels:
        x = F.conv2d(x, identity_weights(c, channels).to(x))
    if (h, w) != (size, size):
        if h >= size and w >= size:
            x = F.interpolate(x, size=(size, size), mode="area")
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x
