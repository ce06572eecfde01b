"""Seeded N-way K-shot Q-query episode construction.

(Skeleton: the `Episode` container is the contract every algorithm uses;
the sampler lives below it.)
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
