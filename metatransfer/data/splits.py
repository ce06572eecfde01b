"""The splits of each dataset kind (and its role, source or target) for prepare.

Splits (deterministic given `seed`; each dataset draws from its own stream,
seeded by (seed, crc32(dataset)), so adding a dataset changes no other):

* Omniglot (npz, official zips, small zips), a *source*:
  "background_evaluation": background characters -> meta_train, minus
  ``meta_val_classes`` of them -> meta_val; evaluation characters ->
  meta_test. "vinyals": all characters in official order (omniglot_char_id;
  for zips, sorted paths), the first 1200 -> meta_train (minus
  meta_val_classes -> meta_val), the rest -> meta_test. omniglot_small has
  only background alphabets (small1 and small2 share Greek and Latin; those
  images are imported once), so it has no meta_test.
* KMNIST, a near *source* domain: all 10 classes -> meta_train (too few
  classes to hold any out; meta_val_classes does not apply).
* MedMNIST, a *target*: the official train/val/test splits are kept.
* mini-ImageNet (csv layout), a *source*: train.csv/val.csv/test.csv ->
  meta_train/meta_val/meta_test as given (class-disjoint Ravi & Larochelle
  split; meta_val_classes does not apply).
* brain_tumor_mri, ham10000_mel_nv (split/class folders), *targets*: test
  (Testing/) kept as given; a val folder is kept when there is one; else val
  is carved from each class's train images (round(val_fraction * n), seeded
  permutation per class in sorted class order, at least one stays in train).
* ImageFolder (params.image_folders), layout class or domain/class: role
  "source" -> classes shuffled and cut by split_fractions into
  meta_train/meta_val/meta_test; role "target" -> each class's images
  shuffled and cut by split_fractions into train/val/test. Cuts use largest
  remainders, so counts sum exactly. Layout split/class (detected by "auto"
  from train|training|val|valid|validation|test|testing top-level folders):
  the given split is kept as above (role target: val carved by val_fraction;
  role source: the split folders must be class-disjoint, and without a val
  folder round(val_fraction * classes) train classes go to meta_val).
* A user's npz (params.npz_files, MedMNIST layout), checked against its
  params sha256 first: role "target" -> the file's train/val/test kept as
  given, val carved by val_fraction when the file has none (as split/class
  folders); role "source" -> all images pooled, classes shuffled and cut by
  split_fractions into meta_train/meta_val/meta_test (as ImageFolder). The
  sha256 is recorded in report.json as the dataset's data version.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd

from metatransfer.config import PrepareParams
from metatransfer.data.schemas import META_SPLITS, TARGET_SPLITS
from metatransfer.data.sources import get_source
from metatransfer.errors import DataError

log = logging.getLogger(__name__)

VINYALS_TRAIN_CLASSES = 1200
# the order of the splits in the store (each one contiguous block of rows); duplicates keep the highest copy
SPLIT_RANK = {"meta_train": 0, "meta_val": 1, "meta_test": 2, "train": 0, "val": 1, "test": 2}


def _rng(seed: int, dataset: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(dataset.encode())])


def _cut(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder counts for n items over three fractions (sum exactly n)."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    rest = n - sum(counts)
    for i in sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))[:rest]:
        counts[i] += 1
    return counts


def _meta_splits_for(classes: list[str], n_val: int, test: set[str], rng: np.random.Generator,
                     dataset: str) -> dict[str, str]:
    pool = [c for c in classes if c not in test]
    if n_val >= len(pool) and n_val > 0:
        raise DataError(f"prepare.meta_val_classes={n_val} but {dataset} has only {len(pool)} meta-train "
                        "classes to draw from; lower prepare.meta_val_classes.")
    val = {pool[i] for i in rng.choice(len(pool), size=n_val, replace=False)} if n_val else set()
    return {c: ("meta_test" if c in test else "meta_val" if c in val else "meta_train") for c in classes}


def _given_splits(dataset: str, meta: pd.DataFrame, role: str, val_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Splits of a split/class tree: test (and val) as given; val carved from train when absent.

    Target: per class, round(val_fraction * n_train) of its train images (seeded
    permutation, at least one image stays in train) move to val. Source: the
    split folders must be class-disjoint; round(val_fraction * classes) train
    classes move to meta_val when there is no val folder.
    """
    origin = meta["origin"].to_numpy(dtype=object)
    has_val = (origin == "val").any()
    if role == "target":
        split = origin.copy()
        if has_val or val_fraction <= 0:
            return split
        train = meta[meta["origin"] == "train"]
        for _, rows in train.groupby("class", sort=True).groups.items():
            rows = np.sort(np.asarray(rows))
            n_val = min(int(np.floor(len(rows) * val_fraction + 0.5)), len(rows) - 1)
            if n_val > 0:
                split[rows[rng.permutation(len(rows))[:n_val]]] = "val"
        return split
    per_class = meta.groupby("class")["origin"].unique()
    clash = {c: sorted(v) for c, v in per_class.items() if len(v) > 1}
    if clash:
        shown = ", ".join(f"{c} in {v}" for c, v in list(clash.items())[:10])
        raise DataError(f"dataset {dataset}: role source needs class-disjoint split folders, but {len(clash)} class(es) "
                        f"appear in several: {shown}. Use role target, or layout class (classes are then split by "
                        "split_fractions).")
    mapping = {c: dict(zip(TARGET_SPLITS, META_SPLITS))[v[0]] for c, v in per_class.items()}
    if not has_val and val_fraction > 0:
        pool = sorted(c for c, s in mapping.items() if s == "meta_train")
        n_val = min(int(np.floor(len(pool) * val_fraction + 0.5)), max(len(pool) - 1, 0))
        for j in rng.permutation(len(pool))[:n_val]:
            mapping[pool[j]] = "meta_val"
    return meta["class"].map(mapping).to_numpy(dtype=object)


def _class_splits(meta: pd.DataFrame, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Role source without given meta splits: the sorted classes shuffled and cut by `fractions` (largest
    remainders) into meta_train/meta_val/meta_test; every image follows its class."""
    classes = sorted(set(meta["class"]))
    perm = rng.permutation(len(classes))
    counts = _cut(len(classes), fractions)
    names = [META_SPLITS[0]] * counts[0] + [META_SPLITS[1]] * counts[1] + [META_SPLITS[2]] * counts[2]
    mapping = {classes[j]: names[k] for k, j in enumerate(perm)}
    return meta["class"].map(mapping).to_numpy(dtype=object)


def assign_splits(dataset: str, kind: str, meta: pd.DataFrame, class_order: tuple[str, ...],
                  params: PrepareParams, seed: int) -> tuple[np.ndarray, str]:
    """Split every row of an imported dataset.

    Args:
        dataset: dataset name.
        kind: importer kind.
        meta: one row per image (needs columns class, origin; a RangeIndex).
        class_order: classes in official order (Omniglot "vinyals").
        params: prepare params (protocol, meta_val_classes, image_folders).
        seed: the project seed.

    Returns:
        (split per row, role "source" or "target").

    Raises:
        DataError: meta_val_classes larger than the meta-train pool.
    """
    rng = _rng(seed, dataset)
    if kind in ("omniglot_npz", "omniglot_zip"):
        order = list(class_order)
        if params.omniglot_protocol == "vinyals":
            test = set(order[VINYALS_TRAIN_CLASSES:])
        else:
            test = set(meta.loc[meta["origin"] == "evaluation", "class"])
        if not test:
            log.warning("%s: no meta_test classes under protocol %s", dataset, params.omniglot_protocol)
        mapping = _meta_splits_for(order, params.meta_val_classes, test, rng, dataset)
        return meta["class"].map(mapping).to_numpy(dtype=object), "source"
    if kind == "kmnist":
        return np.full(len(meta), "meta_train", dtype=object), "source"
    if kind == "medmnist":
        return meta["origin"].to_numpy(dtype=object), "target"
    if kind == "csv_split":  # the csvs are the class-disjoint split
        return meta["origin"].map(dict(zip(TARGET_SPLITS, META_SPLITS))).to_numpy(dtype=object), "source"
    if kind == "npz_file":
        entry = params.npz_files[dataset]
        if entry.role == "source":
            return _class_splits(meta, entry.split_fractions, rng), "source"
        return _given_splits(dataset, meta, "target", params.val_fraction, rng), "target"
    if kind == "split_folder" or (meta["origin"] != "").any():  # split/class layout: the given split is kept
        role = get_source(dataset).role if kind == "split_folder" else params.image_folders[dataset].role
        return _given_splits(dataset, meta, role, params.val_fraction, rng), role
    folder = params.image_folders[dataset]
    if folder.role == "source":
        return _class_splits(meta, folder.split_fractions, rng), "source"
    split = np.empty(len(meta), dtype=object)
    for _, rows in meta.groupby("class", sort=True).groups.items():
        rows = np.sort(np.asarray(rows))  # positions (meta has a RangeIndex)
        perm = rows[rng.permutation(len(rows))]
        a, b, _ = _cut(len(rows), folder.split_fractions)
        split[perm[:a]] = TARGET_SPLITS[0]
        split[perm[a:a + b]] = TARGET_SPLITS[1]
        split[perm[a + b:]] = TARGET_SPLITS[2]
    return split, "target"

