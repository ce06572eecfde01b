"""Training-time image augmentation in plain torch, vectorised over the batch.

For target fine-tuning (`finetune.augment`) and pre-training
(`pretrain.augment`): float batches (B, C, H, W) in [0, 1] in, the same shape
out, with every random draw taken from a `torch.Generator` so a seeded run is
reproducible. The steps follow torchvision's `RandomResizedCrop`,
`RandomHorizontalFlip` and `ColorJitter` (brightness, contrast, saturation),
without torchvision (it does not import beside this project's torch build):

1. Random resized crop: per image an area share from `crop_scale` and an
   aspect ratio (width / height) drawn log-uniformly from `crop_ratio`; the
   first of 10 candidate boxes that fits inside the image is taken, else a
   centre crop with the ratio clamped into the range (torchvision's rule).
   Boxes are continuous (not rounded to pixels) and every image is resampled
   back to (H, W) in one `grid_sample` call (bilinear). A crop is never larger
   than the image, so the resize only magnifies: antialiasing, which matters
   when shrinking, would change nothing.
2. Horizontal flip with probability 1/2 per image.
3. Colour jitter with strength s: brightness, contrast and saturation factors
   each uniform in [1 - s, 1 + s] per image, applied in that fixed order, each
   result clamped to [0, 1] as torchvision does. Contrast blends with the
   image's mean grey level, saturation with its grey image (ITU-R 601 luma, as
   torchvision); saturation is a no-op on one channel (the image is its grey).

The random numbers are drawn in the same amounts whatever steps are enabled
for a given batch size, so toggling one step does not shift the draws of the
next one. Draws are made on the CPU (the generator must be a CPU generator)
and moved to the batch's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metatransfer.config import AugmentParams

CROP_TRIES = 10  # candidate boxes per image, as torchvision's RandomResizedCrop
LUMA = (0.299, 0.587, 0.114)  # RGB → grey weights (torchvision's rgb_to_grayscale)


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"augment: expected a float batch (B, C, H, W) in [0, 1], found shape {tuple(x.shape)} "
            f"dtype {x.dtype}; convert uint8 images with x.float() / 255"
        )


def crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw one random resized crop box per image.

    Args:
        batch, height, width: the batch size and image size in pixels.
        scale: (min, max) share of the image area kept.
        ratio: (min, max) aspect ratio width / height, drawn log-uniformly.
        generator: a CPU generator.

    Returns:
        (batch, 4) float64 boxes (left, top, w, h) in pixels, inside the image.
    """
    area = height * width
    u = torch.rand(batch, CROP_TRIES, 4, generator=generator, dtype=torch.float64)
    share = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(area * share * aspect)
    h = torch.sqrt(area * share / aspect)
    # A little slack so a full-size box that rounding puts a hair over the edge still fits.
    fits = (w <= width * (1 + 1e-9)) & (h <= height * (1 + 1e-9))
    w, h = w.clamp(max=width), h.clamp(max=height)
    left = (width - w) * u[..., 2]
    top = (height - h) * u[..., 3]
    # First fitting candidate per image (argmax of a bool picks the first True).
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    boxes = torch.stack([pick(left), pick(top), pick(w), pick(h)], dim=1)

    # Fallback (no candidate fits): centre crop, the whole image with its ratio clamped into range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    fallback = torch.tensor([(width - fw) / 2, (height - fh) / 2, fw, fh], dtype=torch.float64)
    none_fit = ~fits.any(dim=1)
    return torch.where(none_fit.unsqueeze(1), fallback, boxes)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Resample each image's box (left, top, w, h in pixels) to the full (H, W), bilinear.

    With align_corners=False, output pixel centre i maps to input position
    left + (i + 0.5) * w / W, so a box equal to the whole image is the identity.
    """
    b, _, height, width = x.shape
    left, top, w, h = boxes.to(torch.float64).unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border": sampling points that rounding puts a hair outside the image read the edge, not zeros.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images; one-channel images are their own grey."""
    if x.shape[1] != 3:
        return x
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Apply per-image brightness, contrast and saturation factors (B, 3), clamping after each.

    Args:
        x: (B, C, H, W) in [0, 1].
        factors: (B, 3) multiplicative factors; 1 leaves the image unchanged.

    Returns:
        The jittered batch, same shape, in [0, 1].
    """
    f = factors.to(device=x.device, dtype=x.dtype).view(-1, 3, 1, 1, 1)
    bright, contrast, sat = f[:, 0], f[:, 1], f[:, 2]
    # In place on the fresh tensor `x * bright`: halves the time of this step (memory-bound).
    out = (x * bright).clamp_(0, 1)
    mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
    out.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)
    if out.shape[1] == 3:
        grey = _grey(out) * (1 - sat)  # before the in-place multiply below changes `out`
        out.mul_(sat).add_(grey).clamp_(0, 1)
    return out


def augment_batch(x: torch.Tensor, params: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch of images: random resized crop, horizontal flip, colour jitter.

    Args:
        x: float (B, C, H, W) in [0, 1] (C = 1 or 3).
        params: the `augment` section (`finetune.augment`, `pretrain.augment`).
        generator: a seeded CPU `torch.Generator`; the same state gives the
            same output.

    Returns:
        A new tensor of the same shape, dtype and device, in [0, 1]; `x`
        itself (not a copy) when `params.enabled` is False.

    Raises:
        ValueError: `x` is not a 4-D float batch.
    """
    if not params.enabled:
        return x
    _check_batch(x)
    b, _, height, width = x.shape
    out = x
    # Crop draws are taken even when the crop is the identity: fixed stream layout.
    boxes = crop_boxes(b, height, width, params.crop_scale, params.crop_ratio, generator)
    if params.crop_scale != (1.0, 1.0) or params.crop_ratio != (1.0, 1.0) or height != width:
        out = resized_crop(out, boxes)
    flip = torch.rand(b, generator=generator) < 0.5
    if params.hflip:
        out = torch.where(flip.to(x.device).view(-1, 1, 1, 1), out.flip(-1), out)
    s = params.color_jitter
    factors = 1 - s + 2 * s * torch.rand(b, 3, generator=generator)
    if s > 0:
        out = color_jitter(out, factors)
    if out is x:  # enabled but every step off: still a new tensor, as documented
        return x.clone()
    # Bilinear resampling and flips keep values inside the input's range; only
    # an input slightly outside [0, 1] needs this.
    return out if s > 0 else out.clamp(0, 1)
