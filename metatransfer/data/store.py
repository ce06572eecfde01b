"""The prepared store: what `prepare` writes and everything downstream reads.

Layout (one folder per dataset under the prepared dir, e.g. data/prepared):

    <prepared>/<dataset>/images.npy        uint8 (N, C, H, W), C and H=W from params (a dataset's
                                           own under prepare.per_dataset: the array's shape is
                                           the record, `image_shape` reads it); rows
                                           grouped by split (each split one contiguous block)
    <prepared>/<dataset>/manifest.parquet  one row per image (see schemas.py)
    <prepared>/quarantine.csv              skipped inputs with a reason
    <prepared>/report.json                 counts per dataset/split

Manifest row i describes images.npy[i]. Manifest columns (validated by
metatransfer.data.schemas): id, dataset, domain, class, label, split,
source_path, pixel_hash, orig_height, orig_width, orig_channels. Source
datasets use the class-disjoint splits meta_train/meta_val/meta_test; target
datasets use train/val/test. Pixels: uint8, Omniglot ink bright (255) on a
black background; grey from RGB by ITU-R 601 luma.

An unlabelled dataset (an image folder without class sub-folders) has every
row in `train` with label `UNLABELED` (-1) and the no-class name
``<dataset>/`` (`unlabeled_class`); `load_split` gives it labels -1 and no
class names, and `has_labels` tells it apart from the manifest alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metatransfer.data.labels import UNLABELED, unlabeled_class  # noqa: F401 (the store's marks, re-exported)
from metatransfer.errors import DataError

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.csv"
REPORT_FILE = "report.json"
SPLIT_ORDER = ("meta_train", "meta_val", "meta_test", "train", "val", "test")


@dataclass(frozen=True)
class SplitData:
    """The images of one split of one dataset (images memory-mapped, see `load_split`).

    Attributes:
        dataset: dataset name (e.g. "omniglot").
        split: split name ("meta_train", "meta_val", "meta_test", "train", "val", "test").
        images: uint8 (N, C, H, W); a read-only np.memmap slice when loaded by `load_split`.
        labels: int64 (N,) class index 0..len(class_names)-1 within this split (all `UNLABELED`
            for an unlabelled dataset).
        class_names: global class names (e.g. "omniglot/Greek/character01"); () when unlabelled.
    """

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- reading
def available(prepared_dir: str | Path) -> dict[str, list[str]]:
    """Datasets in a prepared folder and their non-empty splits.

    Args:
        prepared_dir: the prepared folder (e.g. data/prepared).

    Returns:
        {dataset: [split, ...]} in canonical split order; {} when nothing is prepared.
    """
    root = Path(prepared_dir)
    out: dict[str, list[str]] = {}
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file()):
        present = set(pd.read_parquet(d / MANIFEST_FILE, columns=["split"])["split"].unique())
        out[d.name] = [s for s in SPLIT_ORDER if s in present]
    return out


def load_manifest(prepared_dir: str | Path, dataset: str, validate: bool = True) -> pd.DataFrame:
    """Read one dataset's manifest.

    Args:
        prepared_dir: the prepared folder.
        dataset: dataset name.
        validate: re-check it against the schema (catches hand edits).

    Returns:
        The manifest (row i describes images.npy[i]).

    Raises:
        DataError: the dataset is not prepared (the message lists those that are), or it fails validation.
    """
    path = Path(prepared_dir) / dataset / MANIFEST_FILE
    if not path.is_file():
        have = sorted(available(prepared_dir))
        raise DataError(f"{path}: dataset {dataset!r} is not prepared; prepared datasets: {have}. "
                        "Add it to fetch.datasets (or prepare.image_folders) and run the prepare stage.")
    df = pd.read_parquet(path)
    if validate:
        from metatransfer.data.schemas import validate_manifest  # here: schemas imports pandera (slow import)

        df = validate_manifest(df, str(path))
    return df


def has_labels(prepared_dir: str | Path, dataset: str) -> bool:
    """False for an unlabelled dataset (every manifest row labelled `UNLABELED`), True otherwise.

    Raises:
        DataError: the dataset is not prepared (the message lists those that are).
    """
    df = load_manifest(prepared_dir, dataset, validate=False)
    return not ("label" in df and len(df) and bool((df["label"] == UNLABELED).all()))


def load_split(prepared_dir: str | Path, dataset: str, split: str) -> SplitData:
    """Open one split of one dataset.

    `prepare` writes each split's rows as one contiguous block of images.npy,
    so the images come back as a read-only ``np.memmap`` slice of the file (no
    copy: pages are read when indexed, e.g. ``split.images[idx]``, and shared
    between processes through the page cache). A store whose split rows are
    not contiguous (written by an older version) gets an in-memory copy.
    Writing into ``split.images`` raises (read-only); copy first
    (``np.array(split.images[idx])``) to modify.

    Args:
        prepared_dir: the prepared folder.
        dataset: dataset name.
        split: a split present in that dataset.

    Returns:
        SplitData with uint8 images (N, C, H, W) (memory-mapped, read-only) and
        labels 0..C-1 in sorted class-name order.

    Raises:
        DataError: missing dataset or split (lists what exists), or images/manifest disagree.
    """
    df = load_manifest(prepared_dir, dataset, validate=False)
    rows = df[df["split"] == split]
    if rows.empty:
        have = [s for s in SPLIT_ORDER if s in set(df["split"])]
        raise DataError(f"{Path(prepared_dir) / dataset}: split {split!r} not found for dataset {dataset!r}; "
                        f"available splits: {have}.")
    path = Path(prepared_dir) / dataset / IMAGES_FILE
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    if images.shape[0] != len(df):
        raise DataError(f"{path}: holds {images.shape[0]} images but its manifest has {len(df)} rows; "
                        "the prepared folder is damaged: run the prepare stage again.")
    idx = rows["id"].to_numpy()
    if "label" in rows and bool((rows["label"] == UNLABELED).all()):  # no labels: none are made up
        class_names: tuple[str, ...] = ()
        labels = np.full(len(rows), UNLABELED, dtype=np.int64)
    else:
        class_names = tuple(sorted(rows["class"].unique()))
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = rows["class"].map(lookup).to_numpy(dtype=np.int64)
    lo = int(idx[0])
    if np.array_equal(idx, np.arange(lo, lo + len(idx))):
        view = images[lo:lo + len(idx)]  # a read-only memmap slice: no pixel is read until indexed
    else:  # a store written before splits were contiguous: copy the rows
        view = np.ascontiguousarray(images[idx])
    return SplitData(dataset=dataset, split=split, images=view, labels=labels, class_names=class_names)


def image_shape(prepared_dir: str | Path, dataset: str) -> tuple[int, int, int]:
    """(channels, height, width) a dataset is stored at (images.npy's header; no pixel is read).

    Every dataset has `prepare.channels` x `prepare.image_size` unless
    `prepare.per_dataset` gives it its own (heterogeneous transfer).

    Raises:
        DataError: the dataset is not prepared (the message lists those that are).
    """
    path = Path(prepared_dir) / dataset / IMAGES_FILE
    if not path.is_file():
        raise DataError(f"{path}: dataset {dataset!r} is not prepared; prepared datasets: "
                        f"{sorted(available(prepared_dir))}. Run the prepare stage.")
    _, c, h, w = np.load(path, mmap_mode="r", allow_pickle=False).shape
    return int(c), int(h), int(w)
