"""Validation of serving inputs: readable errors instead of tracebacks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metatransfer.errors import MetatransferError


class InputError(MetatransferError, ValueError):
    """A request's input does not have the shape, dtype or range the model needs."""


def as_images(value: Any, name: str, channels: int, size: int) -> torch.Tensor:
    """Turn a request field into float32 images (B, C, H, W) in [0, 1].

    Accepts float arrays already scaled to [0, 1] (the signature's dtype); the
    shape must be (B, channels, size, size) with B ≥ 1 and values finite.

    Raises:
        InputError: naming the field, expected and found shape or range.
    """
    arr = np.asarray(value)
    expected = f"(batch, {channels}, {size}, {size})"
    if arr.ndim != 4 or arr.shape[1:] != (channels, size, size) or arr.shape[0] < 1:
        raise InputError(f"{name}: expected float32 images of shape {expected}, found shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name}: expected float32 values in [0, 1], found dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name}: values must be in [0, 1] (pixel / 255), found range [{lo:.3g}, {hi:.3g}]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def as_labels(value: Any, name: str, count: int) -> tuple[torch.Tensor, int]:
    """Support labels: `count` integers forming 0..N-1 (every class present). Returns (labels, N)."""
    arr = np.asarray(value).reshape(-1)
    if arr.shape[0] != count:
        raise InputError(f"{name}: expected {count} labels (one per support image), found {arr.shape[0]}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name}: expected integer labels, found dtype {arr.dtype}")
    classes = np.unique(arr)
    n = int(classes.size)
    if n < 2 or not np.array_equal(classes, np.arange(n)):
        # At most 10 labels quoted: a request can hold any number of them.
        found = str(classes.tolist()) if n <= 10 else f"{str(classes[:10].tolist())[:-1]}, ...] ({n} distinct labels)"
        raise InputError(f"{name}: labels must be 0..N-1 with every class present and N >= 2, found {found}")
    return torch.from_numpy(arr.astype(np.int64)), n
