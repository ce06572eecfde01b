"""ResNet-18 in torchvision's parameter layout, without the classifier.

He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition",
CVPR 2016, https://arxiv.org/abs/1512.03385. The module tree mirrors
`torchvision.models.resnet18` (conv1, bn1, layer1..layer4 of two BasicBlocks,
`layerN.0.downsample.{0,1}` in layers 2-4) so its `state_dict()` has exactly
torchvision's keys minus `fc.weight`/`fc.bias`: ImageNet weights converted to
safetensors load with `metatransfer.models.load_pretrained` as they are
(docs/models.md shows the conversion). Features are the global average of
layer4's map: 512-d whatever the image size.

Stems (`model.stem`):
- "imagenet": torchvision's conv1 7x7 stride 2 + 3x3 max-pool stride 2
  (/4 before layer1; 224 → 56 → 7 at layer4).
- "small": the same conv1 (7x7, 64 filters: every key keeps its shape, so
  ImageNet weights still load) at stride 1, and no max-pool. What changes is
  only the computation: layer1 runs at the full input resolution, so 28-32 px
  images still end in a 4x4 layer4 map instead of 1x1. The compute grows 16x
  per pixel against "imagenet" at the same input size (32 px "small" costs
  about a third of 224 px "imagenet").
- "auto" (default): "small" below 64 px, "imagenet" from 64 px up.

Input: float images in [0, 1]. torchvision's weights were trained on inputs
standardised with ImageNet's channel means and standard deviations, so the
module applies that standardisation itself (constant, non-persistent buffers:
not in the state dict, not trained). One-channel images use the average of the
three means (0.449) and standard deviations (0.226). With conv1 summed over
RGB (see `load_pretrained`) this approximates feeding the grey image
replicated to RGB: the difference is a constant offset per conv1 filter (from
the spread of the three means) and a scale within 2 % (the three standard
deviations); the BatchNorm after conv1 absorbs both once it is fine-tuned.

BatchNorm honours `track_running_stats` like Conv4 and ResNet12: False (the
MAML family) normalises with each batch's statistics and drops the
running_mean / running_var / num_batches_tracked buffers from the state dict.
ReLUs are not in-place, so second-order gradients through
`torch.func.functional_call` stay valid.
"""

from __future__ import annotations

import torch
from torch import nn

STEMS = ("auto", "imagenet", "small")
SMALL_STEM_BELOW = 64  # "auto" picks the small stem below this image size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_CHANNELS = (64, 128, 256, 512)


def resolve_stem(stem: str, image_size: int) -> str:
    """Return "imagenet" or "small" for `stem` ("auto" decides by image size).

    Raises:
        ValueError: an unknown stem name.
    """
    if stem not in STEMS:
        raise ValueError(f"model.stem: expected one of {list(STEMS)}, found {stem!r}")
    if stem == "auto":
        return "small" if image_size < SMALL_STEM_BELOW else "imagenet"
    return stem


def _halve(side: int) -> int:
    """Output side of a stride-2 op with torchvision's padding (3x3/p1, 7x7/p3, pool 3/p1): ceil(side / 2)."""
    return (side - 1) // 2 + 1


def init_resnet_weights(model: nn.Module, nonlinearity: str = "relu", a: float = 0.0) -> None:
    """The usual ResNet initialisation (torchvision's): Kaiming-normal (fan_out) convs, BatchNorm at identity.

    Args:
        model: every Conv2d and BatchNorm2d in it is initialised, in `modules()` order.
        nonlinearity, a: passed to `nn.init.kaiming_normal_` ("leaky_relu" with its slope `a` for ResNet-12).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + identity or 1x1 downsample, ReLU.

    Args:
        in_channels: channels of the input map.
        out_channels: channels of both convolutions.
        stride: stride of the first convolution (and of the downsample).
        track_running_stats: passed to every BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, track_running_stats: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in, H, W) to (B, out, H / stride, W / stride) (rounded up)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 feature extractor: images (B, C, H, W) in [0, 1] → features (B, 512).

    Same interface as Conv4 and ResNet12: `out_dim`, `feature_shape`,
    `feature_map(x)`.

    Args:
        in_channels: image channels (1 or 3).
        image_size: input height = width; fixes `feature_shape`.
        stem: "auto", "imagenet" or "small" (module docstring).
        track_running_stats: False makes BatchNorm use per-batch statistics
            (the MAML family); True keeps running averages.

    Raises:
        ValueError: unknown stem, in_channels not 1 or 3, image_size < 1.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        stem: str = "auto",
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"ResNet18 needs in_channels 1 or 3; got in_channels={in_channels}")
        if image_size < 1:
            raise ValueError(f"ResNet18 needs image_size >= 1; got image_size={image_size}")
        self.stem = resolve_stem(stem, image_size)
        stride = 2 if self.stem == "imagenet" else 1
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=track_running_stats)
        self.relu = nn.ReLU(inplace=False)
        # Identity keeps the attribute (torchvision's has no parameters either): same keys.
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if self.stem == "imagenet" else nn.Identity()
        )
        previous = 64
        for i, channels in enumerate(LAYER_CHANNELS):
            first_stride = 1 if i == 0 else 2
            layer = nn.Sequential(
                BasicBlock(previous, channels, first_stride, track_running_stats),
                BasicBlock(channels, channels, 1, track_running_stats),
            )
            self.add_module(f"layer{i + 1}", layer)
            previous = channels

        if in_channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

        side = image_size
        for _ in range(2 if self.stem == "imagenet" else 0):  # conv1 stride 2, max-pool
            side = _halve(side)
        for _ in range(3):  # layer2..layer4 each start with stride 2
            side = _halve(side)
        self.out_dim = LAYER_CHANNELS[-1]
        self.feature_shape = (LAYER_CHANNELS[-1], side, side)
        init_resnet_weights(self)  # torchvision's initialisation

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return layer4's map (B, *feature_shape), used by Relation Networks."""
        x = (x - self.input_mean) / self.input_std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return features (B, 512): the global average of layer4's map."""
        return self.feature_map(x).mean(dim=(2, 3))
