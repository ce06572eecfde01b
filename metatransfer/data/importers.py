"""Importers: raw files -> image batches + one metadata row per image.

Each importer returns an `Imported`: the images as a few same-shape batches
(array datasets stay arrays: nothing goes through PIL per image where numpy
can do it) plus a DataFrame with one row per image, in batch order.

Conventions (decided here, relied on by `prepare`):

* Pixels are uint8, layout (n, H, W, C) with C = 1 (grey) or 3 (RGB), or
  bool (Omniglot) with `ImageBatch.background_true` saying which value is
  the background.
* Omniglot polarity: ink is bright (255) on a black (0) background, i.e. the
  official True=white background is inverted, as the standard few-shot
  loaders do (Snell et al.'s `1 - x`) and as MNIST/KMNIST are stored. So the
  Omniglot source and the KMNIST near domain share one polarity.
* Class names are global: ``<dataset>/<alphabet>/<character>`` (Omniglot),
  ``<dataset>/<NN>`` with the official label zero-padded to two digits
  (MedMNIST, KMNIST: sorted name order == official label order),
  ``<dataset>/<class>`` or ``<dataset>/<domain>/<class>`` (ImageFolder).
* ``origin`` is the official split a row comes from ("background" /
  "evaluation" for Omniglot, "train" / "val" / "test" for MedMNIST, "" when
  the source has none); `prepare` turns it into the project's splits.
* ImageFolder: any PIL-readable file; EXIF orientation applied; alpha
  dropped; palette/CMYK/YCbCr -> RGB; 16-bit grey scaled to 8 bits. Files PIL
  cannot identify, corrupt or truncated images, float images and files outside
  the layout are quarantined with a reason, never silently skipped.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from metatransfer.errors import DataError

log = logging.getLogger(__name__)

META_COLUMNS = ("domain", "class", "origin", "source_path", "orig_height", "orig_width", "orig_channels")


# --------------------------------------------------------------------------- types
@dataclass(frozen=True)
class ImageBatch:
    """Same-shape images.

    Attributes:
        data: (n, H, W, C) uint8, or (n, H, W, 1) bool.
        background_true: for bool data, True means the background (Omniglot);
            the ink (False) becomes 255 when converted.
    """

    data: np.ndarray
    background_true: bool = False

    def __len__(self) -> int:
        return int(self.data.shape[0])


@dataclass(frozen=True)
class QuarantineRow:
    """An input that was skipped, and why."""

    dataset: str
    source_path: str
    reason: str


@dataclass
class Imported:
    """What an importer read from one dataset's raw files.

    Attributes:
        dataset: dataset name (prefix of every class name).
        kind: importer kind ("omniglot_npz", "omniglot_zip", "medmnist", "kmnist", "image_folder").
        batches: images; concatenated in order they match the rows of `meta`.
        meta: one row per image, columns META_COLUMNS.
        class_order: every class in the source's official order (Omniglot's vinyals split uses it).
        quarantine: skipped inputs with reasons.
        empty_classes: class folders with no usable image (ImageFolder only).
    """

    dataset: str
    kind: str
    batches: list[ImageBatch]
    meta: pd.DataFrame
    class_order: tuple[str, ...]
    quarantine: list[QuarantineRow] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = sum(len(b) for b in self.batches)
        if n != len(self.meta):  # a bug in an importer, not in the user's data
            raise AssertionError(f"{self.dataset}: {n} images but {len(self.meta)} metadata rows")


def _meta(rows: dict[str, list]) -> pd.DataFrame:
    df = pd.DataFrame({c: rows[c] for c in META_COLUMNS})
    for c in ("orig_height", "orig_width", "orig_channels"):
        df[c] = df[c].astype("int64")
    return df


def _new_rows() -> dict[str, list]:
    return {c: [] for c in META_COLUMNS}


# --------------------------------------------------------------------------- npz helpers
def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load the named arrays of an npz, with an error naming missing keys."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {missing}; expected {list(keys)}, found {sorted(z.files)}. "
                    "The file is not the official one: fetch it again."
                )
            return {k: z[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc}); fetch it again.") from None


def _labels_1d(path: Path, key: str, labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    """Accept labels (n,) or (n, 1); check integer dtype and range [0, n_classes)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {key} has shape {labels.shape}: multi-label data is not supported "
                        "(expected (N,) or (N, 1) single labels).")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{path}: {key} has shape {labels.shape}; expected ({n},) or ({n}, 1) to match the images.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {labels.dtype}; expected integer class labels.")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        show = ", ".join(f"row {i}: {labels[i]}" for i in bad[:10])
        raise DataError(f"{path}: {key}: {bad.size} label(s) out of range [0, {n_classes - 1}] ({show}"
                        f"{', ...' if bad.size > 10 else ''}). The file is corrupt or not the official one.")
    return labels.astype(np.int64)


def _images_nhwc(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """Accept (n, H, W) or (n, H, W, C in {1, 3}) uint8; return (n, H, W, C)."""
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {images.dtype}; expected uint8.")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    raise DataError(f"{path}: {key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3).")


# --------------------------------------------------------------------------- MedMNIST / KMNIST
def import_medmnist(path: Path, dataset: str, n_classes: int) -> Imported:
    """Read a MedMNIST 2D npz (keys {train,val,test}_{images,labels}).

    Args:
        path: the .npz file.
        dataset: dataset name (class prefix).
        n_classes: number of classes (labels must lie in [0, n_classes)).

    Returns:
        Imported with origin = the official split.

    Raises:
        DataError: missing keys, wrong shapes/dtypes, labels out of range.
    """
    splits = ("train", "val", "test")
    keys = tuple(f"{s}_{k}" for s in splits for k in ("images", "labels"))
    arrays = _load_npz(path, keys)
    rows = _new_rows()
    batches = []
    for s in splits:
        imgs = _images_nhwc(path, f"{s}_images", arrays[f"{s}_images"])
        labels = _labels_1d(path, f"{s}_labels", arrays[f"{s}_labels"], imgs.shape[0], n_classes)
        n, h, w, c = imgs.shape
        batches.append(ImageBatch(imgs))
        rows["domain"] += [dataset] * n
        rows["class"] += [f"{dataset}/{int(y):02d}" for y in labels]
        rows["origin"] += [s] * n
        rows["source_path"] += [f"{path.name}:{s}_images[{i}]" for i in range(n)]
        rows["orig_height"] += [h] * n
        rows["orig_width"] += [w] * n
        rows["orig_channels"] += [c] * n
    order = tuple(f"{dataset}/{i:02d}" for i in range(n_classes))
    return Imported(dataset, "medmnist", batches, _meta(rows), order)


def import_kmnist(images_path: Path, labels_path: Path, dataset: str = "kmnist", n_classes: int = 10) -> Imported:
    """Read the KMNIST npz pair (each with one array ``arr_0``).

    Args:
        images_path: kmnist-*-imgs.npz, arr_0 (N, 28, 28) uint8.
        labels_path: kmnist-*-labels.npz, arr_0 (N,) labels.
        dataset: dataset name.
        n_classes: number of classes.

    Returns:
        Imported with origin "" (all one pool).

    Raises:
        DataError: missing keys, wrong shapes, labels out of range.
    """
    imgs = _images_nhwc(images_path, "arr_0", _load_npz(images_path, ("arr_0",))["arr_0"])
    labels = _labels_1d(labels_path, "arr_0", _load_npz(labels_path, ("arr_0",))["arr_0"], imgs.shape[0], n_classes)
    n, h, w, c = imgs.shape
    rows = {
        "domain": [dataset] * n,
        "class": [f"{dataset}/{int(y):02d}" for y in labels],
        "origin": [""] * n,
        "source_path": [f"{images_path.name}:arr_0[{i}]" for i in range(n)],
        "orig_height": [h] * n, "orig_width": [w] * n, "orig_channels": [c] * n,
    }
    order = tuple(f"{dataset}/{i:02d}" for i in range(n_classes))
    return Imported(dataset, "kmnist", [ImageBatch(imgs)], _meta(rows), order)


# --------------------------------------------------------------------------- Omniglot
def import_omniglot_npz(background: Path, evaluation: Path, index_csv: Path, dataset: str = "omniglot") -> Imported:
    """Read the Omniglot npz pair plus character_index.csv (names of each npz row).

    Args:
        background: images_background.npz (images bool (964, 20, 105, 105), labels (964, 20)).
        evaluation: images_evaluation.npz (659 characters).
        index_csv: columns split,npz_label,omniglot_char_id,alphabet,character.
        dataset: dataset name.

    Returns:
        Imported with origin "background"/"evaluation"; class order = omniglot_char_id.

    Raises:
        DataError: missing keys, wrong shapes, an index that does not cover the npz rows.
    """
    try:
        index = pd.read_csv(index_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{index_csv}: cannot read ({exc}); fetch it again.") from None
    need = {"split", "npz_label", "omniglot_char_id", "alphabet", "character"}
    if not need <= set(index.columns):
        raise DataError(f"{index_csv}: missing column(s) {sorted(need - set(index.columns))}; found {list(index.columns)}.")
    rows = _new_rows()
    batches = []
    order: list[tuple[int, str]] = []
    for origin, path in (("background", background), ("evaluation", evaluation)):
        arr = _load_npz(path, ("images", "labels"))
        images, labels = arr["images"], arr["labels"]
        if images.dtype != np.bool_ or images.ndim != 4:
            raise DataError(f"{path}: images has shape {images.shape} dtype {images.dtype}; "
                            "expected bool (characters, drawers, H, W).")
        n_char, n_draw, h, w = images.shape
        if labels.shape != (n_char, n_draw) or not (labels == np.arange(n_char)[:, None]).all():
            raise DataError(f"{path}: labels must be ({n_char}, {n_draw}) with row i == i; found shape {labels.shape}.")
        part = index[index["split"] == origin].copy()
        part["npz_label"] = pd.to_numeric(part["npz_label"], errors="coerce")
        if len(part) != n_char or sorted(part["npz_label"].tolist()) != list(range(n_char)):
            raise DataError(f"{index_csv}: rows with split={origin!r} must cover npz labels 0..{n_char - 1} once each "
                            f"(found {len(part)} rows); the index does not match {path.name}.")
        part = part.sort_values("npz_label")
        names = [f"{dataset}/{a}/{c}" for a, c in zip(part["alphabet"], part["character"])]
        order += [(int(cid), nm) for cid, nm in zip(part["omniglot_char_id"], names)]
        batches.append(ImageBatch(images.reshape(n_char * n_draw, h, w, 1), background_true=True))
        n = n_char * n_draw
        rows["domain"] += [dataset] * n
        rows["class"] += [nm for nm in names for _ in range(n_draw)]
        rows["origin"] += [origin] * n
        rows["source_path"] += [f"{path.name}:images[{i},{j}]" for i in range(n_char) for j in range(n_draw)]
        rows["orig_height"] += [h] * n
        rows["orig_width"] += [w] * n
        rows["orig_channels"] += [1] * n
    return Imported(dataset, "omniglot_npz", batches, _meta(rows), tuple(nm for _, nm in sorted(order)))


def import_omniglot_zips(zips: list[Path], dataset: str) -> Imported:
    """Read official Omniglot zips (``<top>/<alphabet>/<characterNN>/<id>_<drawer>.png``).

    Zips whose name contains "evaluation" give origin "evaluation", others
    "background". The same ``alphabet/character/file`` in two zips (the two
    official small sets share Greek and Latin) is imported once.

    Args:
        zips: zip files, in order (background before evaluation).
        dataset: dataset name.

    Returns:
        Imported; class order = sorted (alphabet, character) per zip, zips in order.

    Raises:
        DataError: a zip cannot be read or holds no PNG.
    """
    rows = _new_rows()
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    group_rows: dict[tuple[int, int], dict[str, list]] = {}
    quarantine: list[QuarantineRow] = []
    seen: set[str] = set()
    order: list[str] = []
    for zp in zips:
        origin = "evaluation" if "evaluation" in zp.name else "background"
        try:
            zf = zipfile.ZipFile(zp)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{zp}: not a readable zip ({exc}); fetch it again.") from None
        with zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
            if not names:
                raise DataError(f"{zp}: holds no .png file; expected <top>/<alphabet>/<character>/*.png.")
            for name in names:
                parts = name.split("/")
                rel = "/".join(parts[1:])
                src = f"{zp.name}:{name}"
                if len(parts) != 4:
                    quarantine.append(QuarantineRow(dataset, src, "unexpected path depth (expected top/alphabet/character/file.png)"))
                    continue
                if rel in seen:
                    continue
                seen.add(rel)
                try:
                    with Image.open(io.BytesIO(zf.read(name))) as im:
                        im.load()
                        arr = np.asarray(im.convert("1") if im.mode != "1" else im, dtype=bool)
                except Exception as exc:  # noqa: BLE001 (any decoder failure is a quarantine reason)
                    quarantine.append(QuarantineRow(dataset, src, f"corrupt image: {exc}"))
                    continue
                cls = f"{dataset}/{parts[1]}/{parts[2]}"
                if not order or order[-1] != cls:
                    if cls not in order:
                        order.append(cls)
                key = arr.shape
                groups.setdefault(key, []).append(arr)
                r = group_rows.setdefault(key, _new_rows())
                r["domain"].append(dataset)
                r["class"].append(cls)
                r["origin"].append(origin)
                r["source_path"].append(src)
                r["orig_height"].append(arr.shape[0])
                r["orig_width"].append(arr.shape[1])
                r["orig_channels"].append(1)
    batches = []
    for key in groups:
        batches.append(ImageBatch(np.stack(groups[key])[..., None], background_true=True))
        for c in META_COLUMNS:
            rows[c] += group_rows[key][c]
    return Imported(dataset, "omniglot_zip", batches, _meta(rows), tuple(order), quarantine)


# --------------------------------------------------------------------------- ImageFolder
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


def decode_image(path: Path) -> tuple[np.ndarray, int]:
    """Decode one image file to uint8 (H, W, C) with C in {1, 3}.

    Args:
        path: any PIL-readable image.

    Returns:
        (pixels, colour channels of the decoded image: 1 grey, 3 colour).

    Raises:
        _Rejected: not an image, corrupt, truncated, too large or float pixels (message = reason).
    """
    try:
        with Image.open(path) as im:
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
    except Image.DecompressionBombError as exc:
        raise _Rejected(f"too large: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (any decoder failure is a quarantine reason)
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            raise _Rejected(f"truncated image: {msg}") from None
        raise _Rejected(f"corrupt image: {type(exc).__name__}: {msg}") from None


def import_image_folder(root: Path, dataset: str) -> Imported:
    """Read a user's ImageFolder tree: ``class/img.*`` or ``domain/class/img.*``.

    The layout is detected from the depth of the files. Files at the top of
    the tree, files nested deeper than the layout, non-images and corrupt or
    truncated images are quarantined with a reason; class folders left with
    no usable image are reported in `empty_classes` (and logged).

    Args:
        root: the tree's root folder.
        dataset: dataset name.

    Returns:
        Imported with origin "" and domain = dataset (class layout) or the domain folder.

    Raises:
        DataError: the folder is missing, mixes both layouts, or has no usable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder for dataset {dataset!r} not found; fix prepare.image_folders.{dataset}.path.")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    depth = {p: len(p.relative_to(root).parts) for p in files}
    d2 = [p for p in files if depth[p] == 2]
    d3 = [p for p in files if depth[p] == 3]
    if d2 and d3:
        raise DataError(
            f"{root}: mixes the class/image layout ({d2[0].relative_to(root)}) and the domain/class/image layout "
            f"({d3[0].relative_to(root)}); use one layout for the whole tree."
        )
    layout_depth = 3 if d3 else 2
    quarantine: list[QuarantineRow] = []
    # every folder at the class level is a class, even with no file in it
    if layout_depth == 2:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    else:
        class_dirs = sorted(c for d in root.iterdir() if d.is_dir() for c in d.iterdir() if c.is_dir())
    counts = {c: 0 for c in class_dirs}
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    group_rows: dict[tuple[int, ...], dict[str, list]] = {}
    for p in files:
        rel = p.relative_to(root)
        src = str(p)
        if depth[p] != layout_depth:
            where = "at the top of the tree, outside any class folder" if depth[p] == 1 else "nested deeper than the layout"
            quarantine.append(QuarantineRow(dataset, src, f"file {where} ({rel})"))
            continue
        try:
            arr, channels = decode_image(p)
        except _Rejected as exc:
            quarantine.append(QuarantineRow(dataset, src, str(exc)))
            continue
        cls_dir = p.parent
        counts[cls_dir] = counts.get(cls_dir, 0) + 1
        domain = rel.parts[0] if layout_depth == 3 else dataset
        cls = f"{dataset}/{'/'.join(rel.parts[:-1])}"
        groups.setdefault(arr.shape, []).append(arr)
        r = group_rows.setdefault(arr.shape, _new_rows())
        r["domain"].append(domain)
        r["class"].append(cls)
        r["origin"].append("")
        r["source_path"].append(src)
        r["orig_height"].append(arr.shape[0])
        r["orig_width"].append(arr.shape[1])
        r["orig_channels"].append(channels)
    empty = [f"{dataset}/{c.relative_to(root).as_posix()}" for c, n in counts.items() if n == 0]
    for e in empty:
        log.warning("%s: class folder %s has no usable image (empty or all quarantined)", root, e)
    rows = _new_rows()
    batches = []
    for key, arrs in groups.items():
        batches.append(ImageBatch(np.stack(arrs)))
        for c in META_COLUMNS:
            rows[c] += group_rows[key][c]
    if not batches:
        raise DataError(f"{root}: no usable image found ({len(quarantine)} file(s) quarantined); "
                        "expected class/image.* or domain/class/image.* with PIL-readable images.")
    meta = _meta(rows)
    order = tuple(sorted(set(meta["class"])))
    return Imported(dataset, "image_folder", batches, meta, order, quarantine, empty)


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
