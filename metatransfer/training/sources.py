"""Source episodes from one or several datasets, mixed by weight.

Each episode comes from one domain. Global class ids (`Episode.classes`) are
offset per domain so that supervised baselines see disjoint label spaces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from metatransfer.data.store import SplitData
from metatransfer.episodes import Episode, EpisodeSampler


@dataclass(frozen=True)
class SourceSampler:
    """A seeded sampler over weighted source domains."""

    sample: Callable[[], Episode]
    num_classes: int
    domains: tuple[str, ...]


def mixed_source_sampler(
    splits: Sequence[SplitData],
    weights: Sequence[float],
    n_way: int,
    k_shot: int,
    n_query: int,
    seed: int,
    rotation_augment: bool,
) -> SourceSampler:
    """Build a sampler drawing each episode from one split, chosen by weight.

    Args:
        splits: the meta-train split of each source dataset.
        weights: non-negative sampling weights (normalised here).
        n_way, k_shot, n_query: the episode shape.
        seed: seeds the domain choice and every per-domain sampler.
        rotation_augment: rotations by 90° as new classes (x4 classes).

    Returns:
        SourceSampler with `num_classes` = total global classes over domains.
    """
    samplers = [
        EpisodeSampler(s, n_way, k_shot, n_query, seed=seed + 7919 * i, rotation_augment=rotation_augment)
        for i, s in enumerate(splits)
    ]
    factor = 4 if rotation_augment else 1
    sizes = [len(s.class_names) * factor for s in splits]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng(seed)

    def sample() -> Episode:
        i = int(rng.choice(len(samplers), p=p)) if len(samplers) > 1 else 0
        ep = samplers[i].sample()
        if offsets[i] and ep.classes is not None:
            ep = dataclasses.replace(ep, classes=ep.classes + offsets[i])
        return ep

    return SourceSampler(sample, int(sum(sizes)), tuple(s.dataset for s in splits))
