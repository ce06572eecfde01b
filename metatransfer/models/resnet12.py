"""ResNet-12, the deeper backbone of the few-shot literature.

As in TADAM (Oreshkin 2018), MetaOptNet (Lee 2019) and RFS (Tian 2020): four
residual blocks with (64, 160, 320, 640) channels; each block is three
[3x3 conv, BatchNorm, LeakyReLU(0.1)] layers (the last activation after the
residual sum) with a 1x1 conv + BatchNorm shortcut, then a 2x2 max-pool.
Features are the global average of the last map, so `out_dim` is the last
block's channel count whatever the image size. At 28x28 input the spatial
size goes 28→14→7→3→1; at 84x84, 84→42→21→10→5.

Not included: DropBlock regularisation (MetaOptNet/RFS use it at 84x84 on
miniImageNet; at 28x28 the last maps are 3x3 and 1x1, too small for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metatransfer.models.resnet18 import init_resnet_weights

N_BLOCKS = 4
LEAK = 0.1


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ResBlock(nn.Module):
    """One ResNet-12 block: 3x [conv3x3, BN, LeakyReLU] + 1x1 shortcut, then max-pool 2x2.

    Args:
        in_channels: channels of the input map.
        out_channels: channels of every conv in the block.
        track_running_stats: passed to every BatchNorm (see ResNet12).
    """

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool) -> None:
        super().__init__()

        def bn() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats)

        self.conv1, self.bn1 = _conv3x3(in_channels, out_channels), bn()
        self.conv2, self.bn2 = _conv3x3(out_channels, out_channels), bn()
        self.conv3, self.bn3 = _conv3x3(out_channels, out_channels), bn()
        self.act = nn.LeakyReLU(LEAK)
        # The shortcut always needs a 1x1 projection: channels change in every block.
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), bn()
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in, H, W) to (B, out, H // 2, W // 2)."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """ResNet-12 feature extractor: images (B, C, H, W) → features (B, out_dim).

    Same interface as Conv4: `out_dim`, `feature_shape` and `feature_map(x)`.

    Args:
        in_channels: image channels (1 for grey, 3 for colour).
        image_size: input height = width; fixes `feature_shape` (>= 16 for
            four 2x2 pools).
        track_running_stats: False makes BatchNorm always use the statistics of
            the batch it sees (per-episode statistics, as MAML-style methods
            do); True keeps running averages.
        channels: the four blocks' channel counts.

    Raises:
        ValueError: image_size below 16, or channels not four positive ints.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        track_running_stats: bool = True,
        channels: Sequence[int] = (64, 160, 320, 640),
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) != N_BLOCKS or any(int(c) != c or c < 1 for c in channels):
            raise ValueError(
                f"ResNet12 needs {N_BLOCKS} positive channel counts; got channels={channels}"
            )
        side = image_size
        for _ in range(N_BLOCKS):
            side //= 2
        if side < 1:
            raise ValueError(
                f"ResNet12 needs image_size >= 16 (four 2x2 pools); got image_size={image_size}"
            )
        blocks = []
        previous = in_channels
        for c in channels:
            blocks.append(ResBlock(previous, c, track_running_stats))
            previous = c
        self.encoder = nn.Sequential(*blocks)
        self.out_dim = channels[-1]
        self.feature_shape = (channels[-1], side, side)
        init_resnet_weights(self, "leaky_relu", LEAK)  # Kaiming-normal convs for LeakyReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return features (B, out_dim): the global average of the last map."""
        return self.encoder(x).mean(dim=(2, 3))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the un-pooled map (B, *feature_shape), used by Relation Networks."""
        return self.encoder(x)
