"""Episodes from several domains: one domain per episode, chosen by weight."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

from metatransfer.episodes.episode import Episode
from metatransfer.episodes.sampler import EpisodeSampler
from metatransfer.errors import ConfigError


class MixedSampler:
    """Multi-domain sampler: each episode comes whole from one domain chosen by weight.

    Args:
        samplers: (sampler, weight) pairs; weights >= 0, finite, not all 0.
            They are normalised, so (3, 1) means 75 % / 25 %.
        seed: seed of the domain choice (each sampler keeps its own seed).

    Raises:
        ConfigError: no samplers, or a negative / non-finite / all-zero weight.
    """

    def __init__(self, samplers: Sequence[tuple[EpisodeSampler, float]], seed: int) -> None:
        if not samplers:
            raise ConfigError("MixedSampler: needs at least one (sampler, weight) pair; got none")
        weights = []
        for i, (sampler, weight) in enumerate(samplers):
            w = float(weight)
            if not math.isfinite(w) or w < 0:
                raise ConfigError(
                    f"MixedSampler: weight of domain {i} ({sampler.dataset}/{sampler.split}) "
                    f"must be finite and >= 0; got {weight!r}"
                )
            weights.append(w)
        total = sum(weights)
        if total <= 0:
            raise ConfigError(f"MixedSampler: weights must not all be 0; got {weights}")
        self.samplers = [s for s, _ in samplers]
        self.weights = [w / total for w in weights]
        self._cumulative = list(itertools.accumulate(self.weights))
        self._rng = np.random.default_rng(seed)

    def sample_with_domain(self) -> tuple[int, Episode]:
        """Draw a domain by weight, then one episode from it.

        Returns:
            (domain index into `samplers`, episode).
        """
        u = float(self._rng.random())
        # min(): float rounding may leave the last cumulative weight at 0.9999...
        domain = min(bisect.bisect_right(self._cumulative, u), len(self.samplers) - 1)
        while self.weights[domain] == 0.0:  # u landed exactly on a boundary
            domain -= 1
        return domain, self.samplers[domain].sample()

    def sample(self) -> Episode:
        """Draw the next episode (from one domain chosen by weight)."""
        return self.sample_with_domain()[1]

    def __iter__(self) -> Iterator[Episode]:
        """Yield episodes forever."""
        while True:
            yield self.sample()

