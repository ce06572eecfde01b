"""Source episodes from one or several datasets, mixed by weight.

Each episode comes from one domain. Global class ids (`Episode.classes`) are
offset per domain so that supervised baselines see disjoint label spaces.

Every source may have its own episode shape (`meta_train.sources[i].k_shot` /
`.n_query`, default the meta_train values; n_way is shared) and its own
minimum images per class (`.min_images_per_class`): a faces source with 10
images per class need not force a smaller query set on Omniglot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metatransfer.config import MetaTrainParams, SourceMixParams
from metatransfer.data.store import SplitData
from metatransfer.episodes import Episode, EpisodeSampler, FixedEpisodes, build_fixed_episodes, kept_classes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSampler:
    """A seeded sampler over weighted source domains.

    Attributes:
        sample: draws the next episode.
        num_classes: global classes over all domains (every class of every
            split, excluded ones included, so ids do not depend on exclusions).
        domains: the dataset of each domain.
        shapes: (k_shot, n_query) of each domain's episodes.
        excluded: {class name: images} never drawn, per domain.
        class_ranges: per domain, its [start, end) of global class ids (which
            domain an episode came from: `Episode.classes`).
    """

    sample: Callable[[], Episode]
    num_classes: int
    domains: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...] = ()
    excluded: tuple[dict[str, int], ...] = ()
    class_ranges: tuple[tuple[int, int], ...] = ()


def source_shape(m: MetaTrainParams, source: SourceMixParams) -> tuple[int, int]:
    """(k_shot, n_query) of one source's episodes: its own keys, else meta_train's."""
    k = m.k_shot if source.k_shot is None else source.k_shot
    q = m.n_query if source.n_query is None else source.n_query
    return k, q


def _per_source(value: int | Sequence[int], n: int, name: str) -> list[int]:
    """One int per source: a single int repeated, or a sequence of exactly `n`."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: expected one value per source ({n}), found {len(values)}: {values}")
    return values


def mixed_source_sampler(
    splits: Sequence[SplitData],
    weights: Sequence[float],
    n_way: int,
    k_shot: int | Sequence[int],
    n_query: int | Sequence[int],
    seed: int,
    rotation_augment: bool,
    classes: Sequence[Sequence[int] | None] | None = None,
) -> SourceSampler:
    """Build a sampler drawing each episode from one split, chosen by weight.

    Args:
        splits: the meta-train split of each source dataset.
        weights: non-negative sampling weights (normalised here).
        n_way: ways per episode (shared by every source).
        k_shot, n_query: the episode shape: one int for every source, or one
            per source (a meta-batch may then mix support and query sizes).
        seed: seeds the domain choice and every per-domain sampler.
        rotation_augment: rotations by 90° as new classes (x4 classes).
        classes: per source, the class indices its episodes may draw from
            (None: all; see `episodes.kept_classes`).

    Returns:
        SourceSampler with `num_classes` = total global classes over domains.
    """
    shots = _per_source(k_shot, len(splits), "k_shot")
    queries = _per_source(n_query, len(splits), "n_query")
    allowed = list(classes) if classes is not None else [None] * len(splits)
    samplers = [
        EpisodeSampler(s, n_way, k, q, seed=seed + 7919 * i, rotation_augment=rotation_augment, classes=c)
        for i, (s, k, q, c) in enumerate(zip(splits, shots, queries, allowed))
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

    ranges = tuple((int(o), int(o) + int(n)) for o, n in zip(offsets, sizes))
    return SourceSampler(sample, int(sum(sizes)), tuple(s.dataset for s in splits), tuple(zip(shots, queries)),
                         class_ranges=ranges)


def _warn_excluded(key: str, split: SplitData, minimum: int, excluded: dict[str, int]) -> None:
    """The one WARNING line of an exclusion: which classes, with how many images."""
    log.warning("%s: %d of %d classes of %s/%s have fewer than %d images and are excluded: %s",
                key, len(excluded), len(split.class_names), split.dataset, split.split, minimum,
                ", ".join(f"{name} ({n})" for name, n in excluded.items()))


def meta_train_sampler(m: MetaTrainParams, splits: Sequence[SplitData], seed: int) -> SourceSampler:
    """The meta-training episode sampler of the params: every source with its own shape and minimum.

    With none of the per-source keys set it is exactly
    `mixed_source_sampler(splits, weights, n_way, k_shot, n_query, seed, rotation_augment)`
    (same episodes, same random streams).

    Args:
        m: the meta_train params.
        splits: the meta_train split of each of `m.sources`, in order.
        seed: the global seed.

    Returns:
        The SourceSampler (its `excluded` lists what each source left out).

    Raises:
        EpisodeError: a source's minimum leaves fewer than n_way ways (names
            `meta_train.sources[i].min_images_per_class`), or a shape the
            split cannot meet.
    """
    shapes = [source_shape(m, s) for s in m.sources]
    classes: list[list[int] | None] = []
    excluded: list[dict[str, int]] = []
    for i, (src, split) in enumerate(zip(m.sources, splits)):
        key = f"meta_train.sources[{i}].min_images_per_class"
        keep, out = kept_classes(split, src.min_images_per_class, m.n_way, key, m.rotation_augment)
        if out:
            _warn_excluded(key, split, src.min_images_per_class, out)
        classes.append(keep)
        excluded.append(out)
    sampler = mixed_source_sampler(
        splits, [s.weight for s in m.sources], m.n_way, [k for k, _ in shapes], [q for _, q in shapes],
        seed, m.rotation_augment, classes=classes,
    )
    return dataclasses.replace(sampler, excluded=tuple(excluded))


def give_descriptions(learner: object, sampler: SourceSampler, descriptions: Sequence[Mapping[str, str] | None]) -> bool:
    """Hand the sources' task descriptions to a learner conditioned on them (the `conditional` learner).

    The learner builds its vocabulary from them, finds each episode's source
    from its global class ids (`sampler.class_ranges`), and conditions `adapt`
    (the meta-val episodes, from the first source) on the first source's
    description. Other learners are left alone.

    Args:
        learner: the learner (one with `set_source_descriptions` is conditioned).
        sampler: the meta-training sampler (its per-source class ranges).
        descriptions: per source, its description (`descriptions.read_description`) or None.

    Returns:
        True when the learner takes descriptions.
    """
    if not hasattr(learner, "set_source_descriptions"):
        return False
    if len(descriptions) != len(sampler.class_ranges):
        raise ValueError(f"descriptions: expected one per source ({len(sampler.class_ranges)}), found {len(descriptions)}")
    learner.set_vocabulary(descriptions)  # type: ignore[attr-defined]
    learner.set_source_descriptions(sampler.class_ranges, descriptions)  # type: ignore[attr-defined]
    learner.set_description(descriptions[0] if descriptions else None)  # type: ignore[attr-defined]
    return True


def meta_val_episodes(m: MetaTrainParams, val_split: SplitData, seed: int) -> FixedEpisodes:
    """The fixed meta-val episodes: `m.val_episodes` from the first source's meta_val split.

    They take the first source's shape and minimum images per class (the
    split belongs to that source); without per-source keys this is
    `build_fixed_episodes(val_split, n_way, k_shot, n_query, val_episodes, seed)`.

    Raises:
        EpisodeError: as `build_fixed_episodes` (the key named is
            `meta_train.sources[0].min_images_per_class`).
    """
    first = m.sources[0]
    k, q = source_shape(m, first)
    key = "meta_train.sources[0].min_images_per_class"
    fixed = build_fixed_episodes(val_split, m.n_way, k, q, m.val_episodes, seed,
                                 min_images_per_class=first.min_images_per_class, key=key)
    if fixed.excluded_classes:
        _warn_excluded(key, val_split, first.min_images_per_class, fixed.excluded_classes)
    return fixed
