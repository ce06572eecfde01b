"""Fine-tuning helpers shared by the honest baselines (Scratch, Baseline, Baseline++,
BNAdapt, TIM).

They cover what every "adapt by training a classifier on the support set"
method repeats: seeded construction that leaves the global RNG alone,
frozen copies of a backbone, feature extraction, a mini-batch training loop,
BatchNorm statistics re-estimation, and the predictor module that `adapt`
returns (backbone + head, in eval mode).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# Images per forward when extracting features or re-estimating statistics:
# bounds memory on large target sets without changing any result.
FEATURE_CHUNK = 512


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded to `seed`, then restore it.

    Module constructors (`nn.Linear`, `nn.Conv2d`) draw from the global RNG;
    forking it makes a seeded construction reproducible without disturbing
    the caller's random stream (e.g. the episode sampler's).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def frozen_copy(module: nn.Module) -> nn.Module:
    """Deep copy of `module` in eval mode with every parameter frozen.

    Args:
        module: e.g. the meta-learned backbone θ (left untouched).

    Returns:
        The copy (same device and dtype), `requires_grad=False`, eval mode.
    """
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.requires_grad_(False)
        param.grad = None
    return clone.eval()


def trainable_copy(module: nn.Module) -> nn.Module:
    """Deep copy of `module` with every parameter trainable and no stale `.grad`.

    Args:
        module: the module to copy (left untouched).

    Returns:
        The copy (same device, dtype and train/eval flags).
    """
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.requires_grad_(True)
        param.grad = None
    return clone


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features of `images` under `backbone` in its current mode, without gradients.

    Args:
        backbone: images (B, C, H, W) → features (B, D); put it in eval mode
            first (BatchNorm would otherwise use and update batch statistics).
        images: (B, C, H, W), any size (processed in chunks).

    Returns:
        (B, D) features, detached.
    """
    parts = [backbone(chunk) for chunk in images.split(FEATURE_CHUNK)]
    return torch.cat(parts)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d) inside `module`, in definition order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of `module` in eval mode (the rest keeps its mode).

    Fine-tuning a whole network on batches of a few support images would
    otherwise normalise with the statistics of 4 images and overwrite the
    running statistics learnt on thousands; in eval mode BatchNorm uses the
    stored statistics while its affine parameters still train.
    """
    for layer in batchnorm_layers(module):
        layer.eval()


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, images: torch.Tensor) -> None:
    """Replace every BatchNorm running statistic of `module` by that of `images`.

    The statistics are reset and accumulated as a cumulative average
    (`momentum=None`) over one pass in train mode, so with one chunk each
    layer's `running_mean` is exactly the per-channel mean of its input on
    `images` (and `running_var` the unbiased variance). Momentum and the
    train/eval flag of every sub-module are restored afterwards; parameters
    are not touched.

    Args:
        module: modified in place (pass a copy to keep the original).
        images: the images whose statistics to take (e.g. target images).
    """
    layers = batchnorm_layers(module)
    momenta = [layer.momentum for layer in layers]
    flags = [(m, m.training) for m in module.modules()]
    for layer in layers:
        if not layer.track_running_stats:
            continue
        layer.reset_running_stats()
        layer.momentum = None
    # Only BatchNorm in train mode: anything stochastic (dropout) stays off.
    module.eval()
    for layer in layers:
        layer.train()
    try:
        for chunk in images.split(FEATURE_CHUNK):
            module(chunk)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for sub, flag in flags:
            sub.training = flag


def fit(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Train `model` with cross-entropy: `epochs` passes over (inputs, labels).

    Each epoch visits the data in a fresh random order in mini-batches of
    `batch_size` (Chen et al. 2019's fine-tuning loop); `batch_size <= 0` or
    at least the data size means one full-batch step per epoch. The order
    comes from a private generator seeded with `seed`, so the result does
    not depend on the global RNG. Runs under `torch.enable_grad()` because
    evaluation code usually calls `adapt` inside `torch.no_grad()`.

    Args:
        model: maps inputs to logits; its train/eval flags are the caller's
            choice (they are not changed here).
        inputs: images or features (S, ...).
        labels: int64 (S,) targets.
        optimizer: over the parameters to train.
        epochs: passes over the data (0 trains nothing).
        batch_size: mini-batch size; <= 0 means full batch.
        seed: seed of the visiting order.

    Returns:
        The loss of every optimisation step, in order.
    """
    n = inputs.shape[0]
    full = batch_size <= 0 or batch_size >= n
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(epochs):
            if full:
                batches = [torch.arange(n)]
            else:
                batches = list(torch.randperm(n, generator=generator).split(batch_size))
            for idx in batches:
                idx = idx.to(inputs.device)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(inputs[idx]), labels[idx])
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    return losses


class FeatureClassifier(nn.Module):
    """The predictor `adapt` returns: images → logits = head(backbone(images)).

    It is kept in eval mode (BatchNorm uses its stored statistics, so a
    prediction does not depend on which other images share the batch).

    Attributes:
        backbone: the adapted (or frozen) copy of the feature extractor.
        head: the classifier fitted on the support set.
        fit_losses: the training loss of every adaptation step (for logging
            and tests); empty when nothing was trained.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, fit_losses: list[float] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.fit_losses: list[float] = list(fit_losses or [])
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_way) of images (B, C, H, W) (moved to the model's device and dtype)."""
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, D) of images (B, C, H, W)."""
        for param in self.backbone.parameters():
            images = images.to(device=param.device, dtype=param.dtype)
            break
        return self.backbone(images)


def freeze(module: nn.Module) -> nn.Module:
    """Set `requires_grad=False` on every parameter of `module`, put it in eval mode, return it.

    Predictors are inference objects: freezing keeps an evaluator that
    forgets `torch.no_grad()` from building graphs through them.
    """
    for param in module.parameters():
        param.requires_grad_(False)
        param.grad = None
    return module.eval()
