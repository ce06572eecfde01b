"""Image-folder trees: the link policy of the listing, the layouts, and the Ravi & Larochelle csv layout.

A user's folder with no class sub-folders (every image at the top, layout "flat") has no labels: its rows
carry the dataset's no-class name (`store.unlabeled_class`) and prepare stores it as an unlabelled target.

Nothing is decoded here: the importers return `ImageFiles` (see decode.py and prepare's chunked decoding).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from metatransfer.data.importers.types import ImageFiles, Imported, QuarantineRow, meta_frame, new_rows
from metatransfer.data.labels import unlabeled_class
from metatransfer.errors import DataError


SPLIT_FOLDER_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                      "test": "test", "testing": "test"}
LAYOUTS = ("auto", "class", "split/class", "domain/class", "flat")
MANIFEST_NAME = "SHA256SUMS"
CSV_SPLITS = ("train", "val", "test")
LOOSE_LISTED = 10  # loose images named in the error of a tree that mixes them with class folders


def _image_suffixes() -> frozenset[str]:
    """File name endings PIL reads as images (".png", ".jpg", ...): what counts as a loose *image*."""
    from PIL import Image

    return frozenset(s.lower() for s in Image.registered_extensions())


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
    """The layout of an image-folder tree: "split/class", "domain/class", "class" or "flat".

    "split/class" when every top-level folder is a split name (train|training,
    val|valid|validation, test|testing, any case); otherwise "flat" when every
    file lies at the top (no class sub-folders: an unlabelled dataset; empty
    sub-folders do not count), "domain/class" when files lie three levels deep,
    else "class".

    Args:
        root: the tree's root folder.

    Returns:
        The layout name.
    """
    tops = [p.name.lower() for p in root.iterdir() if _is_real_dir(p)]
    if tops and all(t in SPLIT_FOLDER_NAMES for t in tops):
        return "split/class"
    depths = {len(p.relative_to(root).parts) for p in list_tree(root)[0] if p.name != MANIFEST_NAME}
    if depths == {1}:
        return "flat"
    return "domain/class" if 3 in depths else "class"


def _refuse_loose_images(root: Path, dataset: str, files: list[Path], layout: str) -> None:
    """Refuse images lying at the top of a tree that has class folders (labelled and unlabelled images mixed).

    Quarantining them would drop images without a word where they are most likely meant to count;
    other loose files (README.txt, .DS_Store) are quarantined as before.

    Raises:
        DataError: naming the folder, the loose images (up to LOOSE_LISTED) and what to do.
    """
    if all(len(p.relative_to(root).parts) == 1 for p in files):
        return  # no image in any class folder: nothing mixed (the missing class folders are named later)
    suffixes = _image_suffixes()
    loose = [p for p in files if len(p.relative_to(root).parts) == 1 and p.suffix.lower() in suffixes]
    if not loose:
        return
    shown = ", ".join(p.name for p in loose[:LOOSE_LISTED]) + (
        f" and {len(loose) - LOOSE_LISTED} more" if len(loose) > LOOSE_LISTED else "")
    raise DataError(
        f"{root}: {len(loose)} image(s) lie at the top of the folder beside its class folders (layout {layout}): "
        f"{shown}. A folder is either labelled (every image in a class folder) or unlabelled (no class folder, "
        f"every image at the top); move these images into their class folders, or move them to a folder of "
        f"their own (an unlabelled dataset: prepare.image_folders entry + finetune.unlabeled.<name>), "
        f"then re-run prepare (prepare.image_folders.{dataset}.path).")


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
        layout: "auto" (see `detect_layout`), "class", "domain/class", "split/class" or "flat"
            (no class sub-folders: every image at the top, unlabelled).
        relative_paths: record ``source_path`` relative to `root` (registered datasets: the
            manifest then does not depend on where the project lies) instead of absolute.
        kind: the Imported kind ("image_folder" for a user's tree, "split_folder" for registered ones).

    Returns:
        Imported with one `ImageFiles` batch; origin "" (class, domain/class, flat) or the split
        ("train"/"val"/"test"); domain = dataset or the domain folder; class = ``<dataset>/<class>``
        (``<dataset>/<domain>/<class>``), or the no-class name ``<dataset>/`` of every row of a
        flat folder (its layout "flat", class_order empty).

    Raises:
        DataError: the folder is missing, mixes layouts, has unknown or clashing split folders,
            holds no image file, or (kind "image_folder") has images at the top beside class folders.
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
    if kind == "image_folder" and layout != "flat":
        _refuse_loose_images(root, dataset, files, layout)
    layout_depth = {"flat": 1, "class": 2}.get(layout, 3)
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
    if layout == "flat":  # no class at all: sub-folders (empty, or refused below) are not classes
        class_dirs = []
    elif layout == "class":
        class_dirs = sorted(p for p in root.iterdir() if _is_real_dir(p))
    else:
        class_dirs = sorted(c for d in root.iterdir() if _is_real_dir(d) for c in d.iterdir() if _is_real_dir(c))

    def class_of(rel_parts: tuple[str, ...]) -> str:
        if layout == "flat":
            return unlabeled_class(dataset)
        if layout == "split/class":
            return f"{dataset}/{rel_parts[1]}"
        return f"{dataset}/{'/'.join(rel_parts[:layout_depth - 1])}"

    quarantine = [QuarantineRow(dataset, p.relative_to(root).as_posix() if relative_paths else str(p), reason)
                  for p, reason in refused]
    rows = new_rows()
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
        flat = bool(files) and all(depth[p] == 1 for p in files)
        hint = "" if not flat or layout == "flat" else (
            " Every file lies at the top: a folder without class sub-folders is read as an unlabelled "
            "dataset with layout auto or flat (docs/guide.md, \"Targets without labels\").")
        raise DataError(f"{root}: no usable image found ({len(quarantine)} file(s) quarantined); expected "
                        f"{'image.*' if layout == 'flat' else layout + '/image.*'} files (layout {layout}).{hint}")
    order = tuple(sorted({class_of(c.relative_to(root).parts + ("x",)) for c in class_dirs}))
    meta = meta_frame(rows)
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
    rows = new_rows()
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
    meta = meta_frame(rows)
    return Imported(dataset, "csv_split", [ImageFiles(tuple(paths))], meta, tuple(sorted(set(meta["class"]))),
                    quarantine, [], "csv")
