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
* Bounds (image files): an image whose header declares more than
  MAX_IMAGE_PIXELS pixels, or a side below MIN_IMAGE_SIDE, is quarantined
  before any pixel is decoded (a 13000x13000 RGB PNG of 1.6 MB would take
  0.5 GB decoded, 2 GB as float); PIL's DecompressionBombWarning is an error
  while `decode_files` runs.
* Links: a symbolic link (file or folder) whose target lies outside the
  dataset folder, or whose target is missing, is quarantined; a link to a
  folder inside the tree is not followed (quarantined: its files are listed
  where they really are). A csv row naming a file outside the dataset
  folder (``../x.jpg``, an absolute path, a link leading out) is quarantined
  the same way. Hard links are ordinary files (fetch makes them).
* Image files (ImageFolder, the split folders of brain_tumor_mri /
  ham10000_mel_nv, the mini-ImageNet csv layout) are *not* decoded by the
  importer: it returns an `ImageFiles` batch (paths) with ``orig_*`` = 0, and
  `prepare` decodes them in bounded chunks (`decode_image`), quarantining the
  files that fail, so no whole dataset is ever held in memory. `materialise`
  decodes such an Imported eagerly (small trees, tests).
* Layouts of image folders: ``class/img`` and ``domain/class/img`` (origin
  ""), ``split/class/img`` (origin = the split: top-level folders named
  train|training, val|valid|validation, test|testing, any case), and the Ravi
  & Larochelle csv layout (``images/`` + ``train.csv``/``val.csv``/``test.csv``
  with header ``filename,label``; origin = the csv's split, class = the wnid).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
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
class ImageFiles:
    """Images still on disk, one path per metadata row; decoded later in chunks.

    Attributes:
        paths: the image files, in metadata row order.
    """

    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)


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
        kind: importer kind ("omniglot_npz", "omniglot_zip", "medmnist", "kmnist", "image_folder",
            "csv_split", "split_folder").
        batches: images (arrays, or files decoded later); concatenated in order they match the rows of `meta`.
        meta: one row per image, columns META_COLUMNS.
        class_order: every class in the source's official order (Omniglot's vinyals split uses it;
            for image folders every class folder, including empty ones).
        quarantine: skipped inputs with reasons.
        empty_classes: class folders with no usable image (image folders; filled once decoded).
        layout: the image-folder layout used ("class", "domain/class", "split/class", "csv"; "" for arrays).
    """

    dataset: str
    kind: str
    batches: list[ImageBatch | ImageFiles]
    meta: pd.DataFrame
    class_order: tuple[str, ...]
    quarantine: list[QuarantineRow] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    layout: str = ""

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
# The official label names (medmnist 3.x info.py, INFO["<name>"]["label"]; cross-checked against the
# mirror's <name>.INFO.json), index i -> name. A dataset not listed keeps "<dataset>/NN".
MEDMNIST_LABELS: dict[str, tuple[str, ...]] = {
    "breastmnist": ("malignant", "normal, benign"),
    "retinamnist": ("0", "1", "2", "3", "4"),  # diabetic retinopathy grades
}


def medmnist_class_names(dataset: str, n_classes: int) -> tuple[str, ...]:
    """Class names of a MedMNIST dataset in official label order: `<dataset>/<official label>`.

    The store numbers classes in sorted name order (metatransfer/data/store.py), so
    official names are used only when they sort in label order (then label i of
    the npz stays label i everywhere, served predictions included); otherwise, and
    for datasets without known names, `<dataset>/NN`.

    Args:
        dataset: the dataset name (also the key of MEDMNIST_LABELS).
        n_classes: the number of classes the source declares.

    Returns:
        n_classes distinct names, index i = npz label i.
    """
    labels = MEDMNIST_LABELS.get(dataset)
    names = tuple(f"{dataset}/{label}" for label in labels) if labels else ()
    if len(names) != n_classes or list(names) != sorted(set(names)):
        names = tuple(f"{dataset}/{i:02d}" for i in range(n_classes))
    return names


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
    names = medmnist_class_names(dataset, n_classes)
    rows = _new_rows()
    batches = []
    for s in splits:
        imgs = _images_nhwc(path, f"{s}_images", arrays[f"{s}_images"])
        labels = _labels_1d(path, f"{s}_labels", arrays[f"{s}_labels"], imgs.shape[0], n_classes)
        n, h, w, c = imgs.shape
        batches.append(ImageBatch(imgs))
        rows["domain"] += [dataset] * n
        rows["class"] += [names[int(y)] for y in labels]
        rows["origin"] += [s] * n
        rows["source_path"] += [f"{path.name}:{s}_images[{i}]" for i in range(n)]
        rows["orig_height"] += [h] * n
        rows["orig_width"] += [w] * n
        rows["orig_channels"] += [c] * n
    return Imported(dataset, "medmnist", batches, _meta(rows), names)


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


SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "test": "test", "testing": "test"}
LAYOUTS = ("auto", "class", "split/class", "domain/class")
MANIFEST_NAME = "SHA256SUMS"
CSV_SPLITS = ("train", "val", "test")


def _is_real_dir(path: Path) -> bool:
    """A folder that is not a symbolic link (links are judged by `list_tree`)."""
    return path.is_dir() and not path.is_symlink()


def _inside(path: Path, real_root: Path) -> bool:
    """Whether `path`, all links resolved, lies in `real_root` (itself resolved)."""
    return path.resolve().is_relative_to(real_root)


def list_tree(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file of a dataset tree, and the entries the link policy refuses.

    Folder links are not entered (no file is listed twice, no cycle is
    followed). A link to a file inside the tree counts as a file; a link whose
    target lies outside the tree or is missing, and a link to a folder, are
    refused with a reason.

    Args:
        root: the tree's root folder (may itself be a link: its target is the tree).

    Returns:
        (files, sorted; [(refused entry, reason)], sorted).
    """
    real_root = root.resolve()
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    def unreadable(exc: OSError) -> None:  # os.walk would skip it silently
        refused.append((Path(exc.filename), f"cannot read the folder: {exc.strerror}"))

    # followlinks=False: a linked folder is listed, not entered
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            if not path.is_symlink():
                if name in filenames:
                    files.append(path)
                continue
            target = path.resolve()
            if not target.exists():
                refused.append((path, f"broken link: its target {os.readlink(path)} does not exist"))
            elif not target.is_relative_to(real_root):
                refused.append((path, f"link leaves the dataset folder: it points to {target}, outside {real_root}; "
                                      "copy the file into the folder (or hard-link it) instead"))
            elif target.is_dir():
                refused.append((path, f"link to a folder ({target.relative_to(real_root)}) inside the tree is not "
                                      "followed: its files are read where they are"))
            else:
                files.append(path)
    return sorted(files), sorted(refused)


def detect_layout(root: Path) -> str:
    """The layout of an image-folder tree: "split/class", "domain/class" or "class".

    "split/class" when every top-level folder is a split name (train|training,
    val|valid|validation, test|testing, any case); otherwise "domain/class"
    when files lie three levels deep, else "class".

    Args:
        root: the tree's root folder.

    Returns:
        The layout name.
    """
    tops = [p.name.lower() for p in root.iterdir() if _is_real_dir(p)]
    if tops and all(t in SPLIT_FOLDER_NAMES for t in tops):
        return "split/class"
    deep = any(len(p.relative_to(root).parts) == 3 for p in list_tree(root)[0])
    return "domain/class" if deep else "class"


def import_image_folder(root: Path, dataset: str, layout: str = "auto", relative_paths: bool = False,
                        kind: str = "image_folder") -> Imported:
    """List an image-folder tree: ``class/img.*``, ``domain/class/img.*`` or ``split/class/img.*``.

    Nothing is decoded here (see `ImageFiles`, `materialise`, prepare's
    chunked decoding). Files at the top of the tree, files nested deeper
    or shallower than the layout, and links the link policy refuses (see
    `list_tree`) are quarantined with a reason.

    Args:
        root: the tree's root folder.
        dataset: dataset name.
        layout: "auto" (see `detect_layout`), "class", "domain/class" or "split/class".
        relative_paths: record ``source_path`` relative to `root` (registered datasets: the
            manifest then does not depend on where the project lies) instead of absolute.
        kind: the Imported kind ("image_folder" for a user's tree, "split_folder" for registered ones).

    Returns:
        Imported with one `ImageFiles` batch; origin "" (class, domain/class) or the split
        ("train"/"val"/"test"); domain = dataset or the domain folder; class = ``<dataset>/<class>``
        (``<dataset>/<domain>/<class>``).

    Raises:
        DataError: the folder is missing, mixes layouts, has unknown or clashing split folders,
            or holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder for dataset {dataset!r} not found; fix prepare.image_folders.{dataset}.path "
                        "(or the mirror folder of a registered dataset).")
    if layout not in LAYOUTS:
        raise DataError(f"{root}: unknown layout {layout!r} for dataset {dataset!r}; expected one of {list(LAYOUTS)}.")
    files, refused = list_tree(root)
    depth = {p: len(p.relative_to(root).parts) for p in files}
    if layout == "auto":
        layout = detect_layout(root)
        if layout != "split/class":
            d2 = [p for p in files if depth[p] == 2]
            d3 = [p for p in files if depth[p] == 3]
            if d2 and d3:
                raise DataError(
                    f"{root}: mixes the class/image layout ({d2[0].relative_to(root)}) and the domain/class/image "
                    f"layout ({d3[0].relative_to(root)}); use one layout for the whole tree (or set "
                    f"prepare.image_folders.{dataset}.layout)."
                )
    layout_depth = 2 if layout == "class" else 3
    splits: dict[str, str] = {}
    if layout == "split/class":
        for d in sorted(p for p in root.iterdir() if _is_real_dir(p)):
            split = SPLIT_FOLDER_NAMES.get(d.name.lower())
            if split is None:
                raise DataError(f"{root}: top-level folder {d.name!r} is not a split name; with layout split/class "
                                f"expected folders named {sorted(SPLIT_FOLDER_NAMES)} (any case). Move or rename it.")
            if split in splits.values():
                other = next(k for k, v in splits.items() if v == split)
                raise DataError(f"{root}: folders {other!r} and {d.name!r} both mean split {split!r}; merge them.")
            splits[d.name] = split
        if "train" not in splits.values() and "test" not in splits.values():
            raise DataError(f"{root}: layout split/class needs a train (or training) or test (or testing) folder; "
                            f"found {sorted(splits)}.")
    # every folder at the class level is a class, even with no file in it
    if layout == "class":
        class_dirs = sorted(p for p in root.iterdir() if _is_real_dir(p))
    else:
        class_dirs = sorted(c for d in root.iterdir() if _is_real_dir(d) for c in d.iterdir() if _is_real_dir(c))

    def class_of(rel_parts: tuple[str, ...]) -> str:
        if layout == "split/class":
            return f"{dataset}/{rel_parts[1]}"
        return f"{dataset}/{'/'.join(rel_parts[:layout_depth - 1])}"

    quarantine = [QuarantineRow(dataset, p.relative_to(root).as_posix() if relative_paths else str(p), reason)
                  for p, reason in refused]
    rows = _new_rows()
    paths: list[Path] = []
    for p in files:
        rel = p.relative_to(root)
        src = rel.as_posix() if relative_paths else str(p)
        if depth[p] == 1 and p.name == MANIFEST_NAME:  # the folder's checksum list, not an image
            continue
        if depth[p] != layout_depth:
            where = ("at the top of the tree, outside any class folder" if depth[p] == 1
                     else "nested deeper than the layout" if depth[p] > layout_depth else "outside any class folder")
            quarantine.append(QuarantineRow(dataset, src, f"file {where} ({rel}; layout {layout})"))
            continue
        paths.append(p)
        rows["domain"].append(rel.parts[0] if layout == "domain/class" else dataset)
        rows["class"].append(class_of(rel.parts))
        rows["origin"].append(splits[rel.parts[0]] if layout == "split/class" else "")
        rows["source_path"].append(src)
        rows["orig_height"].append(0)
        rows["orig_width"].append(0)
        rows["orig_channels"].append(0)
    if not paths:
        raise DataError(f"{root}: no usable image found ({len(quarantine)} file(s) quarantined); expected "
                        f"{layout}/image.* files (layout {layout}).")
    order = tuple(sorted({class_of(c.relative_to(root).parts + ("x",)) for c in class_dirs}))
    meta = _meta(rows)
    if layout == "split/class":  # rows grouped by split (train, val, test) so each split is contiguous
        rank = meta["origin"].map({"train": 0, "val": 1, "test": 2})
        perm = np.argsort(rank.to_numpy(), kind="stable")
        meta = meta.iloc[perm].reset_index(drop=True)
        paths = [paths[i] for i in perm]
    return Imported(dataset, kind, [ImageFiles(tuple(paths))], meta, order, quarantine, [], layout)


def import_csv_split(root: Path, dataset: str, relative_paths: bool = True) -> Imported:
    """Read the Ravi & Larochelle csv layout (mini-ImageNet as distributed).

    ``root/images/<file>`` plus ``root/{train,val,test}.csv``, each with the
    header ``filename,label`` (label = the ImageNet wnid). The csvs give the
    class-disjoint split; rows come out ordered train, val, test (csv order).

    Args:
        root: the folder.
        dataset: dataset name (class names are ``<dataset>/<wnid>``).
        relative_paths: record ``source_path`` as ``images/<file>`` (default) instead of absolute.

    Returns:
        Imported (kind "csv_split") with one `ImageFiles` batch; origin = the csv's split.
        Files in images/ that no csv lists, and rows naming a file outside the folder, are quarantined.

    Raises:
        DataError: a csv is missing or has another header, an empty field, a file listed twice
            (in one csv or in two splits), a class in two splits, or files the csvs list but images/
            lacks (each names the csv, row and file).
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found; the csv layout is images/ + train.csv, val.csv, test.csv "
                        "(header filename,label).")
    real_root = root.resolve()
    refused: list[QuarantineRow] = []
    refused_paths: set[Path] = set()
    seen: dict[str, tuple[str, int]] = {}
    class_split: dict[str, tuple[str, int]] = {}
    rows = _new_rows()
    paths: list[Path] = []
    missing: list[str] = []
    problems: list[str] = []
    for split in CSV_SPLITS:
        path = root / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path}: not found; the csv layout needs train.csv, val.csv and test.csv "
                            "(header filename,label).")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != ["filename", "label"]:
                raise DataError(f"{path}: header must be 'filename,label' (Ravi & Larochelle layout), found "
                                f"{','.join(header) if header else 'an empty file'!r}. Fix the first line.")
            for line_no, rec in enumerate(reader, 2):
                if not rec:
                    continue
                if len(rec) != 2 or not rec[0].strip() or not rec[1].strip():
                    problems.append(f"{path.name} line {line_no}: expected 'filename,label', found {','.join(rec)!r}")
                    continue
                fname, label = rec[0].strip(), rec[1].strip()
                if fname in seen:
                    where = seen[fname]
                    kind = "listed twice" if where[0] == split else "in two splits"
                    problems.append(f"{path.name} line {line_no}: image {fname!r} {kind} (also {where[0]}.csv line "
                                    f"{where[1]})")
                    continue
                seen[fname] = (split, line_no)
                if label in class_split and class_split[label][0] != split:
                    first = class_split[label]
                    problems.append(f"{path.name} line {line_no}: class {label!r} in two splits (first in {first[0]}.csv "
                                    f"line {first[1]}); the csv splits must be class-disjoint")
                    continue
                class_split.setdefault(label, (split, line_no))
                p = images_dir / fname
                if not _inside(p, real_root):  # "../x.jpg", an absolute path, or a link leading out
                    refused.append(QuarantineRow(
                        dataset, f"images/{fname}" if relative_paths else str(p),
                        f"{path.name} line {line_no}: the file lies outside the dataset folder (resolves to "
                        f"{p.resolve()}, outside {real_root}); copy it into images/ and list it by its name"))
                    refused_paths.add(p)
                    continue
                if not p.is_file():
                    missing.append(f"{path.name} line {line_no}: {p}")
                    continue
                paths.append(p)
                rows["domain"].append(dataset)
                rows["class"].append(f"{dataset}/{label}")
                rows["origin"].append(split)
                rows["source_path"].append(f"images/{fname}" if relative_paths else str(p))
                rows["orig_height"].append(0)
                rows["orig_width"].append(0)
                rows["orig_channels"].append(0)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(f"{root}: {len(problems)} problem(s) in the split csvs:\n  {shown}\n"
                        "Fix those rows (each image in one csv once; each class in one split) and re-run.")
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DataError(f"{root}: {len(missing)} image(s) listed in the csvs are not in images/:\n  {shown}\n"
                        "Restore the files (fetch again from a complete copy) or remove their rows from the csvs.")
    listed = {p.name for p in paths}
    quarantine = refused + [QuarantineRow(dataset, f"images/{p.name}" if relative_paths else str(p),
                                          "not listed in train.csv, val.csv or test.csv")
                            for p in sorted(images_dir.iterdir())
                            if p.is_file() and p.name not in listed and p not in refused_paths]
    if not paths:
        raise DataError(f"{root}: the csvs list no image; expected rows 'filename,label'.")
    meta = _meta(rows)
    return Imported(dataset, "csv_split", [ImageFiles(tuple(paths))], meta, tuple(sorted(set(meta["class"]))),
                    quarantine, [], "csv")


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
    rows = _new_rows()
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
    meta = _meta(rows)
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
