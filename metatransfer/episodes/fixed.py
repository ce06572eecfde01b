"""Fixed evaluation episodes: indices into one split plus the split's fingerprint (saved by files.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from metatransfer.data.store import SplitData
from metatransfer.episodes.episode import N_ROTATIONS, Episode, assemble, rotate_ways, rotation_maps
from metatransfer.episodes.sampler import EpisodeSampler, kept_classes
from metatransfer.errors import EpisodeError


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
        min_images_per_class: the minimum that excluded `excluded_classes`
            (0: none; stored only when a class was excluded).
        excluded_classes: {class name: images} of the split's classes never
            drawn (fewer images than `min_images_per_class`); empty: none.
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
    min_images_per_class: int = 0
    excluded_classes: dict[str, int] = field(default_factory=dict)
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
            maps = rotation_maps(x.shape[2], x.shape[3])
            x = rotate_ways(x, rotations, self.k_shot, self.n_query, maps)
            global_ids = classes * N_ROTATIONS + rotations
        return assemble(
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
    min_images_per_class: int = 0,
    key: str = "min_images_per_class",
) -> FixedEpisodes:
    """Draw `n_episodes` episodes with an EpisodeSampler and keep only their indices.

    Args:
        split: the split to draw from.
        n_way, k_shot, n_query, seed, rotation_augment: as for EpisodeSampler.
        n_episodes: how many episodes (E >= 1).
        min_images_per_class: classes with fewer images are never drawn
            (`kept_classes`); they are recorded in `excluded_classes`. 0 (or a
            minimum no class falls under) draws exactly the episodes of the
            unrestricted sampler.
        key: the params key of `min_images_per_class`, for error messages.

    Returns:
        FixedEpisodes whose episode i equals the i-th sample of
        EpisodeSampler(split, n_way, k_shot, n_query, seed, rotation_augment, classes)
        with `classes` the kept classes.

    Raises:
        EpisodeError: as EpisodeSampler, n_episodes < 1, or too few classes
            left after the exclusion (naming `key`).
    """
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise EpisodeError(
            f"{split.dataset}/{split.split}: n_episodes must be an integer >= 1; got {n_episodes!r}"
        )
    keep, excluded = kept_classes(split, min_images_per_class, n_way, key, rotation_augment)
    sampler = EpisodeSampler(split, n_way, k_shot, n_query, seed, rotation_augment, classes=keep)
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
        min_images_per_class=int(min_images_per_class) if excluded else 0,
        excluded_classes=excluded,
    )

