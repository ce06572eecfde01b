"""The promotion gate: pure functions, no MLflow.

The challenger and the reference (the current champion, or, while there is
none, the target model fine-tuned from the baseline method) classify the same
held-out test folds: the target's *test* split, shuffled with a fixed seed
and cut into `n_folds` disjoint folds (`test_folds`). These are plain folds
of test images, not N-way K-shot episodes. Per-fold accuracy differences give
a paired Student-t interval; promote only if the mean gain is >= `margin` and
the interval lies above 0 (`decide`). Disjoint folds keep the per-fold values
independent; overlapping resampled folds would count each image many times
and make the interval falsely narrow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import field_validator

from metatransfer.config import ConfigModel, Float, Int, Str, bounded
from metatransfer.errors import MetatransferError
from metatransfer.evaluation.stats import MeanCI, paired_difference


class RegistryError(MetatransferError):
    """A registry action cannot be done as asked (missing model, alias or history, bad gate settings)."""


class GateSettings(ConfigModel):
    """The promotion gate; a bad setting is a RegistryError naming `promote.<key>` when built.

    margin: minimum mean per-fold accuracy gain of the challenger (0.01 = one point).
    confidence: level of the paired interval of the per-fold difference.
    n_folds: disjoint held-out test folds cut from the target test split.
    baseline: finetune method whose target model a first champion must beat.
    seed: seeds the split of the test images into folds.
    """

    error_where: ClassVar[str] = "promote"
    error_type: ClassVar[type[Exception]] = RegistryError
    renamed_keys: ClassVar[dict[str, str]] = {"n_episodes": "n_folds"}

    margin: Float = bounded(0.01, ge=0, hint="a minimum gain")
    confidence: Float = bounded(0.95, gt=0, lt=1)
    n_folds: Int = bounded(20, ge=2, hint="an interval needs two folds")
    baseline: Str = "scratch"
    seed: Int = 0

    @field_validator("baseline")
    @classmethod
    def _names_a_method(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a finetune method (e.g. scratch)")
        return value


def gate_settings(params: Any = None, **overrides: Any) -> GateSettings:
    """Gate settings: code defaults, then params.yaml's `promote` section (if any), then `overrides`.

    Args:
        params: the loaded `Params` (its `promote` section and `seed` are used when present).
        overrides: keyword overrides; None values are ignored (unset CLI flags).

    Returns:
        Checked GateSettings.

    Raises:
        RegistryError: a bad setting, naming `promote.<key>`.
    """
    values: dict[str, Any] = {}
    if params is not None:
        values["seed"] = params.seed
        section = getattr(params, "promote", None)
        if section is not None:
            values.update({k: getattr(section, k) for k in ("margin", "confidence", "n_folds", "baseline") if hasattr(section, k)})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GateSettings(**values)


def test_folds(n_images: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Split image indices 0..n_images-1 into `n_folds` disjoint, seeded test folds.

    The indices are permuted with `numpy.random.default_rng(seed)` and cut
    with `numpy.array_split`, so every image is in exactly one fold and
    fold sizes differ by at most one.

    Returns:
        One sorted int64 index array per fold.
    """
    if n_folds < 2 or n_folds > n_images:
        raise RegistryError(f"promote.n_folds: must be in [2, {n_images}] (test images), found {n_folds}")
    perm = np.random.default_rng(seed).permutation(n_images)
    return [np.sort(f).astype(np.int64) for f in np.array_split(perm, n_folds)]


def folds_digest(folds: list[np.ndarray]) -> str:
    """SHA-256 over the fold index arrays (identifies the exact held-out test folds)."""
    h = hashlib.sha256()
    for e in folds:
        h.update(np.asarray(e, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


def fold_accuracies(predictions: np.ndarray, labels: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Per-fold accuracy (float64) of per-image predictions."""
    pred, lab = np.asarray(predictions), np.asarray(labels)
    if pred.shape != lab.shape:
        raise RegistryError(f"predictions {pred.shape} and labels {lab.shape} differ in shape")
    correct = (pred == lab).astype(np.float64)
    return np.array([correct[f].mean() for f in folds], dtype=np.float64)


@dataclass(frozen=True)
class GateDecision:
    """Whether the challenger passes, with the paired difference it was judged on."""

    promote: bool
    gain: MeanCI
    reason: str


def decide(challenger_acc: np.ndarray, reference_acc: np.ndarray, margin: float, confidence: float) -> GateDecision:
    """The gate rule: promote iff mean gain ≥ margin and the paired CI lies above 0.

    Args:
        challenger_acc, reference_acc: per-fold accuracies on the same test folds, same order.
        margin: minimum mean gain.
        confidence: interval level (e.g. 0.95).

    Returns:
        GateDecision with the paired difference challenger − reference.
    """
    gain = paired_difference(challenger_acc, reference_acc, confidence)
    pct = f"{100 * confidence:g} %"
    ci = f"[{gain.low:+.4f}, {gain.high:+.4f}]"
    if not np.isfinite(gain.ci):
        return GateDecision(False, gain, "the interval cannot be computed (fewer than two folds)")
    if gain.mean < margin:
        return GateDecision(False, gain, f"mean gain {gain.mean:+.4f} is below the margin {margin:.4f} (paired {pct} CI {ci})")
    if not gain.low > 0:
        return GateDecision(False, gain, f"paired {pct} CI {ci} of the gain does not exclude 0 (mean {gain.mean:+.4f})")
    return GateDecision(True, gain, f"mean gain {gain.mean:+.4f} >= margin {margin:.4f} and paired {pct} CI {ci} excludes 0")
