"""Seeded N-way K-shot Q-query episode construction.

The `Episode` container is the contract every algorithm uses. Below it:

- `EpisodeSampler`: seeded, vectorised episodes from one preloaded split,
  optionally with the Omniglot rotation augmentation (4x classes).
- `MixedSampler`: episodes from several domains, one domain per episode,
  chosen by weight.
- `build_fixed_episodes` / `save_fixed_episodes` / `load_fixed_episodes`:
  fixed evaluation sets stored as indices plus a fingerprint of the split,
  written byte-for-byte deterministically.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from metatransfer.data.store import SplitData
from metatransfer.errors import ConfigError, DataError, EpisodeError


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task.

    Attributes:
        support_x: float32 images (N*K, C, H, W) scaled to [0, 1].
        support_y: int64 labels (N*K,) in 0..N-1.
        query_x: float32 images (N*Q, C, H, W).
        query_y: int64 labels (N*Q,) in 0..N-1.
        n_way: N, the number of classes in this task.
        classes: int64 (N,) global class ids (within the sampled split; with
            rotation augmentation the id is `class * 4 + rotation`) of ways
            0..N-1, so that supervised baselines can map local labels to
            global ones: `classes[support_y]`. None when unknown.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    n_way: int
    classes: torch.Tensor | None = None


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------

# Rotation augmentation (the standard Omniglot protocol of Santoro 2016 /
# Finn 2017): every (class, k*90 degrees) pair is its own class, so a split of
# C classes offers 4*C ways and way id `class * 4 + k`.
N_ROTATIONS = 4
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


def _rotation_maps(height: int, width: int) -> torch.Tensor:
    """Flat pixel permutations (4, H*W): `flat[..., maps[r]]` equals torch.rot90(img, r).

    One gather with these maps rotates a whole batch, each item by its own
    angle, instead of one rot90 call per way.
    """
    grid = torch.arange(height * width).view(height, width)
    return torch.stack([torch.rot90(grid, r, dims=(0, 1)).reshape(-1) for r in range(N_ROTATIONS)])


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]; division (not multiplication by 1/255) keeps 255 → exactly 1.0."""
    return x.to(torch.float32).div_(255.0)


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
        available = n_classes * (N_ROTATIONS if rotation_augment else 1)
        if n_way > available:
            extra = (
                f" ({n_classes} classes x {N_ROTATIONS} rotations)" if rotation_augment else ""
            )
            raise EpisodeError(
                f"{where}: n_way={n_way} but the split has only {available} classes{extra}. "
                f"Lower n_way to at most {available} or use a split with more classes."
            )
        labels = np.asarray(split.labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=n_classes)
        per_way = k_shot + n_query
        short = np.flatnonzero(counts < per_way)
        if short.size:
            c = int(short[np.argmin(counts[short])])
            raise EpisodeError(
                f"{where}: class {split.class_names[c]!r} (index {c}) has {int(counts[c])} images "
                f"but k_shot={k_shot} + n_query={n_query} = {per_way} are needed per way "
                f"({short.size} of {n_classes} classes have fewer than {per_way}). Lower "
                "k_shot/n_query or drop small classes in `prepare`."
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
        self._n_ids = available

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
                self._rot_maps = _rotation_maps(height, width)

        # Padded (classes, max_count) matrix of image indices, class members in
        # file order; padding slots get a sort key bias of 2 so that an argsort
        # of U[0,1) keys never picks them (every class has >= per_way images).
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
        ids = torch.from_numpy(self._rng.choice(self._n_ids, self.n_way, replace=False))
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
            x = _rotate_ways(x, ids % N_ROTATIONS, self.k_shot, self.n_query, self._rot_maps)
        return _assemble(x, self._support_y, self._query_y, ids)

    def __iter__(self) -> Iterator[Episode]:
        """Yield episodes forever (the caller decides how many to take)."""
        while True:
            yield self.sample()


def _check_request(where: str, n_way: int, k_shot: int, n_query: int) -> None:
    """Raise EpisodeError for non-positive or non-integer episode sizes."""
    for name, value, low in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("n_query", n_query, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise EpisodeError(f"{where}: {name} must be an integer >= {low}; got {value!r}")


def _rotate_ways(
    x: torch.Tensor, rotations: torch.Tensor, k_shot: int, n_query: int, rot_maps: torch.Tensor
) -> torch.Tensor:
    """Rotate gathered uint8 images [support; query] (class-major) way by way.

    Args:
        x: uint8 (N*K + N*Q, C, H, W).
        rotations: int64 (N,) rotation 0..3 of each way.
        k_shot, n_query: items per way in the support and query parts.
        rot_maps: (4, H*W) flat rotation maps from _rotation_maps.

    Returns:
        x with item j rotated by torch.rot90(..., rotations[way of j], dims=(-2, -1)).
    """
    per_item = torch.cat([rotations.repeat_interleave(k_shot), rotations.repeat_interleave(n_query)])
    b, c, h, w = x.shape
    flat_idx = rot_maps.index_select(0, per_item).unsqueeze(1).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, flat_idx).view(b, c, h, w)


def _assemble(
    x: torch.Tensor,
    support_y: torch.Tensor,
    query_y: torch.Tensor,
    global_ids: torch.Tensor,
) -> Episode:
    """Build an Episode from gathered (already rotated) uint8 images [support; query].

    Args:
        x: uint8 (N*K + N*Q, C, H, W), support items first, class-major.
        support_y, query_y: labels, cloned so callers may modify them freely.
        global_ids: int64 (N,) global way ids (`class * 4 + rotation` with rotation).
    """
    n_support = support_y.shape[0]
    xf = _to_float(x)
    return Episode(
        support_x=xf[:n_support],
        support_y=support_y.clone(),
        query_x=xf[n_support:],
        query_y=query_y.clone(),
        n_way=int(global_ids.shape[0]),
        classes=global_ids,
    )


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


# --------------------------------------------------------------------------
# Fixed evaluation episodes
# --------------------------------------------------------------------------

FIXED_FORMAT = "metatransfer.fixed_episodes/1"
_ARRAYS = ("classes", "rotations", "support_idx", "query_idx")
# A fixed timestamp and attributes make the zip bytes depend on content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def split_fingerprint(split: SplitData) -> str:
    """SHA-256 over a split's image shape, images, labels and class names.

    Any change to the prepared data (a re-encoded image, a dropped or
    relabelled class) changes it, so stored episode indices can be checked
    against the data they are applied to.

    Returns:
        64 hex characters.
    """
    h = hashlib.sha256()
    images = np.ascontiguousarray(split.images)
    labels = np.ascontiguousarray(split.labels, dtype=np.int64)
    h.update(f"images {images.dtype.str} {images.shape}\n".encode())
    h.update(memoryview(images).cast("B"))
    h.update(f"labels {labels.shape}\n".encode())
    h.update(labels.astype("<i8", copy=False).tobytes())
    h.update(("classes\n" + "\n".join(split.class_names)).encode("utf-8"))
    return h.hexdigest()


# eq=False: field-wise == on numpy arrays is ambiguous; compare fields explicitly.
@dataclass(frozen=True, eq=False)
class FixedEpisodes:
    """A fixed set of evaluation episodes, stored as indices into one split.

    Attributes:
        dataset, split: the split the indices refer to.
        n_way, k_shot, n_query, seed, rotation_augment: how they were drawn.
        fingerprint: split_fingerprint() of that split.
        classes: int64 (E, N) class index (within the split) of each way.
        rotations: int64 (E, N) rotation 0..3 of each way (zeros without augmentation).
        support_idx: int64 (E, N*K) image indices, class-major.
        query_idx: int64 (E, N*Q) image indices, class-major.
        source: file it was loaded from (for messages; not stored).
    """

    dataset: str
    split: str
    n_way: int
    k_shot: int
    n_query: int
    seed: int
    rotation_augment: bool
    fingerprint: str
    classes: np.ndarray
    rotations: np.ndarray
    support_idx: np.ndarray
    query_idx: np.ndarray
    source: str | None = None
    # Splits already checked against `fingerprint` (held by reference so a
    # re-used id() can never pass as checked).
    _checked: list[SplitData] = field(default_factory=list, init=False, repr=False)

    def __len__(self) -> int:
        """Number of episodes E."""
        return int(self.classes.shape[0])

    def check_split(self, split: SplitData) -> None:
        """Verify that `split` is the data these indices were drawn from.

        Raises:
            EpisodeError: another dataset/split, or the data changed since
                (fingerprint mismatch); the message says to re-run `episodes`.
        """
        if any(s is split for s in self._checked):
            return
        origin = f" in {self.source}" if self.source else ""
        if (split.dataset, split.split) != (self.dataset, self.split):
            raise EpisodeError(
                f"fixed episodes{origin} were built for {self.dataset}/{self.split}, "
                f"not {split.dataset}/{split.split}. Load the matching episode file."
            )
        found = split_fingerprint(split)
        if found != self.fingerprint:
            raise EpisodeError(
                f"fixed episodes{origin} were built from {self.dataset}/{self.split} with "
                f"fingerprint {self.fingerprint[:16]}..., but the split now has "
                f"{found[:16]}...: the data changed since. Re-run the `episodes` stage "
                "(e.g. `dvc repro episodes`)."
            )
        self._checked.append(split)

    def materialise(self, i: int, split: SplitData) -> Episode:
        """Episode `i` with its images taken from `split`.

        Args:
            i: episode number, 0 <= i < len(self) (negative counts from the end).
            split: the split the set was built from (checked by fingerprint
                on first use).

        Returns:
            The Episode, identical to the i-th `sample()` of an EpisodeSampler
            with the same split, sizes and seed.

        Raises:
            IndexError: i out of range.
            EpisodeError: see check_split.
        """
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range: the set has {n} episodes")
        self.check_split(split)
        idx = np.concatenate([self.support_idx[i], self.query_idx[i]])
        # Numpy fancy indexing copies only the needed images (cheap on a memmap).
        x = torch.from_numpy(np.ascontiguousarray(split.images[idx]))
        classes = torch.from_numpy(self.classes[i].copy())
        global_ids = classes
        if self.rotation_augment:
            rotations = torch.from_numpy(self.rotations[i].copy())
            maps = _rotation_maps(x.shape[2], x.shape[3])
            x = _rotate_ways(x, rotations, self.k_shot, self.n_query, maps)
            global_ids = classes * N_ROTATIONS + rotations
        return _assemble(
            x,
            torch.arange(self.n_way).repeat_interleave(self.k_shot),
            torch.arange(self.n_way).repeat_interleave(self.n_query),
            global_ids,
        )

    def iter_episodes(self, split: SplitData) -> Iterator[Episode]:
        """Yield every episode of the set in order (the split is checked once)."""
        self.check_split(split)
        for i in range(len(self)):
            yield self.materialise(i, split)


def build_fixed_episodes(
    split: SplitData,
    n_way: int,
    k_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int,
    rotation_augment: bool = False,
) -> FixedEpisodes:
    """Draw `n_episodes` episodes with an EpisodeSampler and keep only their indices.

    Args:
        split: the split to draw from.
        n_way, k_shot, n_query, seed, rotation_augment: as for EpisodeSampler.
        n_episodes: how many episodes (E >= 1).

    Returns:
        FixedEpisodes whose episode i equals the i-th sample of
        EpisodeSampler(split, n_way, k_shot, n_query, seed, rotation_augment).

    Raises:
        EpisodeError: as EpisodeSampler, or n_episodes < 1.
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise EpisodeError(
            f"{split.dataset}/{split.split}: n_episodes must be an integer >= 1; got {n_episodes!r}"
        )
    sampler = EpisodeSampler(split, n_way, k_shot, n_query, seed, rotation_augment)
    draws = [sampler.sample_indices() for _ in range(n_episodes)]
    stacked = [torch.stack([d[j] for d in draws]).numpy().astype(np.int64) for j in range(4)]
    return FixedEpisodes(
        dataset=split.dataset,
        split=split.split,
        n_way=n_way,
        k_shot=k_shot,
        n_query=n_query,
        seed=seed,
        rotation_augment=rotation_augment,
        fingerprint=split_fingerprint(split),
        classes=stacked[0],
        rotations=stacked[1],
        support_idx=stacked[2],
        query_idx=stacked[3],
    )


def _meta(fe: FixedEpisodes) -> dict[str, object]:
    """The JSON-able metadata of a FixedEpisodes (everything but the arrays)."""
    return {
        "format": FIXED_FORMAT,
        "dataset": fe.dataset,
        "split": fe.split,
        "n_way": int(fe.n_way),
        "k_shot": int(fe.k_shot),
        "n_query": int(fe.n_query),
        "seed": int(fe.seed),
        "rotation_augment": bool(fe.rotation_augment),
        "fingerprint": fe.fingerprint,
        "n_episodes": len(fe),
    }


def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A ZipInfo with fixed time, system and permissions (byte-identical files)."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, whatever platform writes it
    info.external_attr = 0o644 << 16
    return info


def save_fixed_episodes(fe: FixedEpisodes, path: str | os.PathLike[str]) -> Path:
    """Write `fe` to `path` deterministically and atomically.

    The file is a zip readable by `np.load` (one .npy per array plus
    meta.json), but written with fixed timestamps and attributes, so the same
    episodes always give the same bytes (np.savez stamps the current time).
    It is written to a temporary file beside `path` and moved into place, so
    a crash never leaves a half-written file.

    Args:
        fe: the episode set.
        path: destination (parent folders are created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_meta(fe), sort_keys=True, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w") as zf:
                zf.writestr(_zip_entry("meta.json"), meta.encode("utf-8"))
                for name in _ARRAYS:
                    buf = io.BytesIO()
                    arr = np.ascontiguousarray(getattr(fe, name), dtype="<i8")
                    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
                    zf.writestr(_zip_entry(f"{name}.npy"), buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_fixed_episodes(
    path: str | os.PathLike[str], split: SplitData | None = None
) -> FixedEpisodes:
    """Read a file written by save_fixed_episodes.

    Args:
        path: the file.
        split: if given, checked against the stored fingerprint now
            (otherwise on first materialise).

    Returns:
        The FixedEpisodes (with `source` set to `path`).

    Raises:
        EpisodeError: missing, unreadable or inconsistent file (re-run the
            `episodes` stage), or a split that does not match.
    """
    path = Path(path)
    rerun = "Re-run the `episodes` stage (e.g. `dvc repro episodes`)."
    if not path.is_file():
        raise EpisodeError(f"{path}: no fixed episode file there. {rerun}")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json").decode("utf-8"))
            arrays = {}
            for name in _ARRAYS:
                with zf.open(f"{name}.npy") as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise EpisodeError(f"{path}: not a readable fixed episode file ({exc}). {rerun}") from exc
    if meta.get("format") != FIXED_FORMAT:
        raise EpisodeError(
            f"{path}: format {meta.get('format')!r}, expected {FIXED_FORMAT!r}. {rerun}"
        )
    fe = FixedEpisodes(
        dataset=meta["dataset"],
        split=meta["split"],
        n_way=meta["n_way"],
        k_shot=meta["k_shot"],
        n_query=meta["n_query"],
        seed=meta["seed"],
        rotation_augment=meta["rotation_augment"],
        fingerprint=meta["fingerprint"],
        source=str(path),
        **arrays,
    )
    e, n = meta["n_episodes"], fe.n_way
    expected = {
        "classes": (e, n),
        "rotations": (e, n),
        "support_idx": (e, n * fe.k_shot),
        "query_idx": (e, n * fe.n_query),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise EpisodeError(
                f"{path}: {name} has shape {arrays[name].shape}, expected {shape}. {rerun}"
            )
    if split is not None:
        fe.check_split(split)
    return fe
