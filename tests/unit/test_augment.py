"""Augmentation (metatransfer/augment.py): seeded, shape- and range-preserving,
and each step does what it says on images whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from metatransfer.augment import augment_batch, color_jitter, crop_boxes, resized_crop
from metatransfer.config import AugmentParams, check_augment
from metatransfer.errors import ConfigError

ON = AugmentParams(enabled=True, crop_scale=(0.3, 1.0), hflip=True, color_jitter=0.4)
FLIP_ONLY = AugmentParams(enabled=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=True, color_jitter=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 8, c: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, s, s, generator=_gen(seed))


def _ramp(b: int, c: int, s: int) -> torch.Tensor:
    """Images whose value is the column's centre position / s: a left-to-right ramp."""
    row = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    return row.view(1, 1, 1, s).expand(b, c, s, s).contiguous()


@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_same_output_other_seed_other_output(channels: int) -> None:
    x = _batch(c=channels)
    a = augment_batch(x, ON, _gen(7))
    b = augment_batch(x, ON, _gen(7))
    c = augment_batch(x, ON, _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # Each image gets its own draws: two copies of one image come out differently.
    twins = augment_batch(x[:1].expand(4, -1, -1, -1).contiguous(), ON, _gen(7))
    assert not torch.allclose(twins[0], twins[1], atol=1e-3)


def test_disabled_returns_the_input_itself() -> None:
    x = _batch()
    params = AugmentParams(enabled=False, crop_scale=(0.1, 0.2), color_jitter=0.9)
    g = _gen(0)
    state = g.get_state()
    assert augment_batch(x, params, g) is x
    assert torch.equal(g.get_state(), state)  # no draws either


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_shape_dtype_and_unit_range(channels: int, dtype: torch.dtype) -> None:
    # Saturated pixels (0 and 1) and a strong jitter: the clamp is what keeps the range.
    x = _batch(b=16, c=channels, s=28).to(dtype)
    x[:, :, :4] = 1.0
    x[:, :, -4:] = 0.0
    strong = AugmentParams(enabled=True, crop_scale=(0.08, 1.0), crop_ratio=(0.5, 2.0), color_jitter=0.9)
    y = augment_batch(x, strong, _gen(1))
    assert y.shape == x.shape and y.dtype == dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.allclose(y, x, atol=1e-2)  # it did change the images
    assert torch.equal(x[:, :, :4], torch.ones_like(x[:, :, :4]))  # the input is untouched


def test_flip_only_gives_each_image_or_its_mirror() -> None:
    x = _ramp(32, 3, 16)
    y = augment_batch(x, FLIP_ONLY, _gen(3))
    mirrored = x.flip(-1)
    flipped = [bool(torch.equal(y[i], mirrored[i])) for i in range(32)]
    kept = [bool(torch.equal(y[i], x[i])) for i in range(32)]
    assert all(f != k for f, k in zip(flipped, kept))  # exactly one of the two, per image
    assert 8 <= sum(flipped) <= 24  # p = 1/2 over 32 images
    i = flipped.index(True)
    # A mirrored ramp runs right to left: first column is the last centre, 15.5 / 16.
    assert y[i, 0, 0, 0].item() == pytest.approx(15.5 / 16) and y[i, 0, 0, -1].item() == pytest.approx(0.5 / 16)


def test_full_box_crop_is_the_identity() -> None:
    boxes = crop_boxes(64, 40, 40, (1.0, 1.0), (1.0, 1.0), _gen(0))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 40.0, 40.0]], dtype=torch.float64).expand(64, 4))
    x = _batch(b=64, s=40)
    torch.testing.assert_close(resized_crop(x, boxes), x, atol=2e-5, rtol=0)
    no_flip = AugmentParams(enabled=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, color_jitter=0.0)
    y = augment_batch(x, no_flip, _gen(0))
    assert y is not x and torch.equal(y, x)


def test_resized_crop_of_the_left_half_stretches_the_ramp() -> None:
    s = 32
    x = _ramp(1, 1, s)
    left_half = torch.tensor([[0.0, 0.0, s / 2, float(s)]], dtype=torch.float64)
    y = resized_crop(x, left_half)
    # Output column i samples input position (i + 0.5) / 2 pixels, value ((i + 0.5) / 2) / s
    # (bilinear is exact on a linear ramp); the first column lies left of the first
    # pixel centre and reads the border value instead.
    expected = (torch.arange(s, dtype=torch.float64) + 0.5) / 2 / s
    torch.testing.assert_close(y[0, 0, 0, 1:], expected[1:])
    assert y[0, 0, 0, 0].item() == pytest.approx(0.5 / s)
    torch.testing.assert_close(y[0, 0, :, 5], torch.full((s,), expected[5].item(), dtype=torch.float64))


def test_crop_boxes_respect_scale_ratio_and_image() -> None:
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    boxes = crop_boxes(2000, 84, 84, scale, ratio, _gen(5))
    left, top, w, h = boxes.unbind(1)
    area = w * h / (84 * 84)
    assert float(area.min()) >= scale[0] - 1e-9 and float(area.max()) <= scale[1] + 1e-9
    aspect = w / h
    assert float(aspect.min()) >= ratio[0] - 1e-9 and float(aspect.max()) <= ratio[1] + 1e-9
    assert float(left.min()) >= 0 and float(top.min()) >= 0
    assert float((left + w).max()) <= 84 + 1e-9 and float((top + h).max()) <= 84 + 1e-9
    # Log-uniform ratio: about half the boxes are wider than tall.
    assert 0.4 < float((aspect > 1).double().mean()) < 0.6


def test_crop_falls_back_to_a_centre_crop_when_no_box_fits() -> None:
    # A ratio range of [3, 4] at the full area never fits a square: centre crop of ratio 3.
    boxes = crop_boxes(4, 30, 30, (1.0, 1.0), (3.0, 4.0), _gen(0))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 10.0, 30.0, 10.0]], dtype=torch.float64).expand(4, 4))


def test_color_jitter_factors_do_what_they_say() -> None:
    x = _batch(b=2, c=3, s=8) * 0.5 + 0.25  # inside (0.25, 0.75): no clipping below
    ones = torch.ones(2, 3)
    torch.testing.assert_close(color_jitter(x, ones), x)
    bright = torch.tensor([[1.2, 1.0, 1.0], [0.8, 1.0, 1.0]])
    torch.testing.assert_close(color_jitter(x, bright), x * torch.tensor([1.2, 0.8]).view(2, 1, 1, 1))
    # Saturation 0: every channel becomes the luma grey (0.299 R + 0.587 G + 0.114 B).
    grey = color_jitter(x, torch.tensor([[1.0, 1.0, 0.0]] * 2))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for ch in range(3):
        torch.testing.assert_close(grey[:, ch], luma)
    # Contrast 0: a flat image at the mean grey level.
    flat = color_jitter(x, torch.tensor([[1.0, 0.0, 1.0]] * 2))
    torch.testing.assert_close(flat, luma.mean(dim=(1, 2)).view(2, 1, 1, 1).expand_as(x))


def test_saturation_is_a_no_op_on_one_channel() -> None:
    x = _batch(b=3, c=1, s=8)
    torch.testing.assert_close(color_jitter(x, torch.tensor([[1.0, 1.0, 0.0]] * 3)), x)
    torch.testing.assert_close(color_jitter(x, torch.tensor([[1.0, 1.0, 1.9]] * 3)), x)


def test_bad_batch_is_refused_with_its_shape() -> None:
    with pytest.raises(ValueError, match=r"expected a float batch \(B, C, H, W\).*found shape \(3, 8, 8\)"):
        augment_batch(torch.rand(3, 8, 8), ON, _gen(0))
    with pytest.raises(ValueError, match=r"dtype torch.uint8.*x.float\(\) / 255"):
        augment_batch(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), ON, _gen(0))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (AugmentParams(crop_scale=(0.9, 0.5)),
         r"finetune.augment.crop_scale: must be \[min, max\] with 0 < min <= max <= 1, found \[0.9, 0.5\]"),
        (AugmentParams(crop_scale=(0.0, 1.0)), r"finetune.augment.crop_scale: .*found \[0.0, 1.0\]"),
        (AugmentParams(crop_scale=(0.5, 1.5)), r"finetune.augment.crop_scale: .*found \[0.5, 1.5\]"),
        (AugmentParams(crop_ratio=(2.0, 1.0)), r"finetune.augment.crop_ratio: .*found \[2.0, 1.0\]"),
        (AugmentParams(color_jitter=1.0), r"finetune.augment.color_jitter: must be in \[0, 1\) \(0: off\), found 1.0"),
        (AugmentParams(color_jitter=-0.1), r"finetune.augment.color_jitter: .*found -0.1"),
    ],
)
def test_augment_params_ranges_name_the_key(params: AugmentParams, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_augment(params, "finetune.augment")
    check_augment(AugmentParams(), "finetune.augment")  # the defaults are valid
    assert AugmentParams().enabled is False and math.isclose(AugmentParams().crop_ratio[0], 0.75)


def _jitter_reference(img: torch.Tensor, b: float, c: float, s: float) -> torch.Tensor:
    """torchvision's adjust_brightness → adjust_contrast → adjust_saturation on one image, written plainly."""
    def grey(t: torch.Tensor) -> torch.Tensor:
        return 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2] if t.shape[0] == 3 else t[0]

    out = (img * b).clamp(0, 1)
    out = (c * out + (1 - c) * grey(out).mean()).clamp(0, 1)
    if out.shape[0] == 3:
        out = (s * out + (1 - s) * grey(out)).clamp(0, 1)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_matches_a_per_image_reference(channels: int) -> None:
    x = _batch(b=6, c=channels, s=12, seed=4)
    factors = 0.3 + 1.4 * torch.rand(6, 3, generator=_gen(9))  # clipping happens too
    out = color_jitter(x, factors)
    for i in range(6):
        torch.testing.assert_close(out[i], _jitter_reference(x[i], *factors[i].tolist()))


def test_every_augment_section_in_params_is_found_for_range_checks() -> None:
    # _check_ranges validates AugmentParams wherever a section holds one
    # (finetune.augment, pretrain.augment, ...), by walking the params tree.
    from dataclasses import dataclass, field

    from metatransfer.config import _sections_of_type

    @dataclass(frozen=True)
    class Stage:
        augment: AugmentParams = AugmentParams()

    @dataclass(frozen=True)
    class Tree:
        finetune: Stage
        pretrain: Stage | None
        extra: dict[str, AugmentParams] = field(default_factory=dict)

    bad = AugmentParams(color_jitter=2.0)
    tree = Tree(finetune=Stage(), pretrain=Stage(bad), extra={"x": AugmentParams()})
    found = _sections_of_type(tree, AugmentParams)
    assert [key for key, _ in found] == ["finetune.augment", "pretrain.augment", "extra.x"]
    assert found[1][1] is bad
