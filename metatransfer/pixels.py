"""The prepared store's uint8 pixels as the float32 tensors every model reads.

One conversion for the stages that feed whole splits to a model (`finetune`,
`evaluate`): division by 255 (not multiplication by 1/255), so 255 maps to
exactly 1.0, as `metatransfer.episodes` and serving do.
"""

from __future__ import annotations

import numpy as np
import torch


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, C, H, W) as a float32 tensor in [0, 1].

    Args:
        images: pixels as the store holds them.

    Returns:
        A new float32 tensor of the same shape.
    """
    # One float32 copy made by NumPy (a store's memory map is read-only: torch.from_numpy on it warns);
    # uint8 -> float32 is exact, so the values are those of .float() on the uint8 tensor.
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)
