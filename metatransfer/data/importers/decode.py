"""Image files: the size bounds checked from the header, decoding to uint8 pixels, and eager decoding of an Imported."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from metatransfer.data.importers.types import META_COLUMNS, ImageBatch, Imported, QuarantineRow, meta_frame, new_rows
from metatransfer.errors import DataError

log = logging.getLogger(__name__)


class _Rejected(Exception):
    """An input file that goes to quarantine (the message is the reason)."""


_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"))


def _magic_format(path: Path) -> str:
    """The image format a file's first bytes announce, or ""."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return ""
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), "")


# Bounds on the images a folder may hold, checked from the file header before any pixel is decoded.
# Every image is resized to prepare.image_size (16..224 px in practice), so 40 Mpx (a 7200x5500 photo;
# 120 MB as uint8 RGB, 480 MB as float32 while converting) leaves room for most camera and scanner
# images while bounding what one file can cost; PIL's own guard only warns up to 179 Mpx (a 1.6 MB PNG
# can declare 13000x13000). Below 8 px a side (half the smallest prepare.image_size, 16) there is too
# little left to resize into an image: a 1x1 file, a stray icon or tracking pixel.
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 8


def _check_bounds(width: int, height: int) -> None:
    """Refuse an image whose declared size is outside [MIN_IMAGE_SIDE, MAX_IMAGE_PIXELS] (message = reason)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise _Rejected(f"too large: {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS:,} (MAX_IMAGE_PIXELS); not decoded. Downscale the file")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise _Rejected(f"too small: {width}x{height} pixels, a side below {MIN_IMAGE_SIDE} px (MIN_IMAGE_SIDE); "
                        "not an image worth resizing (icon, placeholder or thumbnail?)")


def decode_image(path: Path) -> tuple[np.ndarray, int]:
    """Decode one image file to uint8 (H, W, C) with C in {1, 3}.

    The size the header declares is checked against MAX_IMAGE_PIXELS and
    MIN_IMAGE_SIDE before decoding (PIL's ``Image.open`` reads only the header).

    Args:
        path: any PIL-readable image.

    Returns:
        (pixels, colour channels of the decoded image: 1 grey, 3 colour).

    Raises:
        _Rejected: not an image, corrupt, truncated, too large, too small or float pixels (message = reason).
    """
    try:
        with Image.open(path) as im:
            _check_bounds(*im.size)
            im.load()  # full decode: truncation and corrupt data surface here, not later
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("1", "L", "LA"):
                arr = np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
                return arr, 1
            if mode.startswith("I"):  # 16/32-bit grey: assume the 16-bit range
                a = np.asarray(im, dtype=np.int64)
                arr = (np.clip(a, 0, 65535) // 257).astype(np.uint8)[..., None]
                return arr, 1
            if mode == "F":
                raise _Rejected("unsupported pixel mode F (floating point); save it as 8/16-bit PNG or TIFF")
            return np.asarray(im.convert("RGB"), dtype=np.uint8), 3
    except _Rejected:
        raise
    except UnidentifiedImageError:
        fmt = _magic_format(path)
        if fmt:  # an image's signature with undecodable content: damaged, not a stray file
            raise _Rejected(f"corrupt image: starts like a {fmt} file but PIL cannot decode it") from None
        raise _Rejected("not an image: PIL cannot identify the file format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's guard fired first
        raise _Rejected(f"too large: {str(exc).rstrip('.')}; not decoded (the limit here is {MAX_IMAGE_PIXELS:,} "
                        "pixels, MAX_IMAGE_PIXELS). Downscale the file") from None
    except Exception as exc:  # noqa: BLE001 (any decoder failure is a quarantine reason)
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise _Rejected(f"truncated image: {msg}") from None
        raise _Rejected(f"corrupt image: {type(exc).__name__}: {msg}") from None



def decode_files(paths: list[Path] | tuple[Path, ...], workers: int = 2
                 ) -> list[tuple[np.ndarray, int] | str]:
    """Decode image files (threads: PIL releases the GIL while decoding).

    Args:
        paths: image files.
        workers: decoding threads (1 = in this thread).

    Returns:
        Per path, in order: (uint8 (H, W, C) pixels, colour channels) or the quarantine reason (str).
    """
    def one(p: Path) -> tuple[np.ndarray, int] | str:
        try:
            return decode_image(p)
        except _Rejected as exc:
            return str(exc)

    # PIL only warns about a decompression bomb below twice its limit; make it an error. The filter is set
    # here, around the pool, not per image: warning filters are process-wide, and entering
    # catch_warnings from several threads at once can restore the wrong list.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if workers <= 1 or len(paths) < 8:
            return [one(p) for p in paths]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, paths, chunksize=16))


def materialise(data: Imported) -> Imported:
    """Decode every `ImageFiles` batch of an Imported into in-memory `ImageBatch`es.

    For small trees and tests (prepare streams instead). Files that fail to
    decode are quarantined; ``orig_*`` columns are filled; class folders left
    without an image are reported in `empty_classes` (and logged).

    Args:
        data: an Imported (array batches are kept as they are).

    Returns:
        A new Imported whose batches are all ImageBatch (grouped by shape), rows matching.

    Raises:
        DataError: no usable image at all.
    """
    rows = new_rows()
    batches: list[ImageBatch] = []
    quarantine = list(data.quarantine)
    start = 0
    for b in data.batches:
        part = data.meta.iloc[start:start + len(b)].copy()
        start += len(b)
        if isinstance(b, ImageBatch):
            batches.append(b)
            for c in META_COLUMNS:
                rows[c] += part[c].tolist()
            continue
        groups: dict[tuple[int, ...], list[int]] = {}
        arrays: dict[int, np.ndarray] = {}
        for i, (res, (_, r)) in enumerate(zip(decode_files(b.paths), part.iterrows())):
            if isinstance(res, str):
                quarantine.append(QuarantineRow(data.dataset, r["source_path"], res))
                continue
            arrays[i] = res[0]
            groups.setdefault(res[0].shape, []).append(i)
            part.iat[i, part.columns.get_loc("orig_height")] = res[0].shape[0]
            part.iat[i, part.columns.get_loc("orig_width")] = res[0].shape[1]
            part.iat[i, part.columns.get_loc("orig_channels")] = res[1]
        for idx in groups.values():
            batches.append(ImageBatch(np.stack([arrays[i] for i in idx])))
            for c in META_COLUMNS:
                rows[c] += part[c].iloc[idx].tolist()
    if not batches:
        raise DataError(f"{data.dataset}: no usable image found ({len(quarantine)} file(s) quarantined).")
    meta = meta_frame(rows)
    empty = sorted(set(data.class_order) - set(meta["class"])) if data.kind != "csv_split" else []
    for e in empty:
        log.warning("%s: class folder %s has no usable image (empty or all quarantined)", data.dataset, e)
    return Imported(data.dataset, data.kind, batches, meta, data.class_order, quarantine, empty, data.layout)


def iter_chunks(batch: ImageBatch, size: int) -> Iterator[np.ndarray]:
    """Yield consecutive slices of a batch's data of at most `size` images.

    Args:
        batch: the batch.
        size: chunk length.

    Returns:
        An iterator of array views.
    """
    for start in range(0, len(batch), size):
        yield batch.data[start:start + size]
