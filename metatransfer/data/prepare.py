"""prepare: raw files -> the validated prepared store (layout in store.py).

Pipeline per dataset: import (importers.py) -> convert to params.channels and
params.image_size (vectorised torch on batches: RGB -> grey with ITU-R 601
luma 0.299 R + 0.587 G + 0.114 B; grey -> RGB by replication; "area"
averaging when shrinking, antialiased bilinear when enlarging; images already
at the target size are left untouched) -> hash pixels -> assign splits ->
resolve duplicates -> validate (schemas.py) -> write.

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
* ImageFolder (params.image_folders): role "source" -> classes shuffled and
  cut by split_fractions into meta_train/meta_val/meta_test; role "target" ->
  each class's images shuffled and cut by split_fractions into
  train/val/test. Cuts use largest remainders, so counts sum exactly.

Exact duplicates (same prepared pixel_hash), decided per kind:

=================  ==========================================================
kind               action
=================  ==========================================================
omniglot_*         across splits: quarantine the copy in the lower split
                   (meta_train < meta_val < meta_test), keep meta_test intact.
                   None occur in the official files at 28x28 (checked).
medmnist           across official splits: quarantine the copy on the train
                   (then val) side, keep test intact so scores stay comparable
                   with published ones; logged. Real data: breastmnist has one
                   image in both train and test.
kmnist             one split only: nothing to do.
image_folder       within one class: keep the first file (sorted path),
                   quarantine later copies (an accidental copy). Across
                   classes: FAIL (the same image under two labels is a
                   labelling error only the user can fix); the DataError lists
                   every file.
=================  ==========================================================

Within-split duplicates in different classes of the official datasets are
kept (they are the publishers' labels). Every quarantined input goes to
quarantine.csv with a reason.

Writing: everything is built in a temporary folder beside out_dir and
renamed into place at the end; a failed run leaves the previous output as
it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from metatransfer.config import PrepareParams
from metatransfer.data import importers as imp
from metatransfer.data.schemas import COLUMNS, META_SPLITS, TARGET_SPLITS, validate_manifest
from metatransfer.data.sources import get_source, raw_files
from metatransfer.data.store import IMAGES_FILE, MANIFEST_FILE, QUARANTINE_FILE, REPORT_FILE
from metatransfer.errors import DataError

log = logging.getLogger(__name__)

VINYALS_TRAIN_CLASSES = 1200
_CHUNK = 2048  # images per conversion chunk: bounds float32 memory (2048*105*105*4 B = 90 MB)
_LUMA = (0.299, 0.587, 0.114)
_SPLIT_RANK = {"meta_train": 0, "meta_val": 1, "meta_test": 2, "train": 0, "val": 1, "test": 2}


@dataclass
class PrepareReport:
    """What prepare wrote.

    Attributes:
        out_dir: the prepared folder.
        datasets: per dataset: kind, role, n_images, n_classes, splits {split: {images, classes}},
            quarantined, empty_classes.
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


# --------------------------------------------------------------------------- conversion
def convert_batch(batch: imp.ImageBatch, image_size: int, channels: int, chunk: int = _CHUNK) -> np.ndarray:
    """Convert one same-shape batch to uint8 (n, channels, image_size, image_size).

    Args:
        batch: images (n, H, W, C) uint8 or bool.
        image_size: target side.
        channels: 1 (grey) or 3 (RGB).
        chunk: images per vectorised step.

    Returns:
        uint8 (n, channels, image_size, image_size).
    """
    n, h, w, c = batch.data.shape
    out = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    luma = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    for start, part in zip(range(0, n, chunk), imp.iter_chunks(batch, chunk)):
        x = torch.from_numpy(np.ascontiguousarray(part)).permute(0, 3, 1, 2)
        if x.dtype == torch.bool:
            x = (~x if batch.background_true else x).to(torch.float32).mul_(255.0)
        else:
            x = x.to(torch.float32)
        if c == 3 and channels == 1:
            x = (x * luma).sum(dim=1, keepdim=True)
        elif c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if (h, w) != (image_size, image_size):
            if h >= image_size and w >= image_size:
                x = F.interpolate(x, size=(image_size, image_size), mode="area")
            else:
                x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + len(part)] = x.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def pixel_hashes(images: np.ndarray) -> list[str]:
    """blake2b-128 hex digest of each image's uint8 bytes.

    Args:
        images: uint8 (N, C, H, W).

    Returns:
        N hex strings of 32 characters.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat]


# --------------------------------------------------------------------------- splits
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
    folder = params.image_folders[dataset]
    if folder.role == "source":
        classes = sorted(set(meta["class"]))
        perm = rng.permutation(len(classes))
        counts = _cut(len(classes), folder.split_fractions)
        names = [META_SPLITS[0]] * counts[0] + [META_SPLITS[1]] * counts[1] + [META_SPLITS[2]] * counts[2]
        mapping = {classes[j]: names[k] for k, j in enumerate(perm)}
        return meta["class"].map(mapping).to_numpy(dtype=object), "source"
    split = np.empty(len(meta), dtype=object)
    for _, rows in meta.groupby("class", sort=True).groups.items():
        rows = np.sort(np.asarray(rows))  # positions (meta has a RangeIndex)
        perm = rows[rng.permutation(len(rows))]
        a, b, _ = _cut(len(rows), folder.split_fractions)
        split[perm[:a]] = TARGET_SPLITS[0]
        split[perm[a:a + b]] = TARGET_SPLITS[1]
        split[perm[a + b:]] = TARGET_SPLITS[2]
    return split, "target"


# --------------------------------------------------------------------------- duplicates
def _drop_within_class_copies(df: pd.DataFrame) -> tuple[np.ndarray, list[imp.QuarantineRow]]:
    """ImageFolder: keep the first file per (class, pixel_hash); quarantine later copies."""
    order = df.sort_values("source_path")
    dup = order.duplicated(["class", "pixel_hash"], keep="first")
    first = {(c, h): s for c, h, s in zip(order["class"][~dup], order["pixel_hash"][~dup], order["source_path"][~dup])}
    rows = [imp.QuarantineRow(d, s, f"exact duplicate of {first[(c, h)]} in the same class")
            for d, s, c, h in zip(order["dataset"][dup], order["source_path"][dup], order["class"][dup],
                                  order["pixel_hash"][dup])]
    keep = np.ones(len(df), dtype=bool)
    keep[order.index[dup.to_numpy()]] = False
    return keep, rows


def _drop_cross_split_copies(df: pd.DataFrame) -> tuple[np.ndarray, list[imp.QuarantineRow]]:
    """Keep a duplicated image only in its highest split (test side); quarantine the others."""
    rank = df["split"].map(_SPLIT_RANK)
    n_splits = df.groupby("pixel_hash")["split"].transform("nunique")
    keep = np.ones(len(df), dtype=bool)
    rows: list[imp.QuarantineRow] = []
    for h, grp in df[n_splits > 1].groupby("pixel_hash"):
        top = rank[grp.index].max()
        kept = grp[rank[grp.index] == top].iloc[0]
        for i, r in grp[rank[grp.index] < top].iterrows():
            keep[i] = False
            reason = (f"duplicate across splits: same pixels as {kept['source_path']} ({kept['split']}); "
                      f"dropped from {r['split']} to keep {kept['split']} intact")
            rows.append(imp.QuarantineRow(r["dataset"], r["source_path"], reason))
            log.warning("%s: %s", r["source_path"], reason)
    return keep, rows


# --------------------------------------------------------------------------- one dataset
def import_dataset(name: str, params: PrepareParams, raw_dir: Path, base_dir: Path) -> imp.Imported:
    """Run the right importer for a dataset name.

    Args:
        name: a registry name or a key of params.image_folders.
        params: prepare params.
        raw_dir: raw data root (fetched files under raw_dir/<name>/).
        base_dir: folder relative ImageFolder paths are resolved against.

    Returns:
        The Imported dataset.

    Raises:
        DataError: unknown name, missing raw files, bad content.
    """
    if name in params.image_folders:
        path = Path(params.image_folders[name].path)
        return imp.import_image_folder(path if path.is_absolute() else base_dir / path, name)
    src = get_source(name)
    files = raw_files(name, raw_dir)
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


def build_dataset(data: imp.Imported, params: PrepareParams, seed: int
                  ) -> tuple[np.ndarray, pd.DataFrame, list[imp.QuarantineRow], str]:
    """Convert, hash, split, de-duplicate and validate one imported dataset.

    Args:
        data: the imported dataset.
        params: prepare params.
        seed: the project seed.

    Returns:
        (images uint8 (N, C, S, S), validated manifest, quarantine rows, role).

    Raises:
        DataError: validation failures (all listed).
    """
    images = np.concatenate([convert_batch(b, params.image_size, params.channels) for b in data.batches])
    df = data.meta.copy()
    df.insert(0, "dataset", data.dataset)
    df["pixel_hash"] = pixel_hashes(images)
    quarantine = list(data.quarantine)
    if data.kind == "image_folder":
        keep, rows = _drop_within_class_copies(df)
        images, df, quarantine = images[keep], df[keep].reset_index(drop=True), quarantine + rows
    split, role = assign_splits(data.dataset, data.kind, df, data.class_order, params, seed)
    df["split"] = split
    if data.kind != "image_folder":  # image folders fail on cross-class duplicates (schema check)
        keep, rows = _drop_cross_split_copies(df)
        if rows:
            images, df, quarantine = images[keep], df[keep].reset_index(drop=True), quarantine + rows
    classes = sorted(df["class"].unique())
    df["label"] = df["class"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    df["id"] = np.arange(len(df), dtype=np.int64)
    df = df[list(COLUMNS)]
    df = validate_manifest(df, f"dataset {data.dataset}")
    return images, df, quarantine, role


# --------------------------------------------------------------------------- all
def prepare(params: PrepareParams, datasets: tuple[str, ...], raw_dir: Path, out_dir: Path, seed: int,
            base_dir: Path | None = None) -> PrepareReport:
    """Build the prepared store for `datasets` into `out_dir`, atomically.

    Args:
        params: prepare params (image_size, channels, omniglot_protocol, meta_val_classes, image_folders).
        datasets: registry names and/or keys of params.image_folders.
        raw_dir: raw data root (as written by fetch).
        out_dir: the prepared folder (replaced as a whole at the end).
        seed: the project seed (splits).
        base_dir: folder relative ImageFolder paths are resolved against (default: cwd).

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
    built: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    quarantine: list[imp.QuarantineRow] = []
    for name in datasets:
        t = time.perf_counter()
        data = import_dataset(name, params, Path(raw_dir), base_dir)
        empty, kind = list(data.empty_classes), data.kind
        images, df, q, role = build_dataset(data, params, seed)
        del data  # free the raw batches before the next dataset
        built[name] = (images, df)
        quarantine += q
        splits = {s: {"images": int((df["split"] == s).sum()), "classes": int(df.loc[df["split"] == s, "class"].nunique())}
                  for s in (META_SPLITS if role == "source" else TARGET_SPLITS)}
        report.datasets[name] = {
            "kind": kind, "role": role, "n_images": len(df), "n_classes": int(df["class"].nunique()),
            "splits": splits, "quarantined": len(q), "empty_classes": sorted(empty)}
        log.info("%s: %d images, %d classes, %s, %d quarantined (%.1f s)", name, len(df), df["class"].nunique(),
                 {s: v["images"] for s, v in splits.items()}, len(q), time.perf_counter() - t)
    report.quarantined = len(quarantine)
    _write(out_dir, built, quarantine, report, params, seed)
    report.seconds = time.perf_counter() - t0
    return report


def _write(out_dir: Path, built: dict[str, tuple[np.ndarray, pd.DataFrame]], quarantine: list[imp.QuarantineRow],
           report: PrepareReport, params: PrepareParams, seed: int) -> None:
    """Write everything to a temp folder beside out_dir, then swap it in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    try:
        tmp.mkdir()
        for name, (images, df) in built.items():
            (tmp / name).mkdir()
            np.save(tmp / name / IMAGES_FILE, images, allow_pickle=False)
            df.to_parquet(tmp / name / MANIFEST_FILE, index=False)
        q = pd.DataFrame([(r.dataset, r.source_path, r.reason) for r in quarantine],
                         columns=["dataset", "source_path", "reason"]).sort_values(["dataset", "source_path"])
        q.to_csv(tmp / QUARANTINE_FILE, index=False)
        doc = {"seed": seed, "image_size": params.image_size, "channels": params.channels,
               "omniglot_protocol": params.omniglot_protocol, "meta_val_classes": params.meta_val_classes,
               "quarantined": report.quarantined, "datasets": report.datasets}
        (tmp / REPORT_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.rename(old, out_dir)  # put the last good output back
        raise
    shutil.rmtree(old, ignore_errors=True)
