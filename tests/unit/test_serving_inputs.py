"""Serving inputs: every malformed request gets an InputError naming the field,
what was expected and what was found (the rows of docs/bad_input.md)."""

from __future__ import annotations

import numpy as np
import pytest

from metatransfer.serving.inputs import InputError, as_images, as_labels


def images(n: int = 2, c: int = 1, s: int = 28, dtype=np.float32) -> np.ndarray:
    return np.full((n, c, s, s), 0.5, dtype=dtype)


def test_good_images_and_labels_pass_unchanged() -> None:
    x = as_images(images(3), "images", 1, 28)
    assert x.shape == (3, 1, 28, 28) and float(x[0, 0, 0, 0]) == 0.5
    y, n = as_labels([0, 1, 1, 0, 2], "support_y", 5)
    assert n == 3 and y.tolist() == [0, 1, 1, 0, 2]


@pytest.mark.parametrize("value, expected", [
    (images(2, 3), r"images: expected float32 images of shape \(batch, 1, 28, 28\), found shape \(2, 3, 28, 28\)"),
    (images(2, 1, 32), r"found shape \(2, 1, 32, 32\)"),
    (np.zeros((28, 28), np.float32), r"found shape \(28, 28\)"),
    (np.zeros((0, 1, 28, 28), np.float32), r"found shape \(0, 1, 28, 28\)"),
    (images(dtype=np.uint8), r"images: expected float32 values in \[0, 1\], found dtype uint8"),
    (images() * np.nan, r"images: contains NaN or infinite values"),
    (images() * 255, r"images: values must be in \[0, 1\] \(pixel / 255\), found range \[128, 128\]"),
])
def test_bad_images_are_named(value, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        as_images(value, "images", 1, 28)


@pytest.mark.parametrize("value, expected", [
    ([0, 1, 1], r"support_y: expected 4 labels \(one per support image\), found 3"),
    ([0.0, 1.0, 0.0, 1.0], r"support_y: expected integer labels, found dtype float64"),
    ([0, 2, 0, 2], r"labels must be 0..N-1 with every class present and N >= 2, found \[0, 2\]"),
    ([1, 1, 1, 1], r"found \[1\]"),
])
def test_bad_labels_are_named(value, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        as_labels(value, "support_y", 4)

