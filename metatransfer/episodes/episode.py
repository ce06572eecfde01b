"""The `Episode` container every algorithm uses, and the pixel steps samplers and fixed sets share.

Rotation augmentation (the standard Omniglot protocol of Santoro 2016 /
Finn 2017): every (class, k*90 degrees) pair is its own class, so a split of
C classes offers 4*C ways and way id `class * 4 + k`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task.

    Attributes:
        support_x: float32 images (N*K, C, H, W) scaled to [0, 1].
        support_y: int64 labels (N*K,) in 0..N-1.
        query_x: float32 images (N*Q, C, H, W).
        query_y: int64 labels (N*Q,) in 0..N-1.
        n_way: N, the number of classes in this task.
        classes: int64 (N,) global class ids (within the sampled split; with
            rotation augmentation the id is `class * 4 + rotation`) of ways
            0..N-1, so that supervised baselines can map local labels to
            global ones: `classes[support_y]`. None when unknown.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_way: int
    classes: torch.Tensor | None = None


N_ROTATIONS = 4  # ways per class with rotation augmentation (see above)


def rotation_maps(height: int, width: int) -> torch.Tensor:
    """Flat pixel permutations (4, H*W): `flat[..., maps[r]]` equals torch.rot90(img, r).

    One gather with these maps rotates a whole batch, each item by its own
    angle, instead of one rot90 call per way.
    """
    grid = torch.arange(height * width).view(height, width)
    return torch.stack([torch.rot90(grid, r, dims=(0, 1)).reshape(-1) for r in range(N_ROTATIONS)])


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]; division (not multiplication by 1/255) keeps 255 → exactly 1.0."""
    return x.to(torch.float32).div_(255.0)

def rotate_ways(
    x: torch.Tensor, rotations: torch.Tensor, k_shot: int, n_query: int, rot_maps: torch.Tensor
) -> torch.Tensor:
    """Rotate gathered uint8 images [support; query] (class-major) way by way.

    Args:
        x: uint8 (N*K + N*Q, C, H, W).
        rotations: int64 (N,) rotation 0..3 of each way.
        k_shot, n_query: items per way in the support and query parts.
        rot_maps: (4, H*W) flat rotation maps from rotation_maps.

    Returns:
        x with item j rotated by torch.rot90(..., rotations[way of j], dims=(-2, -1)).
    """
    per_item = torch.cat([rotations.repeat_interleave(k_shot), rotations.repeat_interleave(n_query)])
    b, c, h, w = x.shape
    flat_idx = rot_maps.index_select(0, per_item).unsqueeze(1).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, flat_idx).view(b, c, h, w)


def assemble(
    x: torch.Tensor,
    support_y: torch.Tensor,
    query_y: torch.Tensor,
    global_ids: torch.Tensor,
) -> Episode:
    """Build an Episode from gathered (already rotated) uint8 images [support; query].

    Args:
        x: uint8 (N*K + N*Q, C, H, W), support items first, class-major.
        support_y, query_y: labels, cloned so callers may modify them freely.
        global_ids: int64 (N,) global way ids (`class * 4 + rotation` with rotation).
    """
    n_support = support_y.shape[0]
    xf = _to_float(x)
    return Episode(
        support_x=xf[:n_support],
        support_y=support_y.clone(),
        query_x=xf[n_support:],
        query_y=query_y.clone(),
        n_way=int(global_ids.shape[0]),
        classes=global_ids,
    )
