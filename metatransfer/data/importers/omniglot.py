"""Omniglot: the npz pair with its character index, and the official zips of PNG drawings."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from metatransfer.data.importers.arrays import load_npz
from metatransfer.data.importers.types import META_COLUMNS, ImageBatch, Imported, QuarantineRow, meta_frame, new_rows
from metatransfer.errors import DataError


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
    rows = new_rows()
    batches = []
    order: list[tuple[int, str]] = []
    for origin, path in (("background", background), ("evaluation", evaluation)):
        arr = load_npz(path, ("images", "labels"))
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
    return Imported(dataset, "omniglot_npz", batches, meta_frame(rows), tuple(nm for _, nm in sorted(order)))


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
    rows = new_rows()
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
                r = group_rows.setdefault(key, new_rows())
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
    return Imported(dataset, "omniglot_zip", batches, meta_frame(rows), tuple(order), quarantine)
