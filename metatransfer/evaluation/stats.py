"""Confidence intervals for few-shot accuracy, as the papers report them.

The papers (Vinyals 2016, Finn 2017, Snell 2017, Chen 2019) report the mean
accuracy over test episodes ± 1.96·std/√n, a normal-approximation 95 %
interval. With ≥ 100 episodes Student's t and the normal quantile agree to
< 1 %; we use Student's t so that small episode counts (tests, quick runs)
are not over-confident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _stats


@dataclass(frozen=True)
class MeanCI:
    """A mean with the half-width of its confidence interval."""

    mean: float
    ci: float  # half-width: the interval is mean ± ci
    n: int
    confidence: float

    @property
    def low(self) -> float:
        """Lower end of the interval."""
        return self.mean - self.ci

    @property
    def high(self) -> float:
        """Upper end of the interval."""
        return self.mean + self.ci

    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        """'98.12 ± 0.35' (accuracy in percent by default)."""
        return f"{self.mean * scale:.{digits}f} ± {self.ci * scale:.{digits}f}"


def mean_ci(values: np.ndarray | list[float], confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence half-width of per-episode values.

    Args:
        values: one value per episode (e.g. accuracy in [0, 1]).
        confidence: e.g. 0.95.

    Returns:
        MeanCI; with one value the half-width is nan (no spread to estimate).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D array of per-episode values, got shape {x.shape}")
    n = int(x.size)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(mean, math.nan, n, confidence)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    q = float(_stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    return MeanCI(mean, q * sem, n, confidence)


def paired_difference(a: np.ndarray | list[float], b: np.ndarray | list[float], confidence: float = 0.95) -> MeanCI:
    """Mean and CI of the per-episode difference a − b (same episodes, same order).

    Pairing removes the episode-difficulty variance both methods share, so the
    interval is much tighter than comparing two independent intervals.
    """
    a_ = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    if a_.shape != b_.shape:
        raise ValueError(f"paired_difference needs the same episodes: shapes {a_.shape} and {b_.shape}")
    return mean_ci(a_ - b_, confidence)
