"""Seeded, vectorised N-way K-shot Q-query episodes from one preloaded split, and the choice of classes
they may draw from (`small_classes`, `kept_classes`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from metatransfer.data.store import SplitData
from metatransfer.episodes.episode import N_ROTATIONS, Episode, assemble, rotate_ways, rotation_maps
from metatransfer.errors import DataError, EpisodeError

# Largest memory (bytes) spent on keeping the 4 rotations of a split resident
# (Omniglot background at 28x28: 60 MB); larger splits rotate per episode.
PREROTATE_MAX_BYTES = 1 << 29


def _validate_split(split: SplitData) -> None:
    """Raise DataError when `split` breaks the SplitData contract."""
    where = f"{split.dataset}/{split.split}"
    images, labels = split.images, split.labels
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        found = (
            f"{type(images).__name__} dtype={getattr(images, 'dtype', '?')} "
            f"ndim={getattr(images, 'ndim', '?')}"
        )
        raise DataError(
            f"{where}: images must be a uint8 numpy array (N, C, H, W); found {found}. "
            "Re-run the `prepare` stage."
        )
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{where}: labels must be a 1-d array with one entry per image "
            f"({images.shape[0]} images); found shape {getattr(labels, 'shape', '?')}. "
            "Re-run the `prepare` stage."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers; found dtype {labels.dtype}")
    n_classes = len(split.class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= n_classes))[0])
        raise DataError(
            f"{where}: label of image {bad} is {int(labels[bad])}, outside 0..{n_classes - 1} "
            f"({n_classes} class names). Re-run the `prepare` stage."
        )


class EpisodeSampler:
    """Seeded sampler of N-way K-shot Q-query episodes from one split.

    The split is converted once to a torch uint8 tensor plus a padded
    (classes, max images per class) index matrix; each episode is then a
    handful of vectorised tensor ops (one class draw, one argsort of random
    keys for the images of all ways, one gather, one float conversion), so no
    per-image work or file I/O happens per episode.

    Two samplers built with the same split and seed yield identical episode
    sequences: all randomness comes from the sampler's own numpy and torch
    generators, both seeded with `seed`.

    Args:
        split: the preloaded split (images uint8 (N, C, H, W), labels 0..C-1).
        n_way: classes per episode (N).
        k_shot: support images per class (K), >= 1.
        n_query: query images per class (Q), >= 0.
        seed: seed of this sampler's generators (an integer >= 0).
        rotation_augment: treat each (class, rotation by r*90 degrees) as a
            distinct class (4x classes); every image of that way is rotated.
        classes: class indices (within the split) episodes may draw from;
            None: every class. The others are never drawn and need not hold
            K + Q images (see `small_classes`). Global ids, stored indices and
            the split fingerprint stay those of the whole split.

    Raises:
        DataError: the split breaks the SplitData contract.
        EpisodeError: the request cannot be met (too many ways, too few images
            in some class, rotation of non-square images, bad sizes).
    """

    def __init__(
        self,
        split: SplitData,
        n_way: int,
        k_shot: int,
        n_query: int,
        seed: int,
        rotation_augment: bool = False,
        classes: Sequence[int] | None = None,
    ) -> None:
        _validate_split(split)
        where = f"{split.dataset}/{split.split}"
        _check_request(where, n_way, k_shot, n_query)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise EpisodeError(f"{where}: seed must be an integer >= 0; got {seed!r}")
        n_images, channels, height, width = split.images.shape
        n_classes = len(split.class_names)
        if rotation_augment and height != width:
            raise EpisodeError(
                f"{where}: rotation_augment needs square images; found {height}x{width}. "
                "Set rotation_augment to false for this dataset."
            )
        allowed = _allowed_classes(where, classes, n_classes)
        n_allowed = n_classes if allowed is None else int(allowed.size)
        available = n_allowed * (N_ROTATIONS if rotation_augment else 1)
        if n_way > available:
            extra = (
                f" ({n_allowed} classes x {N_ROTATIONS} rotations)" if rotation_augment else ""
            )
            kept = "" if allowed is None else f" (of {n_classes}) left after excluding small classes"
            raise EpisodeError(
                f"{where}: n_way={n_way} but the split has only {available} classes{extra}{kept}. "
                f"Lower n_way to at most {available} or use a split with more classes."
            )
        labels = np.asarray(split.labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=n_classes)
        per_way = k_shot + n_query
        drawn = np.zeros(n_classes, dtype=bool)
        drawn[np.arange(n_classes) if allowed is None else allowed] = True
        short = np.flatnonzero(drawn & (counts < per_way))
        if short.size:
            c = int(short[np.argmin(counts[short])])
            raise EpisodeError(
                f"{where}: class {split.class_names[c]!r} (index {c}) has {int(counts[c])} images "
                f"but k_shot={k_shot} + n_query={n_query} = {per_way} are needed per way "
                f"({short.size} of {n_allowed} classes have fewer than {per_way}). Lower "
                "k_shot/n_query, or exclude small classes (min_images_per_class)."
            )

        self.dataset = split.dataset
        self.split = split.split
        self.n_way = n_way
        self.k_shot = k_shot
        self.n_query = n_query
        self.seed = seed
        self.rotation_augment = rotation_augment
        self.n_classes = n_classes
        self.image_shape = (channels, height, width)
        self._n_ids = n_classes * (N_ROTATIONS if rotation_augment else 1)
        # Way ids episodes draw from (None: all of 0.._n_ids-1, the original
        # stream: a restriction must not change the draws of unrestricted sets).
        self._allowed_ids: np.ndarray | None = None
        if allowed is not None:
            self.drawn_classes = tuple(int(c) for c in allowed)
            self._allowed_ids = (
                (allowed[:, None] * N_ROTATIONS + np.arange(N_ROTATIONS)).reshape(-1)
                if rotation_augment else allowed
            )
        else:
            self.drawn_classes = tuple(range(n_classes))

        images = split.images
        if not images.flags.writeable:
            # torch.from_numpy refuses to share read-only (e.g. memory-mapped)
            # arrays without a warning; preloading copies once anyway.
            images = np.array(images, copy=True)
        self._images = torch.from_numpy(np.ascontiguousarray(images))
        self._n_images = n_images
        # Rotation: keep all four rotations of every image when that fits the
        # budget (one gather per episode, 3x faster than rotating per episode);
        # otherwise rotate the gathered images with a per-item pixel gather.
        self._rot_maps: torch.Tensor | None = None
        if rotation_augment:
            if N_ROTATIONS * self._images.nbytes <= PREROTATE_MAX_BYTES:
                self._images = torch.cat(
                    [torch.rot90(self._images, r, dims=(2, 3)) for r in range(N_ROTATIONS)]
                )
            else:
                self._rot_maps = rotation_maps(height, width)

        # Padded (classes, max_count) matrix of image indices, class members in
        # file order; padding slots get a sort key bias of 2 so that an argsort
        # of U[0,1) keys never picks them (every drawn class has >= per_way images).
        max_count = int(counts.max())
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(n_images) - starts[labels[order]]
        padded = np.zeros((n_classes, max_count), dtype=np.int64)
        padded[labels[order], rank] = order
        bias = (np.arange(max_count)[None, :] >= counts[:, None]).astype(np.float32) * 2.0
        if rotation_augment:
            # One row per way id `class * 4 + r`, so that the episode's way ids
            # index rows directly (no class/rotation split on the hot path).
            padded = np.repeat(padded, N_ROTATIONS, axis=0)
            bias = np.repeat(bias, N_ROTATIONS, axis=0)
        # Raw image indices per way id (what fixed episode files store) ...
        self._raw_index = torch.from_numpy(padded)
        # ... and the rows into self._images (offset into the pre-rotated copies).
        if rotation_augment and self._rot_maps is None:
            offsets = np.tile(np.arange(N_ROTATIONS, dtype=np.int64) * n_images, n_classes)
            self._image_index = torch.from_numpy(padded + offsets[:, None])
        else:
            self._image_index = self._raw_index
        self._max_count = max_count
        self._pad_bias = None if np.all(counts == max_count) else torch.from_numpy(bias)
        # Way-major (N, K+Q) draws → [support (class-major); query (class-major)].
        per_way = k_shot + n_query
        rows = torch.arange(n_way).unsqueeze(1) * per_way
        self._reorder = torch.cat(
            [
                (rows + torch.arange(k_shot)).reshape(-1),
                (rows + k_shot + torch.arange(n_query)).reshape(-1),
            ]
        )

        self._support_y = torch.arange(n_way).repeat_interleave(k_shot)
        self._query_y = torch.arange(n_way).repeat_interleave(n_query)
        # Two streams from the one seed: numpy picks the ways, torch the images.
        self._rng = np.random.default_rng(seed)
        self._generator = torch.Generator().manual_seed(seed)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw way ids (N,) and flat positions into the (ids, max_count) index matrices.

        Positions come out in [support; query] order, each part class-major.
        """
        # numpy's choice without replacement costs O(n_way) for large class
        # counts (Floyd's method); torch.randperm is O(classes): 3x slower
        # with rotation's 4x classes.
        if self._allowed_ids is None:
            ids = torch.from_numpy(self._rng.choice(self._n_ids, self.n_way, replace=False))
        else:
            pick = self._rng.choice(self._allowed_ids.size, self.n_way, replace=False)
            ids = torch.from_numpy(self._allowed_ids[pick])
        keys = torch.rand(self.n_way, self._max_count, generator=self._generator)
        if self._pad_bias is not None:
            keys += self._pad_bias[ids]
        # Without-replacement draw for all ways at once: argsort of random keys
        # (one randperm per class would cost N calls per episode).
        pos = keys.argsort(dim=1, stable=True)[:, : self.k_shot + self.n_query]
        flat = (pos + (ids * self._max_count).unsqueeze(1)).view(-1).index_select(0, self._reorder)
        return ids, flat

    def _split_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Way ids → (class indices, rotations); rotations are zeros without augmentation."""
        if self.rotation_augment:
            return ids // N_ROTATIONS, ids % N_ROTATIONS
        return ids, torch.zeros_like(ids)

    def sample_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the next episode as indices only (used by fixed evaluation sets).

        Consumes the generator exactly as `sample()` does, so a sampler's i-th
        draw is the same whichever of the two produced it.

        Returns:
            (classes, rotations, support_idx, query_idx): int64 (N,) class
            indices within the split, int64 (N,) rotations 0..3 (zeros without
            augmentation), int64 (N*K,) and (N*Q,) image indices, class-major.
        """
        ids, flat = self._draw()
        idx = torch.take(self._raw_index, flat)
        classes, rotations = self._split_ids(ids)
        n_support = self._support_y.shape[0]
        return classes, rotations, idx[:n_support], idx[n_support:]

    def sample(self) -> Episode:
        """Draw the next episode.

        Returns:
            An Episode: float32 images in [0, 1], support ordered class-major
            (labels [0]*K + [1]*K + ...), query likewise; `classes` holds the
            global ids (`class * 4 + rotation` with rotation augmentation).
        """
        ids, flat = self._draw()
        x = self._images.index_select(0, torch.take(self._image_index, flat))
        if self._rot_maps is not None:
            x = rotate_ways(x, ids % N_ROTATIONS, self.k_shot, self.n_query, self._rot_maps)
        return assemble(x, self._support_y, self._query_y, ids)

    def __iter__(self) -> Iterator[Episode]:
        """Yield episodes forever (the caller decides how many to take)."""
        while True:
            yield self.sample()


def _allowed_classes(where: str, classes: Sequence[int] | None, n_classes: int) -> np.ndarray | None:
    """`classes` as sorted unique int64 indices (None stays None); EpisodeError when out of range."""
    if classes is None:
        return None
    allowed = np.unique(np.asarray(list(classes), dtype=np.int64))
    if allowed.size and (allowed[0] < 0 or allowed[-1] >= n_classes):
        raise EpisodeError(
            f"{where}: classes must be class indices 0..{n_classes - 1}; found {sorted(set(classes))}"
        )
    return allowed


def small_classes(split: SplitData, minimum: int) -> dict[str, int]:
    """Classes of `split` with fewer than `minimum` images (the `min_images_per_class` keys).

    Args:
        split: the split.
        minimum: images a class needs to be kept; <= 0 keeps every class.

    Returns:
        {class name: images} of the classes to exclude, in label order (empty
        when none).
    """
    if minimum <= 0:
        return {}
    counts = np.bincount(np.asarray(split.labels, dtype=np.int64), minlength=len(split.class_names))
    return {name: int(n) for name, n in zip(split.class_names, counts) if n < minimum}


def kept_classes(
    split: SplitData, minimum: int, n_way: int, key: str, rotation_augment: bool = False
) -> tuple[list[int] | None, dict[str, int]]:
    """The classes episodes may draw from once those under `minimum` images are excluded.

    Args:
        split: the split.
        minimum: the `min_images_per_class` value (<= 0: keep every class).
        n_way: ways per episode; at least that many ways must remain.
        key: the params key of `minimum`, for the error message.
        rotation_augment: each kept class offers 4 ways.

    Returns:
        (class indices for EpisodeSampler's `classes`, None when nothing is
        excluded; the excluded {class name: images} from `small_classes`).

    Raises:
        EpisodeError: fewer than n_way ways remain; names `key`.
    """
    excluded = small_classes(split, minimum)
    if not excluded:
        return None, {}
    keep = [i for i, name in enumerate(split.class_names) if name not in excluded]
    ways = len(keep) * (N_ROTATIONS if rotation_augment else 1)
    if ways < n_way:
        listed = ", ".join(f"{name} ({n})" for name, n in excluded.items())
        rot = f" x {N_ROTATIONS} rotations" if rotation_augment else ""
        raise EpisodeError(
            f"{key}: {minimum} excludes {len(excluded)} of {len(split.class_names)} classes of "
            f"{split.dataset}/{split.split} ({listed}), leaving {len(keep)} classes{rot} = {ways} ways "
            f"but n_way is {n_way}. Lower {key} (or n_way), or add images to the small classes."
        )
    return keep, excluded


def _check_request(where: str, n_way: int, k_shot: int, n_query: int) -> None:
    """Raise EpisodeError for non-positive or non-integer episode sizes."""
    for name, value, low in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("n_query", n_query, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise EpisodeError(f"{where}: {name} must be an integer >= {low}; got {value!r}")

