"""Conversion of imported images to the store's size and channels, pixel hashes, and the staged memmap.

Images are converted to params.channels and params.image_size (a dataset's
own in `params.per_dataset`, see PrepareParams.shape_of) with
vectorised torch on batches: RGB -> grey with ITU-R 601 luma 0.299 R +
0.587 G + 0.114 B; grey -> RGB by replication; "area" averaging when
shrinking, antialiased bilinear when enlarging; images already at the target
size are left untouched.

Memory and writing: image files are decoded in chunks of _FILE_CHUNK files
(threads), converted in steps bounded to about _CHUNK_BYTES of float32, and
written to a staged ``.npy`` memmap (``np.lib.format.open_memmap``) in import
order, whose pages are flushed and dropped from the resident set as it goes.
After hashing, de-duplication, splitting and validation, the kept rows are
gathered in split order (each split one contiguous block; within a split,
import order) into ``images.npy`` by `gather_rows` (the staged file is renamed when the order
is already right). No whole dataset is held in memory: peak RSS stays at the
interpreter + libraries + one chunk (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metatransfer.config import PrepareParams
from metatransfer.data import importers as imp

_CHUNK = 2048  # at most this many images per conversion step
_CHUNK_BYTES = 96 << 20  # float32 working set per conversion step (about 3x this at peak)
_FILE_CHUNK = 256  # image files decoded per step (256 x 224x224x3 = 38 MB of uint8)
_DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
_LUMA = (0.299, 0.587, 0.114)


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
        params: prepare params (image_size, channels; `per_dataset` gives a dataset its own).
        path: the .npy file to write (N = len(data.meta) rows).
        workers: decoding threads.

    Returns:
        The staged result (pixel hash per row, failed mask, quarantine rows).
    """
    ch, size = params.shape_of(data.dataset)
    n = len(data.meta)
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


def gather_rows(staged: Path, order: np.ndarray, dest: Path) -> None:
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

