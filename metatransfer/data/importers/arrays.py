"""Array datasets stored as npz: MedMNIST, KMNIST and a user's own MedMNIST-format file (`prepare.npz_files`)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from metatransfer.data.importers.decode import MIN_IMAGE_SIDE
from metatransfer.data.importers.types import ImageBatch, Imported, meta_frame, new_rows
from metatransfer.errors import DataError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- npz helpers
_REFETCH = "The file is not the official one: fetch it again."


def load_npz(path: Path, keys: tuple[str, ...], optional: tuple[str, ...] = (),
              hint: str = _REFETCH) -> dict[str, np.ndarray]:
    """Load the named arrays of an npz (and those of `optional` it has), with an error naming missing keys.

    Args:
        path: the .npz file.
        keys: arrays that must be present.
        optional: arrays loaded when present.
        hint: what to do, appended to the errors.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; expected {list(keys)}, found {sorted(z.files)}. "
                                f"{hint}")
            return {k: z[k] for k in (*keys, *(k for k in optional if k in z.files))}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read as .npz ({exc}). {hint}") from None


def _labels_1d(path: Path, key: str, labels: np.ndarray, n: int, n_classes: int | None,
               hint: str = "The file is corrupt or not the official one.") -> np.ndarray:
    """Accept labels (n,) or (n, 1); check integer dtype and range [0, n_classes) (None: >= 0; `hint`: what to do)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {key} has shape {labels.shape}: multi-label data is not supported "
                        "(expected (N,) or (N, 1) single labels).")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise DataError(f"{path}: {key} has shape {labels.shape}; expected ({n},) or ({n}, 1) to match the images.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {labels.dtype}; expected integer class labels.")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes)) if n_classes is not None else np.flatnonzero(labels < 0)
    if bad.size:
        show = ", ".join(f"row {i}: {labels[i]}" for i in bad[:10])
        span = f"[0, {n_classes - 1}]" if n_classes is not None else "[0, ...) (labels are class indices)"
        raise DataError(f"{path}: {key}: {bad.size} label(s) out of range {span} ({show}"
                        f"{', ...' if bad.size > 10 else ''}). {hint}")
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
    arrays = load_npz(path, keys)
    names = medmnist_class_names(dataset, n_classes)
    images = {s: _images_nhwc(path, f"{s}_images", arrays[f"{s}_images"]) for s in splits}
    labels = {s: _labels_1d(path, f"{s}_labels", arrays[f"{s}_labels"], images[s].shape[0], n_classes)
              for s in splits}
    return _split_arrays(path, dataset, "medmnist", images, labels, names)


def _split_arrays(path: Path, dataset: str, kind: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                  names: tuple[str, ...]) -> Imported:
    """An Imported from checked (n, H, W, C) uint8 images and int64 labels per official split (origin)."""
    rows = new_rows()
    batches = []
    for s, imgs in images.items():
        n, h, w, c = imgs.shape
        batches.append(ImageBatch(imgs))
        rows["domain"] += [dataset] * n
        rows["class"] += [names[int(y)] for y in labels[s]]
        rows["origin"] += [s] * n
        rows["source_path"] += [f"{path.name}:{s}_images[{i}]" for i in range(n)]
        rows["orig_height"] += [h] * n
        rows["orig_width"] += [w] * n
        rows["orig_channels"] += [c] * n
    return Imported(dataset, kind, batches, meta_frame(rows), names)


def import_npz_file(path: Path, dataset: str, class_names: tuple[str, ...] = (), key: str = "") -> Imported:
    """Read a user's own MedMNIST-format npz (params `prepare.npz_files`; its checksum is checked by prepare).

    Keys: ``train_images``, ``train_labels``, ``test_images``, ``test_labels``
    and, optionally, ``val_images`` with ``val_labels`` (both or neither);
    other keys are ignored. Images (N, H, W) grey or (N, H, W, 1|3) uint8;
    labels (N,) or (N, 1) integers. Classes are named like MedMNIST's:
    ``<dataset>/<class_names[i]>``, or ``<dataset>/NN`` (label zero-padded to
    two digits, more when there are 100 classes or more) without class_names.

    Args:
        path: the .npz file.
        dataset: dataset name (class prefix).
        class_names: names of labels 0, 1, ...; empty: labels 0..max label found.
        key: the params key of the entry (e.g. "prepare.npz_files.blood"), for messages.

    Returns:
        Imported (kind "npz_file") with origin = the file's split; `empty_classes`
        lists named classes with no image.

    Raises:
        DataError: naming the file and the array: not an npz, missing keys, val
            half present, wrong dtype/shape, label count not matching the
            images, non-integer labels, labels outside the class names.
    """
    hint = f"Fix the file (MedMNIST layout, docs/guide.md \"Your own npz file\") and update {key or 'its'}.sha256."
    required = ("train_images", "train_labels", "test_images", "test_labels")
    arrays = load_npz(path, required, optional=("val_images", "val_labels"), hint=hint)
    if ("val_images" in arrays) != ("val_labels" in arrays):
        have, lack = ("val_images", "val_labels") if "val_images" in arrays else ("val_labels", "val_images")
        raise DataError(f"{path}: has {have} but no {lack}; give both or neither (without them, "
                        f"prepare.val_fraction of each class's train images becomes val). {hint}")
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    images = {s: _images_nhwc(path, f"{s}_images", arrays[f"{s}_images"]) for s in splits}
    for s, imgs in images.items():
        if imgs.shape[0] and min(imgs.shape[1:3]) < MIN_IMAGE_SIDE:
            raise DataError(f"{path}: {s}_images are {imgs.shape[1]}x{imgs.shape[2]} pixels; expected sides of at "
                            f"least {MIN_IMAGE_SIDE}. {hint}")
    if images["train"].shape[0] == 0:
        raise DataError(f"{path}: train_images holds no image (shape {images['train'].shape}). {hint}")
    n_known = len(class_names) if class_names else None
    range_hint = (f"Labels index {key or 'the entry'}.class_names ({len(class_names)} names): add the missing "
                  f"names or fix the labels." if class_names else hint)
    labels = {s: _labels_1d(path, f"{s}_labels", arrays[f"{s}_labels"], images[s].shape[0], n_known, range_hint)
              for s in splits}
    if class_names:
        names = tuple(f"{dataset}/{c}" for c in class_names)
    else:
        n_classes = int(max(int(y.max()) for y in labels.values() if y.size)) + 1
        n_images = sum(len(y) for y in labels.values())
        if n_classes > n_images:  # one class name per label up to the largest: ids, not indices, would explode
            raise DataError(f"{path}: labels reach {n_classes - 1} but the file holds {n_images} images; labels "
                            f"must be class indices 0, 1, ...: renumber them or give {key or 'the entry'}.class_names.")
        width = max(2, len(str(n_classes - 1)))
        names = tuple(f"{dataset}/{i:0{width}d}" for i in range(n_classes))
    data = _split_arrays(path, dataset, "npz_file", images, labels, names)
    used = set(data.meta["class"])
    data.empty_classes = [c for c in names if c not in used]
    for c in data.empty_classes:
        log.warning("%s: class %s has no image in %s", dataset, c, path)
    return data


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
    imgs = _images_nhwc(images_path, "arr_0", load_npz(images_path, ("arr_0",))["arr_0"])
    labels = _labels_1d(labels_path, "arr_0", load_npz(labels_path, ("arr_0",))["arr_0"], imgs.shape[0], n_classes)
    n, h, w, c = imgs.shape
    rows = {
        "domain": [dataset] * n,
        "class": [f"{dataset}/{int(y):02d}" for y in labels],
        "origin": [""] * n,
        "source_path": [f"{images_path.name}:arr_0[{i}]" for i in range(n)],
        "orig_height": [h] * n, "orig_width": [w] * n, "orig_channels": [c] * n,
    }
    order = tuple(f"{dataset}/{i:02d}" for i in range(n_classes))
    return Imported(dataset, "kmnist", [ImageBatch(imgs)], meta_frame(rows), order)
