"""Real slices of the folder datasets, laid out as a mirror, for fast tests.

`make_slice_mirror(dest, mirror)` builds ``dest/`` as a small mirror holding
real files of ``mini_imagenet`` (a few classes per csv split, with its csvs
and the matching ``SHA256SUMS`` lines), ``brain_tumor_mri`` (a few classes x
a few Training/Testing files, greyscale ones included) and
``ham10000_mel_nv`` (a few files per split and class, plus the dataset's real
exact-duplicate pair). The other mirror folders (omniglot, medmnist, kmnist)
are symlinked, so ``dest`` works as ``data.mirror`` / METATRANSFER_MIRROR for
the whole pipeline. Files are hard-linked when possible (no bytes copied).

Example::

    from tests.slices import make_slice_mirror
    slim = make_slice_mirror(tmp_path / "mirror", mirror, mini_classes=5, mini_per_class=12)
    fetch("mini_imagenet", tmp_path / "raw", slim)
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from PIL import Image

HAM_DUPLICATE_PAIR = ("test/nv/ISIC_0024366.jpg", "test/nv/ISIC_0029861.jpg")  # same bytes, two ids
MIRROR_EXTRAS = ("omniglot", "medmnist", "kmnist")


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _sums(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, _, rel = line.partition("  ")
        out[rel] = digest
    return out


def _write_sums(folder: Path, sums: dict[str, str], rels: list[str]) -> None:
    (folder / "SHA256SUMS").write_text("".join(f"{sums[r]}  {r}\n" for r in sorted(rels)))


def slice_mini_imagenet(dest: Path, mirror: Path, n_classes: int = 5, per_class: int = 12) -> dict[str, list[str]]:
    """Copy the first `n_classes` classes x `per_class` images of each csv split (train/val/test).

    Returns:
        {split: [wnid, ...]} of the classes taken.
    """
    src, out = mirror / "mini_imagenet", dest / "mini_imagenet"
    sums = _sums(src)
    rels: list[str] = []
    taken: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        with open(src / f"{split}.csv", newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        per: dict[str, list[str]] = {}
        for fname, label in rows:
            if label not in per and len(per) == n_classes:
                continue
            if len(per.setdefault(label, [])) < per_class:
                per[label].append(fname)
        taken[split] = list(per)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["filename", "label"])
            for label, files in per.items():
                for f in files:
                    w.writerow([f, label])
                    _place(src / "images" / f, out / "images" / f)
                    rels.append(f"images/{f}")
    _write_sums(out, sums, rels)
    return taken


def _split_folder_slice(src: Path, out: Path, picks: list[str]) -> None:
    sums = _sums(src)
    for rel in picks:
        _place(src / rel, out / rel)
    _write_sums(out, sums, picks)


def slice_brain_tumor_mri(dest: Path, mirror: Path, classes: tuple[str, ...] = ("glioma", "meningioma", "notumor"),
                          n_train: int = 6, n_test: int = 3) -> dict[str, str]:
    """The first files per class of Training/ and Testing/, swapping in greyscale files where they exist.

    Returns:
        {relative path: PIL mode} of the files taken.
    """
    src = mirror / "brain_tumor_mri"
    modes: dict[str, str] = {}
    for split, n in (("Training", n_train), ("Testing", n_test)):
        for cls in classes:
            files = sorted((src / split / cls).iterdir())
            grey = []
            for f in files[:80]:
                with Image.open(f) as im:
                    if im.mode == "L":
                        grey.append(f)
                if len(grey) >= max(1, n // 3):
                    break
            pick = grey + [f for f in files if f not in grey][: n - len(grey)]
            for f in sorted(pick):
                with Image.open(f) as im:
                    modes[f.relative_to(src).as_posix()] = im.mode
    _split_folder_slice(src, dest / "brain_tumor_mri", sorted(modes))
    return modes


def slice_ham10000(dest: Path, mirror: Path, n_per: int = 4, duplicate_pair: bool = True) -> list[str]:
    """The first `n_per` files of each split x class, plus the real exact-duplicate pair (test/nv).

    Returns:
        The relative paths taken.
    """
    src = mirror / "ham10000_mel_nv"
    picks: set[str] = set()
    for split in ("train", "test"):
        for cls in ("mel", "nv"):
            picks |= {f.relative_to(src).as_posix() for f in sorted((src / split / cls).iterdir())[:n_per]}
    if duplicate_pair:
        picks |= set(HAM_DUPLICATE_PAIR)
    _split_folder_slice(src, dest / "ham10000_mel_nv", sorted(picks))
    return sorted(picks)


def make_slice_mirror(dest: Path, mirror: Path, mini_classes: int = 5, mini_per_class: int = 12,
                      brain_classes: tuple[str, ...] = ("glioma", "meningioma", "notumor"), brain_train: int = 6,
                      brain_test: int = 3, ham_per: int = 4, extras: tuple[str, ...] = MIRROR_EXTRAS) -> Path:
    """Build a small mirror of real files at `dest` (see the module docstring).

    Args:
        dest: the new mirror folder (created).
        mirror: the full mirror (tests' `mirror` fixture).
        mini_classes: mini-ImageNet classes per csv split (train/val/test each).
        mini_per_class: images per mini-ImageNet class.
        brain_classes: brain_tumor_mri classes taken.
        brain_train: Training/ files per class (about a third greyscale).
        brain_test: Testing/ files per class.
        ham_per: ham10000 files per split x class (the duplicate pair comes on top).
        extras: other mirror folders symlinked as they are.

    Returns:
        `dest`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    slice_mini_imagenet(dest, mirror, mini_classes, mini_per_class)
    slice_brain_tumor_mri(dest, mirror, brain_classes, brain_train, brain_test)
    slice_ham10000(dest, mirror, ham_per)
    for name in extras:
        if (mirror / name).exists() and not (dest / name).exists():
            (dest / name).symlink_to((mirror / name).resolve(), target_is_directory=True)
    return dest
