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
csv_split          within one class: keep the first file (sorted path),
(mini_imagenet)    quarantine later copies (they could land in the support
                   and the query of one episode). Real data: one such pair
                   (n02091831 00000748 / 00001256). Across splits: quarantine
                   the lower-split copy (as omniglot). Across classes within
                   one split: kept (the publishers' labels), like the real
                   pair n02108551 00000121 / n02111277 00000207 (both
                   meta_train).
image_folder,      within one class: keep the copy in the highest given split
split_folder       (test, then val, then train), then the first by sorted
(brain_tumor_mri,  path; quarantine the other copies (an accidental copy;
ham10000_mel_nv)   test stays intact). Real data: ham10000_mel_nv's pair
                   ISIC_0024366 / ISIC_0029861 (test/nv): the second is
                   quarantined. brain_tumor_mri has none (removed upstream).
                   Across classes (any splits): FAIL (the same image under
                   two labels is a labelling error only the user can fix);
                   the DataError lists every file with its class and split.
=================  ==========================================================

Within-split duplicates in different classes of the official array datasets
are kept (they are the publishers' labels). Every quarantined input goes to
quarantine.csv with a reason. Files that cannot be decoded (not an image,
corrupt, truncated, float pixels) are found while decoding and quarantined.

Memory and writing: image files are decoded in chunks of _FILE_CHUNK files
(threads), converted in steps bounded to about _CHUNK_BYTES of float32, and
written to a staged ``.npy`` memmap (``np.lib.format.open_memmap``) in import
order, whose pages are flushed and dropped from the resident set as it goes.
After hashing, de-duplication, splitting and validation, the kept rows are
gathered in split order (each split one contiguous block; within a split,
import order) into ``images.npy`` (the staged file is renamed when the order
is already right). No whole dataset is held in memory: peak RSS stays at the
interpreter + libraries + one chunk (benchmarks/RESULTS.md). Everything is
built in a temporary folder beside out_dir and renamed into place at the
end; a failed run leaves the previous output as it was, and the folders of
a killed run are removed when the next run starts (`clean_stale_work_dirs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import platform
import re
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
_CHUNK = 2048  # at most this many images per conversion step
_CHUNK_BYTES = 96 << 20  # float32 working set per conversion step (about 3x this at peak)
_FILE_CHUNK = 256  # image files decoded per step (256 x 224x224x3 = 38 MB of uint8)
_DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
_LUMA = (0.299, 0.587, 0.114)
_SPLIT_RANK = {"meta_train": 0, "meta_val": 1, "meta_test": 2, "train": 0, "val": 1, "test": 2}
_ORIGIN_RANK = {"train": 0, "val": 1, "test": 2}
_FOLDER_KINDS = ("image_folder", "split_folder")


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
def _chunk_len(height: int, width: int, c_in: int, image_size: int, channels: int) -> int:
    """Images per vectorised conversion step: bounds the float32 working set to about _CHUNK_BYTES."""
    per = 4 * max(height * width * max(c_in, channels), image_size * image_size * channels)
    return int(max(1, min(_CHUNK, _CHUNK_BYTES // per)))


def _convert_chunk(part: np.ndarray, background_true: bool, image_size: int, channels: int) -> np.ndarray:
    """Convert (n, H, W, C) uint8/bool images to uint8 (n, channels, image_size, image_size)."""
    _, h, w, c = part.shape
    x = torch.from_numpy(np.require(part, requirements=["C", "W"])).permute(0, 3, 1, 2)  # W: torch wants writable
    if x.dtype == torch.bool:
        x = (~x if background_true else x).to(torch.float32).mul_(255.0)
    else:
        x = x.to(torch.float32)
    if c == 3 and channels == 1:
        x = (x * torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    if (h, w) != (image_size, image_size):
        if h >= image_size and w >= image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="area")
        else:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    y = x.round_().clamp_(0, 255).to(torch.uint8)
    if c == 1 and channels == 3:  # grey -> RGB by replication, after resizing (one channel to resize, not three)
        y = y.expand(-1, 3, -1, -1)
    return np.ascontiguousarray(y.numpy())


def convert_batch(batch: imp.ImageBatch, image_size: int, channels: int, chunk: int = _CHUNK) -> np.ndarray:
    """Convert one same-shape batch to uint8 (n, channels, image_size, image_size).

    Args:
        batch: images (n, H, W, C) uint8 or bool.
        image_size: target side.
        channels: 1 (grey) or 3 (RGB).
        chunk: at most this many images per vectorised step (fewer for large images).

    Returns:
        uint8 (n, channels, image_size, image_size).
    """
    n, h, w, c = batch.data.shape
    step = min(chunk, _chunk_len(h, w, c, image_size, channels))
    out = np.empty((n, channels, image_size, image_size), dtype=np.uint8)
    for start, part in zip(range(0, n, step), imp.iter_chunks(batch, step)):
        out[start:start + len(part)] = _convert_chunk(part, batch.background_true, image_size, channels)
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


def _release(mm: np.memmap) -> None:
    """Flush a memmap and drop its pages from this process's resident set (they stay in the page cache).

    Pages of a file mapping count in RSS once touched; without this, writing a
    7.8 GB store through a memmap would show (and, under pressure, hold) 7.8 GB.
    """
    mm.flush()
    raw = getattr(mm, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise"):
        raw.madvise(mmap.MADV_DONTNEED)


@dataclass
class _Staged:
    """Converted images of one dataset in import order, on disk (a memmap), and what decoding found."""

    path: Path
    hashes: list[str]
    failed: np.ndarray  # bool per row: the file could not be decoded (quarantined)
    quarantine: list[imp.QuarantineRow]


def stage_images(data: imp.Imported, params: PrepareParams, path: Path, workers: int = _DECODE_WORKERS) -> _Staged:
    """Convert every image of `data` into an .npy memmap at `path`, in bounded chunks.

    Array batches are converted chunk by chunk; `ImageFiles` batches are
    decoded (threads) chunk by chunk, grouped by shape and converted, so at
    most one chunk of decoded and float pixels is in memory. Files that fail
    to decode keep an all-zero row and are marked failed (quarantined); their
    ``orig_*`` metadata is filled from the decoded image otherwise (in place
    in ``data.meta``).

    Args:
        data: the imported dataset.
        params: prepare params (image_size, channels).
        path: the .npy file to write (N = len(data.meta) rows).
        workers: decoding threads.

    Returns:
        The staged result (pixel hash per row, failed mask, quarantine rows).
    """
    n, size, ch = len(data.meta), params.image_size, params.channels
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, ch, size, size))
    hashes: list[str] = [""] * n
    failed = np.zeros(n, dtype=bool)
    quarantine: list[imp.QuarantineRow] = []
    orig = np.zeros((n, 3), dtype=np.int64)
    start = 0
    for b in data.batches:
        if isinstance(b, imp.ImageBatch):
            _, h, w, c = b.data.shape
            step = _chunk_len(h, w, c, size, ch)
            for s0 in range(0, len(b), step):
                conv = _convert_chunk(b.data[s0:s0 + step], b.background_true, size, ch)
                out[start + s0:start + s0 + len(conv)] = conv
                hashes[start + s0:start + s0 + len(conv)] = pixel_hashes(conv)
                _release(out)
            start += len(b)
            continue
        step = _FILE_CHUNK
        for s0 in range(0, len(b), step):
            paths = b.paths[s0:s0 + step]
            groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
            for j, res in enumerate(imp.decode_files(paths, workers)):
                row = start + s0 + j
                if isinstance(res, str):
                    failed[row] = True
                    quarantine.append(imp.QuarantineRow(data.dataset, str(data.meta.at[row, "source_path"]), res))
                    continue
                arr, channels = res
                orig[row] = (arr.shape[0], arr.shape[1], channels)
                groups.setdefault(arr.shape, []).append((row, arr))
            for items in groups.values():
                rows = np.array([r for r, _ in items])
                conv = convert_batch(imp.ImageBatch(np.stack([a for _, a in items])), size, ch)
                out[rows] = conv
                for r, hsh in zip(rows, pixel_hashes(conv)):
                    hashes[r] = hsh
            del groups
            _release(out)
        files = np.arange(start, start + len(b))
        for k, col in enumerate(("orig_height", "orig_width", "orig_channels")):
            data.meta.loc[files, col] = orig[files, k]
        start += len(b)
    out.flush()
    del out
    for r in np.flatnonzero(failed):
        hashes[r] = "0" * 32  # placeholder: the row is dropped before validation
    return _Staged(path, hashes, failed, quarantine)


def _gather(staged: Path, order: np.ndarray, dest: Path) -> None:
    """Write staged rows `order` (in that order) to the .npy `dest`, chunk by chunk (or rename when identical)."""
    src = np.load(staged, mmap_mode="r")
    if len(order) == len(src) and np.array_equal(order, np.arange(len(src))):
        del src
        os.replace(staged, dest)
        return
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=np.uint8, shape=(len(order),) + src.shape[1:])
    step = max(1, _CHUNK_BYTES // max(1, int(np.prod(src.shape[1:]))))
    for s0 in range(0, len(order), step):
        out[s0:s0 + step] = src[order[s0:s0 + step]]
        _release(out)
        _release(src)
    out.flush()
    del out, src
    staged.unlink()


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
    if kind == "split_folder" or (meta["origin"] != "").any():  # split/class layout: the given split is kept
        role = get_source(dataset).role if kind == "split_folder" else params.image_folders[dataset].role
        return _given_splits(dataset, meta, role, params.val_fraction, rng), role
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
    """Keep one image per (class, pixel_hash): the one in the highest given split (test side), then the
    first by sorted path; quarantine the other copies."""
    rank = df["origin"].map(_ORIGIN_RANK).fillna(0).astype(int)
    order = df.assign(_rank=-rank).sort_values(["_rank", "source_path"], kind="stable")
    dup = order.duplicated(["class", "pixel_hash"], keep="first")
    first = {(c, h): s for c, h, s in zip(order["class"][~dup], order["pixel_hash"][~dup], order["source_path"][~dup])}
    rows = [imp.QuarantineRow(d, s, f"exact duplicate of {first[(c, h)]} in the same class")
            for d, s, c, h in zip(order["dataset"][dup], order["source_path"][dup], order["class"][dup],
                                  order["pixel_hash"][dup])]
    keep = np.ones(len(df), dtype=bool)
    keep[order.index[dup.to_numpy()]] = False
    return keep, rows


def _fail_cross_class_copies(df: pd.DataFrame, dataset: str) -> None:
    """Image folders: the same pixels under two class names is a labelling error only the user can fix."""
    n_cls = df.groupby("pixel_hash")["class"].transform("nunique")
    bad = df[n_cls > 1]
    if bad.empty:
        return
    lines = [f"  {', '.join(f'{p!r} ({c}, {s})' for p, c, s in zip(g['source_path'], g['class'], g['split']))}"
             for _, g in bad.groupby("pixel_hash", sort=False)]
    raise DataError(f"dataset {dataset}: {len(lines)} image(s) appear under two classes (same pixels; "
                    f"check pixel_hash_in_one_class):\n" + "\n".join(lines[:50])
                    + "\nThe same image under two labels is a labelling error: remove the wrong copy and re-run.")


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

    Image files are listed, not decoded (prepare decodes them in chunks).

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
        folder = params.image_folders[name]
        path = Path(folder.path)
        return imp.import_image_folder(path if path.is_absolute() else base_dir / path, name, folder.layout)
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
        keep, rows = _drop_within_class_copies(df)
        df, quarantine = df[keep].reset_index(drop=True), quarantine + rows
    split, role = assign_splits(data.dataset, data.kind, df, data.class_order, params, seed)
    df["split"] = split
    if data.kind in _FOLDER_KINDS:
        _fail_cross_class_copies(df, data.dataset)
    else:
        keep, rows = _drop_cross_split_copies(df)
        if rows:
            df, quarantine = df[keep].reset_index(drop=True), quarantine + rows
    # rows ordered by split: each split is one contiguous slice (load_split memory-maps it)
    rank = df["split"].map(_SPLIT_RANK).to_numpy()
    df = df.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    classes = sorted(df["class"].unique())
    df["label"] = df["class"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    df["id"] = np.arange(len(df), dtype=np.int64)
    order = df["_pos"].to_numpy()
    df = df[list(COLUMNS)]
    df = validate_manifest(df, f"dataset {data.dataset}")
    _gather(staged.path, order, dest / IMAGES_FILE)
    _save_manifest(df, dest / MANIFEST_FILE)
    return df, quarantine, role, empty


def _save_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write a manifest (parquet)."""
    df.to_parquet(path, index=False)


# --------------------------------------------------------------------------- temporary folders
# `.<out>.tmp-<tag>` (the store being built) and `.<out>.old-<tag>` (the last
# good store, moved aside for the final swap) sit beside out_dir. The tag names
# the owner (host, pid) so that a later run can tell a killed run's leftovers
# from a live run's; the random part keeps two runs of one process apart.
_HOST = f"{zlib.crc32(platform.node().encode()):08x}"
_TAG = re.compile(r"^(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{8}$")


def _work_tag() -> str:
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_alive(tag: str) -> bool | None:
    """True/False: the run that made a folder with this tag is (not) running; None: not ours to judge."""
    m = _TAG.match(tag)
    if m is None:
        return None  # not a name prepare makes
    if m["pid"] is None:
        return False  # made before tags named their owner; DVC's repo lock allowed no concurrent run then
    if m["host"] != _HOST:
        return None  # another machine's run on a shared disk: its pid means nothing here
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def clean_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Remove what killed `prepare` runs left beside `out_dir`; keep a live run's folders.

    A kill during a run leaves `.<name>.tmp-<tag>` (a partial store, often tens
    of MB). A kill between the two renames of the final swap leaves out_dir
    missing and the last good store in `.<name>.old-<tag>`: it is moved back.

    Args:
        out_dir: the prepared folder (e.g. data/prepared).

    Returns:
        The leftover folders handled (deleted, or moved back to out_dir).
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for kind in stale:
        prefix = f".{out_dir.name}.{kind}-"
        for path in out_dir.parent.glob(f"{prefix}*"):
            if path.is_dir() and not path.is_symlink() and _owner_alive(path.name[len(prefix):]) is False:
                stale[kind].append(path)
    handled = stale["tmp"] + stale["old"]
    olds = sorted(stale["old"], key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        newest = olds.pop()
        os.rename(newest, out_dir)
        log.warning("%s was missing (a run was killed during its final swap): restored the last good store from %s",
                    out_dir, newest.name)
    for path in stale["tmp"] + olds:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a prepare run that was killed", path)
    return handled


# --------------------------------------------------------------------------- all
def prepare(params: PrepareParams, datasets: tuple[str, ...], raw_dir: Path, out_dir: Path, seed: int,
            base_dir: Path | None = None) -> PrepareReport:
    """Build the prepared store for `datasets` into `out_dir`, atomically.

    Everything is written into a temporary folder beside `out_dir` (images
    streamed to disk, see `build_dataset`), which replaces `out_dir` at the end.

    Args:
        params: prepare params (image_size, channels, omniglot_protocol, meta_val_classes, val_fraction,
            image_folders).
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
    quarantine: list[imp.QuarantineRow] = []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_work_dirs(out_dir)
    tag = _work_tag()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    try:
        tmp.mkdir()
        for name in datasets:
            t = time.perf_counter()
            data = import_dataset(name, params, Path(raw_dir), base_dir)
            kind = data.kind
            df, q, role, empty = build_dataset(data, params, seed, tmp / name)
            del data  # free the raw batches before the next dataset
            quarantine += q
            splits = {s: {"images": int((df["split"] == s).sum()),
                          "classes": int(df.loc[df["split"] == s, "class"].nunique())}
                      for s in (META_SPLITS if role == "source" else TARGET_SPLITS)}
            report.datasets[name] = {
                "kind": kind, "role": role, "n_images": len(df), "n_classes": int(df["class"].nunique()),
                "splits": splits, "quarantined": len(q), "empty_classes": sorted(empty)}
            log.info("%s: %d images, %d classes, %s, %d quarantined (%.1f s)", name, len(df), df["class"].nunique(),
                     {s: v["images"] for s, v in splits.items()}, len(q), time.perf_counter() - t)
        report.quarantined = len(quarantine)
        q = pd.DataFrame([(r.dataset, r.source_path, r.reason) for r in quarantine],
                         columns=["dataset", "source_path", "reason"]).sort_values(["dataset", "source_path"])
        q.to_csv(tmp / QUARANTINE_FILE, index=False)
        doc = {"seed": seed, "image_size": params.image_size, "channels": params.channels,
               "omniglot_protocol": params.omniglot_protocol, "meta_val_classes": params.meta_val_classes,
               "val_fraction": params.val_fraction, "quarantined": report.quarantined, "datasets": report.datasets}
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
    report.seconds = time.perf_counter() - t0
    return report
