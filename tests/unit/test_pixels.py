"""uint8 store pixels -> float32 model input: 0 -> 0.0, 255 -> exactly 1.0, shape kept, a new tensor."""

from __future__ import annotations

import numpy as np
import torch

from metatransfer.pixels import to_float


def test_to_float_maps_the_byte_range_onto_zero_one_exactly() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).transpose(0, 1, 3, 2)  # not contiguous
    x = to_float(images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 1, 16, 16)
    assert x.min().item() == 0.0 and x.max().item() == 1.0 and (x * 255).round().to(torch.uint8).numpy().tolist() \
        == images.tolist()
    x[0, 0, 0, 0] = 5.0
    assert images[0, 0, 0, 0] == 0  # the store's array is never written through the tensor
