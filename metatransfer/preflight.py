"""Checks of params.yaml against the prepared data, before any long work starts.

`config.load_params` validates params.yaml on its own (keys, types, ranges,
algorithm names). Some mistakes only show against the data: an N-way larger
than the classes a split has, or K + Q larger than the images of its smallest
class. Without this check they surface minutes into a run, deep inside an
episode sampler; here every configured episode set and the meta-training
episode shape are checked from the manifests alone (no images are read), and
all problems are reported at once, each naming its params key and the values
that would work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from metatransfer.config import Params
from metatransfer.data.store import SPLIT_ORDER, load_manifest
from metatransfer.errors import ConfigError
from metatransfer.episodes import N_ROTATIONS


@dataclass(frozen=True)
class SplitShape:
    """What an episode request needs to know about one split."""

    dataset: str
    split: str
    classes: int
    min_per_class: int  # images in the smallest class
    smallest_class: str


def split_shapes(prepared_dir: str | Path, datasets: Iterable[str]) -> dict[tuple[str, str], SplitShape]:
    """Class counts and smallest class size of every split of `datasets`, from the manifests.

    Raises:
        DataError: a dataset is not prepared (the message lists those that are).
    """
    shapes: dict[tuple[str, str], SplitShape] = {}
    for dataset in sorted(set(datasets)):
        df = load_manifest(prepared_dir, dataset, validate=False)
        for split, rows in df.groupby("split"):
            counts = rows["class"].value_counts()
            shapes[(dataset, str(split))] = SplitShape(
                dataset, str(split), int(counts.size), int(counts.min()), str(counts.idxmin())
            )
    return shapes


def _request_problems(
    key: str, split_key: str, shape: SplitShape | None, where: str, n_way: int, k_max: int, n_query: int,
    rotation: bool, available_splits: list[str], k_key: str,
) -> list[str]:
    """Problems of one N-way K-shot Q-query request against one split (empty when it fits)."""
    if shape is None:
        return [f"{split_key}: {where} has no images; allowed: a split the dataset has "
                f"{available_splits} (or re-run `prepare` with more classes)"]
    out = []
    ways = shape.classes * (N_ROTATIONS if rotation else 1)
    if n_way > ways:
        extra = f" ({shape.classes} classes x {N_ROTATIONS} rotations)" if rotation else ""
        out.append(f"{key}.n_way: {n_way} but {where} has only {ways} classes{extra}; allowed: 2..{ways}")
    need = k_max + n_query
    if need > shape.min_per_class:
        room = shape.min_per_class - n_query
        allowed = (f"{k_key} <= {room} with n_query={n_query}, or n_query <= {shape.min_per_class - 1} with {k_key}=1"
                   if room >= 1 else f"n_query <= {shape.min_per_class - 1} with {k_key}=1")
        out.append(
            f"{key}: {k_key}={k_max} + n_query={n_query} = {need} images per class are needed but class "
            f"{shape.smallest_class!r} of {where} has only {shape.min_per_class}; allowed: "
            f"{k_key} + n_query <= {shape.min_per_class} ({allowed})"
        )
    return out


def check_episode_shapes(params: Params, prepared_dir: str | Path) -> None:
    """Check every configured episode request against the prepared data.

    Covers `episodes.sets.*` (each shot count), the meta-training episodes of
    every `meta_train.sources` dataset (with rotation augmentation) and the
    meta-val episodes (first source's meta_val split, no rotation).

    Args:
        params: validated params.
        prepared_dir: the prepared store (data/prepared).

    Raises:
        ConfigError: one line per problem, each naming the params key, what the
            data offers and the allowed values.
        DataError: a dataset the params name is not prepared.
    """
    datasets: list[str] = []
    if params.episodes is not None:
        datasets += [s.dataset for s in params.episodes.sets.values()]
    if params.meta_train is not None:
        datasets += [s.dataset for s in params.meta_train.sources]
    if not datasets:
        return
    shapes = split_shapes(prepared_dir, datasets)

    def splits_of(dataset: str) -> list[str]:
        return [s for s in SPLIT_ORDER if (dataset, s) in shapes]

    problems: list[str] = []
    if params.episodes is not None:
        for name, s in params.episodes.sets.items():
            problems += _request_problems(
                f"episodes.sets.{name}", f"episodes.sets.{name}.split", shapes.get((s.dataset, s.split)), f"{s.dataset}/{s.split}",
                s.n_way, max(s.shots), s.n_query, False, splits_of(s.dataset), "max(shots)",
            )
    m = params.meta_train
    if m is not None:
        for src in m.sources:
            problems += _request_problems(
                "meta_train", "meta_train.sources", shapes.get((src.dataset, "meta_train")), f"{src.dataset}/meta_train",
                m.n_way, m.k_shot, m.n_query, m.rotation_augment, splits_of(src.dataset), "k_shot",
            )
        first = m.sources[0].dataset
        problems += _request_problems(
            "meta_train", "meta_train.sources[0]", shapes.get((first, "meta_val")), f"{first}/meta_val (the meta-val episodes)",
            m.n_way, m.k_shot, m.n_query, False, splits_of(first), "k_shot",
        )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError(
            "params do not fit the prepared data:\n  - " + "\n  - ".join(unique)
            + "\nFix these keys in params.yaml (or prepare more data) and re-run."
        )


def check(params: Params, root: str | Path) -> None:
    """Everything to verify before a long stage starts (today: episode shapes vs data).

    Args:
        params: validated params.
        root: the project root (the prepared store is `params.data.prepared_dir` under it).

    Raises:
        ConfigError, DataError: see `check_episode_shapes`.
    """
    check_episode_shapes(params, Path(root) / params.data.prepared_dir)

