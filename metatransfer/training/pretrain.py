"""Supervised pre-training of a backbone on every source class (the P of P>M>F).

Hu, Li, Stühmer, Kim & Hospedales (2022), "Pushing the Limits of Simple
Pipelines for Few-Shot Learning: External Data and Fine-Tuning Make a
Difference" (CVPR): pre-train -> meta-train -> fine-tune. Chen, Liu, Xu,
Darrell & Wang (2021), "Meta-Baseline": the classifier stage is plain
supervised training on all base classes, evaluated by nearest-centroid
accuracy on few-shot validation episodes.

In the meta-learner M(x, D; θ) -> φ of this project, pre-training and
meta-training both learn θ; adapting θ on a target's few labelled images
yields φ, and fine-tuning starts from φ.

The loop is stateless in its randomness: the images of step `s` are a slice
of a permutation drawn from a generator seeded by (seed, epoch), and the
augmentation of step `s` uses a generator seeded by (seed, s). A run is
therefore fixed by its settings and seed, independent of the machine's load,
and a resumed run (checkpoint: weights, optimizer, best state, step) ends
with the same weights as an uninterrupted one on CPU.

Validation: every `val_every` steps, nearest-centroid accuracy (cosine
similarity to class means of the support features, backbone in eval mode)
on fixed meta-val episodes; the best state is kept.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.augment import augment_batch
from metatransfer.config import AugmentParams
from metatransfer.episodes import Episode
from metatransfer.errors import MetatransferError
from metatransfer.training.checkpoint import (
    CheckpointConfig,
    load_latest,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")


class PretrainError(MetatransferError):
    """Pre-training cannot run as configured (no classes, a non-finite loss, ...)."""


@dataclass(frozen=True)
class PretrainSettings:
    """Budget and optimisation of one pre-training run.

    Attributes:
        steps: optimizer steps (the budget; the run does exactly this many).
        batch_size: images per step.
        lr: initial learning rate.
        optimizer: "adam" or "sgd" (momentum 0.9, Nesterov).
        weight_decay: L2 penalty of the optimizer.
        lr_schedule: "constant" or "cosine" (half cosine from lr to 0 over `steps`).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        val_every: steps between validations (the last step is always validated).
        augment: the batch augmentation (off when `augment.enabled` is False).
        channels_last: train in channels-last memory layout.
    """

    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    label_smoothing: float = 0.0
    val_every: int = 100
    augment: AugmentParams = field(default_factory=AugmentParams)
    # 4-D weights and batches in channels-last layout during training (faster
    # oneDNN kernels on CPU; 2.7x per step with bf16 at 32 px, RESULTS.md);
    # the modules are returned in the default layout.
    channels_last: bool = False


@dataclass
class PretrainResult:
    """What a pre-training run produced.

    Attributes:
        best_val_acc: best nearest-centroid meta-val accuracy (-1 without validation episodes).
        best_step: the step of the kept weights.
        steps_done: steps run in total (including those before a resume).
        curve: [{"step", "acc", "loss"}] at each validation.
        resumed_from: the step a checkpoint resumed from, or None.
    """

    best_val_acc: float
    best_step: int
    steps_done: int
    curve: list[dict[str, float]]
    resumed_from: int | None = None


def source_index(label_sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One global index over several source splits.

    Args:
        label_sets: per split, int64 labels 0..C_i-1.

    Returns:
        (split id, row within the split, global label) per image, where the
        classes of split i are numbered after those of splits 0..i-1.
    """
    parts, rows, labels, offset = [], [], [], 0
    for i, y in enumerate(label_sets):
        y = np.asarray(y, dtype=np.int64)
        parts.append(np.full(len(y), i, dtype=np.int64))
        rows.append(np.arange(len(y), dtype=np.int64))
        labels.append(y + offset)
        offset += int(y.max()) + 1 if len(y) else 0
    return np.concatenate(parts), np.concatenate(rows), np.concatenate(labels)


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Positions (into 0..n-1) of the images of `step`: epoch-wise permutations, no state.

    The concatenation of the permutations of epochs 0, 1, ... (each drawn from
    a generator seeded by (seed, epoch)) is cut into consecutive batches; a
    batch that straddles two epochs takes the end of one and the start of the next.
    """
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return np.sort(np.concatenate(out))  # sorted: sequential reads of a memory-mapped store


def gather(images: Sequence[np.ndarray], split_ids: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """uint8 images of (split, row) pairs -> float32 (B, C, H, W) in [0, 1]."""
    first = images[int(split_ids[0])]
    out = np.empty((len(rows), *first.shape[1:]), dtype=np.uint8)
    for s in np.unique(split_ids):
        mask = split_ids == s
        out[mask] = images[int(s)][rows[mask]]
    return torch.from_numpy(out).float().div_(255.0)


@torch.no_grad()
def centroid_accuracy(backbone: nn.Module, episodes: Sequence[Episode], device: torch.device) -> float:
    """Mean query accuracy of cosine nearest-centroid classification on `episodes`.

    The backbone runs in eval mode (running statistics); its mode is restored.
    """
    if not episodes:
        return -1.0
    was = backbone.training
    backbone.eval()
    accs = []
    try:
        for ep in episodes:
            s = F.normalize(backbone(ep.support_x.to(device)), dim=1)
            q = F.normalize(backbone(ep.query_x.to(device)), dim=1)
            sy = ep.support_y.to(device)
            protos = torch.stack([s[sy == c].mean(0) for c in range(ep.n_way)])
            pred = (q @ F.normalize(protos, dim=1).T).argmax(1)
            accs.append((pred == ep.query_y.to(device)).float().mean().item())
    finally:
        backbone.train(was)
    return float(np.mean(accs))


def _optimizer(model: nn.Module, s: PretrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, nesterov=True, weight_decay=s.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def lr_at(step: int, s: PretrainSettings) -> float:
    """Learning rate of step `step` (0-based) under the schedule."""
    if s.lr_schedule == "cosine" and s.steps > 0:
        return s.lr * 0.5 * (1.0 + math.cos(math.pi * step / s.steps))
    return s.lr


def check_settings(s: PretrainSettings) -> None:
    """Refuse settings the loop cannot honour (PretrainError naming the `pretrain.` key)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise PretrainError(f"pretrain.{key}: {msg}")

    need(s.steps >= 0, "steps", f"must be >= 0, found {s.steps}")
    need(s.batch_size >= 1, "batch_size", f"must be >= 1, found {s.batch_size}")
    need(s.lr > 0 and math.isfinite(s.lr), "lr", f"must be a finite number > 0, found {s.lr}")
    need(s.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}, found {s.optimizer!r}")
    need(s.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {list(SCHEDULES)}, found {s.lr_schedule!r}")
    need(s.val_every >= 1, "val_every", f"must be >= 1, found {s.val_every}")


def pretrain(
    backbone: nn.Module,
    head: nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    val_episodes: Sequence[Episode],
    settings: PretrainSettings,
    seed: int,
    device: torch.device | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    sink: Callable[[str, float, int], None] | None = None,
    checkpoint: CheckpointConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Train `head(backbone(x))` to classify every source image among all source classes.

    Args:
        backbone: the feature extractor θ (trained in place; ends with the best-validation weights).
        head: maps features to logits over every source class (trained in place).
        images: per source split, uint8 (N_i, C, H, W) (memory-mapped arrays are read batch by batch).
        labels: per source split, int64 (N_i,) class index within the split.
        val_episodes: fixed meta-val episodes for the nearest-centroid curve ([] = none: the last weights are kept).
        settings: budget and optimiser.
        seed: fixes the batch order, the augmentation and nothing else.
        device: where to train (default CPU).
        autocast: optional factory of a mixed-precision context for the forward/backward pass.
        sink: optional metric logger (name, value, step).
        checkpoint: optional; save every `checkpoint.every` steps and resume from the newest.
        on_step: optional callback(step, loss), e.g. a progress bar.

    Returns:
        PretrainResult (the modules hold the kept weights).

    Raises:
        PretrainError: bad settings, no images, or a non-finite loss.
    """
    check_settings(settings)
    device = device or torch.device("cpu")
    split_ids, rows, targets = source_index(labels)
    if len(rows) == 0:
        raise PretrainError("pretrain: the source splits hold no images; check pretrain.datasets and the prepare stage")
    n_classes = int(targets.max()) + 1
    out_dim = getattr(head, "out_features", None) or getattr(head, "weight").shape[0]
    if out_dim != n_classes:
        raise PretrainError(f"pretrain: the head has {out_dim} outputs but the sources have {n_classes} classes")
    model = nn.Sequential(backbone, head).to(device)
    layout = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = _optimizer(model, settings)
    emit = sink or (lambda *a: None)
    amp = autocast or contextlib.nullcontext
    has_val = len(val_episodes) > 0
    best_acc, best_step, step, last_loss = -1.0, 0, 0, float("nan")
    best_state = copy.deepcopy(model.state_dict())
    curve: list[dict[str, float]] = []
    resumed = load_latest(checkpoint) if checkpoint is not None else None
    if resumed is not None:
        st = resumed.state
        model.load_state_dict(st["model"])
        load_optimizer_state(optimizer, st["optimizer"])
        best_state, best_acc, best_step = st["best"], float(st["best_acc"]), int(st["best_step"])
        curve, step = list(st["curve"]), int(st["step"])
        log.info("pretrain: resumed from %s (step %d)", resumed.path, step)

    def snapshot() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, step, {"model": model.state_dict(), "optimizer": optimizer_state(optimizer),
                                               "best": best_state, "best_acc": best_acc, "best_step": best_step,
                                               "curve": curve, "step": step})

    y_all = torch.from_numpy(targets)
    while step < settings.steps:
        model.train()
        pos = batch_indices(step, len(rows), settings.batch_size, seed)
        x = gather(images, split_ids[pos], rows[pos])
        if settings.augment.enabled:
            x = augment_batch(x, settings.augment, torch.Generator().manual_seed(seed * 1_000_003 + step))
        x, y = x.to(device).contiguous(memory_format=layout), y_all[pos].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        with amp():
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=settings.label_smoothing)
        if not torch.isfinite(loss):
            raise PretrainError(f"pretrain: non-finite loss at step {step + 1}; lower pretrain.lr (found {settings.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        last_loss = float(loss.detach())
        emit("pretrain/loss", last_loss, step)
        if on_step is not None:
            on_step(step, last_loss)
        if has_val and (step % settings.val_every == 0 or step == settings.steps):
            acc = centroid_accuracy(backbone, val_episodes, device)
            curve.append({"step": step, "acc": acc, "loss": last_loss})
            emit("val/acc", acc, step)
            if acc > best_acc:
                best_acc, best_step = acc, step
                best_state = copy.deepcopy(model.state_dict())
        if checkpoint is not None and checkpoint.every > 0 and step % checkpoint.every == 0:
            snapshot()
    if resumed is None or resumed.step != step:
        snapshot()  # the finished state: a re-run after a later kill trains no step again
    if has_val:
        model.load_state_dict(best_state)
    else:
        best_step = step
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return PretrainResult(best_acc, best_step, step, curve, resumed.step if resumed is not None else None)
