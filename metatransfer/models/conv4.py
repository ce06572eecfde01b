"""Conv-4, the backbone of the few-shot papers (Vinyals 2016, Snell 2017, Finn 2017).

Four blocks of [3x3 conv with `hidden` channels, BatchNorm, ReLU, 2x2 max-pool];
the output is flattened, so `out_dim = hidden * (image_size // 16)^2` (each
pool floors). At 28x28 input the spatial size goes 28→14→7→3→1 (features are
`hidden`-dimensional, 64 by default); at 84x84, 84→42→21→10→5 (1600 with
hidden 64, as in the miniImageNet papers); at 224x224 the map is 14x14.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool) -> nn.Sequential:
    """One Conv-4 block: conv3x3 → BatchNorm → ReLU → max-pool 2x2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """Conv-4 feature extractor: images (B, C, H, W) → features (B, out_dim).

    Args:
        in_channels: image channels (1 for grey).
        image_size: input height = width; fixes `out_dim`.
        hidden: channels of every block.
        track_running_stats: False makes BatchNorm always use the statistics of
            the batch it sees (per-episode statistics), as MAML's reference code
            does; True keeps running averages for metric methods and baselines.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 64,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            conv_block(in_channels, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
            conv_block(hidden, hidden, track_running_stats),
        )
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(
                f"Conv4 needs image_size >= 16 (four 2x2 pools); got image_size={image_size}"
            )
        self.out_dim = hidden * side * side
        self.feature_shape = (hidden, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return flattened features (B, out_dim)."""
        return self.encoder(x).flatten(1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Return the un-flattened map (B, hidden, s, s), used by Relation Networks."""
        return self.encoder(x)
