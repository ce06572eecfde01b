"""prepare: raw files -> the validated prepared store (layout in store.py).

Pipeline per dataset: import (importers.py) -> convert to params.channels and
params.image_size, or the dataset's own `params.per_dataset` shape (vectorised torch on batches: RGB -> grey with ITU-R 601
luma 0.299 R + 0.587 G + 0.114 B; grey -> RGB by replication; "area"
averaging when shrinking, antialiased bilinear when enlarging; images already
at the target size are left untouched) -> hash pixels -> assign splits ->
resolve duplicates -> validate (schemas.py) -> write.

An image folder without class sub-folders (layout "flat") is an unlabelled
target: every image goes to `train` with label -1 and the no-class name
(store.py), report.json says ``"labels": "none"`` and 0 classes for it; only
`finetune.unlabeled.<name>` can use it (metatransfer/preflight.py refuses
the rest). It must have role target.

The parts live beside this module: conversion, hashing and the staged
memmap in convert.py, the splits of each kind in splits.py, exact duplicates
in duplicates.py, and the temporary folders of a run in workdirs.py.

Everything is built in a temporary folder beside out_dir and renamed into
place at the end; a failed run leaves the previous output as it was, and the
folders of a killed run are removed when the next run starts
(`clean_stale_work_dirs`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from metatransfer.config import NpzFileParams, PrepareParams
from metatransfer.data import importers as imp
from metatransfer.data.checksums import file_digest
from metatransfer.data.convert import gather_rows, stage_images
from metatransfer.data.duplicates import drop_cross_split_copies, drop_within_class_copies, fail_cross_class_copies
from metatransfer.data.fetch import raw_files
from metatransfer.data.schemas import COLUMNS, META_SPLITS, TARGET_SPLITS, validate_manifest
from metatransfer.data.sources import get_source
from metatransfer.data.splits import SPLIT_RANK, assign_splits
from metatransfer.data.store import IMAGES_FILE, MANIFEST_FILE, QUARANTINE_FILE, REPORT_FILE, UNLABELED
from metatransfer.data.workdirs import clean_stale_work_dirs, swapped_in, work_tag
from metatransfer.descriptions import write_description
from metatransfer.errors import ChecksumError, DataError

log = logging.getLogger(__name__)

_FOLDER_KINDS = ("image_folder", "split_folder")
FLAT = "flat"  # the layout of an image folder without class sub-folders: no labels


@dataclass
class PrepareReport:
    """What prepare wrote.

    Attributes:
        out_dir: the prepared folder.
        datasets: per dataset: kind, role, n_images, n_classes, splits {split: {images, classes}},
            quarantined, empty_classes, and data_version ("sha256:<hex>") for a prepare.npz_files entry.
        quarantined: total quarantined inputs.
        seconds: wall time of the run.
    """

    out_dir: Path
    datasets: dict[str, dict] = field(default_factory=dict)
    quarantined: int = 0
    seconds: float = 0.0

    @property
    def n_images(self) -> int:
        """Total prepared images."""
        return sum(d["n_images"] for d in self.datasets.values())

# --------------------------------------------------------------------------- one dataset
def prepared_dataset_names(fetch_datasets: tuple[str, ...], params: PrepareParams) -> tuple[str, ...]:
    """Every dataset the prepare stage builds: fetch.datasets, then the image_folders and npz_files entries.

    Args:
        fetch_datasets: source names (params fetch.datasets).
        params: prepare params.

    Returns:
        The names, each once, in that order.
    """
    names = list(fetch_datasets)
    for name in (*params.image_folders, *params.npz_files):
        if name not in names:
            names.append(name)
    return tuple(names)


def verify_npz_file(name: str, entry: NpzFileParams, base_dir: Path) -> tuple[Path, str]:
    """Check a `prepare.npz_files` entry's file against its params sha256.

    Args:
        name: the entry's key (the dataset name).
        entry: its params.
        base_dir: folder a relative path is resolved against (the project root).

    Returns:
        (the resolved path, its lowercase sha256).

    Raises:
        DataError: the file does not exist, or sha256 is not set (the message gives the file's digest to paste).
        ChecksumError: the file's sha256 differs from the params one (both are named).
    """
    key = f"prepare.npz_files.{name}"
    path = Path(entry.path)
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.is_file():
        raise DataError(f"{key}.path: {entry.path!r} is not a file ({path}; a relative path is relative to the "
                        "project root). Fix the path in params.yaml.")
    found = file_digest(path, "sha256")
    if not entry.sha256:
        raise DataError(f"{key}.sha256: missing. The file {path} has sha256 {found}; if it is the file you mean, "
                        f"add `sha256: {found}` under {key} in params.yaml and re-run.")
    expected = entry.sha256.lower()
    if found != expected:
        raise ChecksumError(f"{key}.sha256: the file {path} does not match: expected {expected} (params.yaml), "
                            f"found {found}. If the file was meant to change, set {key}.sha256 to {found} and "
                            "re-run; otherwise restore the file that has the expected checksum.")
    return path, found


def import_dataset(name: str, params: PrepareParams, raw_dir: Path, base_dir: Path) -> imp.Imported:
    """Run the right importer for a dataset name.

    Image files are listed, not decoded (prepare decodes them in chunks).

    Args:
        name: a source name or a key of params.image_folders or params.npz_files.
        params: prepare params.
        raw_dir: raw data root (fetched files under raw_dir/<name>/).
        base_dir: folder relative ImageFolder and npz paths are resolved against.

    Returns:
        The Imported dataset.

    Raises:
        DataError: unknown name, missing raw files, bad content.
    """
    if name in params.image_folders:
        folder = params.image_folders[name]
        path = Path(folder.path)
        data = imp.import_image_folder(path if path.is_absolute() else base_dir / path, name, folder.layout)
        if data.layout == FLAT and folder.role != "target":
            raise DataError(f"prepare.image_folders.{name}.role: {folder.role!r}, but the folder {folder.path} has no "
                            "class sub-folders, so its images have no labels and cannot be a meta-training source; "
                            f"set role: target and use it as finetune.unlabeled.{name} (docs/guide.md, \"Targets "
                            "without labels\"), or sort its images into class folders.")
        return data
    if name in params.npz_files:
        entry = params.npz_files[name]
        path, digest = verify_npz_file(name, entry, base_dir)
        data = imp.import_npz_file(path, name, entry.class_names, key=f"prepare.npz_files.{name}")
        data.version = f"sha256:{digest}"
        return data
    src = get_source(name)
    files = raw_files(name, raw_dir)
    if src.kind == "csv_split":
        return imp.import_csv_split(files[name], name)
    if src.kind == "split_folder":
        return imp.import_image_folder(files[name], name, "split/class", relative_paths=True, kind="split_folder")
    if src.kind == "omniglot_npz":
        return imp.import_omniglot_npz(files["images_background.npz"], files["images_evaluation.npz"],
                                       files["character_index.csv"], name)
    if src.kind == "omniglot_zip":
        return imp.import_omniglot_zips([files[f.name] for f in src.files], name)
    if src.kind == "medmnist":
        return imp.import_medmnist(files[f"{name}.npz"], name, src.n_classes)
    if src.kind == "kmnist":
        return imp.import_kmnist(files["kmnist-test-imgs.npz"], files["kmnist-test-labels.npz"], name, src.n_classes)
    raise DataError(f"{name}: no importer for kind {src.kind!r}")


def build_dataset(data: imp.Imported, params: PrepareParams, seed: int, dest: Path
                  ) -> tuple[pd.DataFrame, list[imp.QuarantineRow], str, list[str]]:
    """Convert, hash, split, de-duplicate, validate and write one imported dataset into `dest`.

    Images are converted into a staged memmap in import order (bounded
    memory), then written to ``dest/images.npy`` ordered by split (each split
    one contiguous block of rows; within a split, import order) with the kept
    rows only; the manifest goes to ``dest/manifest.parquet``.

    Args:
        data: the imported dataset.
        params: prepare params.
        seed: the project seed.
        dest: the dataset's output folder (created; inside prepare's temporary folder).

    Returns:
        (validated manifest, quarantine rows, role, empty classes).

    Raises:
        DataError: validation failures (all listed), cross-class copies in image folders, no usable image.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staged = stage_images(data, params, dest / f".staged-{IMAGES_FILE}")
    df = data.meta.copy()
    df.insert(0, "dataset", data.dataset)
    df["pixel_hash"] = staged.hashes
    df["_pos"] = np.arange(len(df), dtype=np.int64)
    quarantine = list(data.quarantine) + staged.quarantine
    df = df[~staged.failed].reset_index(drop=True)
    if df.empty:
        raise DataError(f"dataset {data.dataset}: no usable image ({len(quarantine)} input(s) quarantined).")
    empty: list[str] = list(data.empty_classes)
    if data.kind in _FOLDER_KINDS:
        empty = sorted(set(data.class_order) - set(df["class"]))
        for e in empty:
            log.warning("%s: class folder %s has no usable image (empty or all quarantined)", data.dataset, e)
    if data.kind in _FOLDER_KINDS or data.kind == "csv_split":
        keep, rows = drop_within_class_copies(df)
        df, quarantine = df[keep].reset_index(drop=True), quarantine + rows
    if data.layout == FLAT:  # no labels: nothing to split by class; all of it is what clustering reads
        split, role = np.full(len(df), "train", dtype=object), "target"
    else:
        split, role = assign_splits(data.dataset, data.kind, df, data.class_order, params, seed)
    df["split"] = split
    if data.kind in _FOLDER_KINDS:
        fail_cross_class_copies(df, data.dataset)
    else:
        keep, rows = drop_cross_split_copies(df)
        if rows:
            df, quarantine = df[keep].reset_index(drop=True), quarantine + rows
    # rows ordered by split: each split is one contiguous slice (load_split memory-maps it)
    rank = df["split"].map(SPLIT_RANK).to_numpy()
    df = df.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    classes = sorted(df["class"].unique())
    df["label"] = df["class"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    if data.layout == FLAT:
        df["label"] = np.int64(UNLABELED)
    df["id"] = np.arange(len(df), dtype=np.int64)
    order = df["_pos"].to_numpy()
    df = df[list(COLUMNS)]
    df = validate_manifest(df, f"dataset {data.dataset}")
    gather_rows(staged.path, order, dest / IMAGES_FILE)
    _save_manifest(df, dest / MANIFEST_FILE)
    return df, quarantine, role, empty


def _save_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write a manifest (parquet)."""
    df.to_parquet(path, index=False)


# --------------------------------------------------------------------------- all
def prepare(params: PrepareParams, datasets: tuple[str, ...], raw_dir: Path, out_dir: Path, seed: int,
            base_dir: Path | None = None) -> PrepareReport:
    """Build the prepared store for `datasets` into `out_dir`, atomically.

    Everything is written into a temporary folder beside `out_dir` (images
    streamed to disk, see `build_dataset`), which replaces `out_dir` at the end.

    Args:
        params: prepare params (image_size, channels, omniglot_protocol, meta_val_classes, val_fraction,
            image_folders).
        datasets: source names and/or keys of params.image_folders / params.npz_files
            (`prepared_dataset_names`).
        raw_dir: raw data root (as written by fetch).
        out_dir: the prepared folder (replaced as a whole at the end).
        seed: the project seed (splits).
        base_dir: folder relative ImageFolder and npz paths are resolved against (default: cwd).

    Returns:
        PrepareReport (also written as report.json, without the timing).

    Raises:
        DataError: bad input, listing every failure; out_dir is then left untouched.
    """
    t0 = time.perf_counter()
    base_dir = base_dir or Path.cwd()
    out_dir = Path(out_dir)
    if len(set(datasets)) != len(datasets):
        raise DataError(f"dataset list has duplicates: {list(datasets)}")
    report = PrepareReport(out_dir=out_dir)
    quarantine: list[imp.QuarantineRow] = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_work_dirs(out_dir)
    with swapped_in(out_dir, work_tag()) as tmp:
        for name in datasets:
            t = time.perf_counter()
            data = import_dataset(name, params, Path(raw_dir), base_dir)
            kind, version, labelled = data.kind, data.version, data.layout != FLAT
            df, q, role, empty = build_dataset(data, params, seed, tmp / name)
            del data  # free the raw batches before the next dataset
            quarantine += q
            splits = {s: {"images": int((df["split"] == s).sum()),
                          "classes": int(df.loc[df["split"] == s, "class"].nunique()) if labelled else 0}
                      for s in (META_SPLITS if role == "source" else TARGET_SPLITS)}
            report.datasets[name] = {
                "kind": kind, "role": role, "n_images": len(df),
                "n_classes": int(df["class"].nunique()) if labelled else 0,
                "splits": splits, "quarantined": len(q), "empty_classes": sorted(empty)}
            if not labelled:  # only then: a labelled dataset's report.json is unchanged
                report.datasets[name]["labels"] = "none"
            if version:  # the user-pinned data version (prepare.npz_files: "sha256:<hex>")
                report.datasets[name]["data_version"] = version
            if name in params.per_dataset:  # its own shape (heterogeneous target); others: report.json as before
                report.datasets[name]["channels"], report.datasets[name]["image_size"] = params.shape_of(name)
            if name in params.descriptions:  # only then: undescribed stores stay byte-identical
                write_description(tmp / name, params.descriptions[name].model_dump())
            log.info("%s: %d images, %d classes, %s, %d quarantined (%.1f s)", name, len(df),
                     report.datasets[name]["n_classes"], {s: v["images"] for s, v in splits.items()}, len(q),
                     time.perf_counter() - t)
        report.quarantined = len(quarantine)
        q = pd.DataFrame([(r.dataset, r.source_path, r.reason) for r in quarantine],
                         columns=["dataset", "source_path", "reason"]).sort_values(["dataset", "source_path"])
        q.to_csv(tmp / QUARANTINE_FILE, index=False)
        doc = {"seed": seed, "image_size": params.image_size, "channels": params.channels,
               "omniglot_protocol": params.omniglot_protocol, "meta_val_classes": params.meta_val_classes,
               "val_fraction": params.val_fraction, "quarantined": report.quarantined, "datasets": report.datasets}
        (tmp / REPORT_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    report.seconds = time.perf_counter() - t0
    return report
