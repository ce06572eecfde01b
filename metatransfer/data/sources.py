"""Dataset registry: official sources, mirror paths and checksums, and `fetch`.

Every raw file the pipeline reads has one entry here: its official URL, its
path inside a local mirror folder (``data.mirror`` in params.yaml, overridden
by the environment variable ``METATRANSFER_MIRROR``) and one or more accepted
checksums. A file is accepted when *any* listed checksum matches; each
checksum carries a provenance note saying where the value comes from.

Checksum decisions (why some files list two values):

======================  ============================================================
file                    accepted checksums
======================  ============================================================
omniglot npz            sha256 of the files at bitsandscraps/omniglot@b0481240 (the
                        repository publishes none; value from the mirror's SHA256SUMS,
                        a pinned commit makes it stable).
character_index.csv     sha256 from the mirror's SHA256SUMS. It is a derived index
                        (npz row -> alphabet/character) with no upstream URL: it
                        can only come from a mirror (fetch says so when downloading).
omniglot official zips  md5 published by torchvision / used across the community.
omniglot small zips     sha256 of the official files (mirror SHA256SUMS).
MedMNIST npz            the official MD5 (medmnist 3.x ``info.py``, Zenodo record
                        10519652) plus, where the shared mirror holds the same file,
                        its sha256. breastmnist: the mirror copy stores labels as
                        ``(N,)`` instead of ``(N, 1)`` (same arrays otherwise), so it
                        has its own sha256, accepted with that provenance note.
KMNIST npz              sha256 of the official files (CODH publishes no checksum;
                        the mirror copies are byte-identical to the official ones).
======================  ============================================================

``fetch`` never leaves a partial file: it writes to a temporary file in the
destination folder, verifies the checksum, and only then renames it into
place (``os.replace``); on any failure the temporary file is removed.

Folder datasets (many files: ``mini_imagenet``, ``brain_tumor_mri``,
``ham10000_mel_nv``) are registered with a `SourceFolder`: their public
provenance (GitHub repository + commit) and the folder under the mirror. They
cannot be downloaded by this project (no single archive URL with a published
checksum exists), so without a mirror ``fetch`` fails saying where to get the
files and where to put them. With a mirror, ``fetch_folder`` hard-links
(``os.link``; a copy when linking is not possible, e.g. across file systems)
every file of ``<mirror>/<folder>`` into a temporary folder beside
``<raw_dir>/<name>``, verifies every file listed in the folder's
``SHA256SUMS`` (a missing file or a wrong hash is a ChecksumError naming the
file, the expected and the found hash), and renames it into place. A user's
own copy (same layout) is used by pointing ``data.mirror`` at a folder that
holds it under the registered folder name; a copy whose ``SHA256SUMS`` or
split csvs differ from the reference ones is accepted (its files are still
verified against its own ``SHA256SUMS``) with a warning. Hard links share
the mirror's bytes: never edit files under ``data/raw`` in place.

==================  ===========================================================
folder dataset      checksums
==================  ===========================================================
mini_imagenet       no official checksum exists: the shared mirror's
                    ``SHA256SUMS`` (sha256 pinned below) is the reference;
                    train/val/test.csv pinned too (the Ravi & Larochelle split
                    as held by the mirror: val classes cut to 100 images).
brain_tumor_mri     ``SHA256SUMS`` of the mirror's subset (sha256 pinned).
ham10000_mel_nv     ``SHA256SUMS`` of the mirror's subset (sha256 pinned).
==================  ===========================================================
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from metatransfer.errors import ChecksumError, DataError

log = logging.getLogger(__name__)

MIRROR_ENV = "METATRANSFER_MIRROR"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Checksum:
    """One accepted checksum of a file.

    Attributes:
        algo: "md5" or "sha256" (any hashlib name).
        value: lowercase hex digest.
        note: where the value comes from (provenance).
    """

    algo: str
    value: str
    note: str = ""


@dataclass(frozen=True)
class SourceFile:
    """One raw file of a dataset.

    Attributes:
        name: file name under ``<raw_dir>/<dataset>/``.
        url: official download URL ("" when there is none: mirror only).
        mirror_path: path relative to the mirror root.
        checksums: accepted checksums; a file matching any one of them is accepted.
    """

    name: str
    url: str
    mirror_path: str
    checksums: tuple[Checksum, ...]


@dataclass(frozen=True)
class SourceFolder:
    """A dataset that is a folder of many files (fetched as a whole).

    Attributes:
        mirror_path: the folder relative to the mirror root.
        origin: public provenance (repository, commit, paths inside it).
        url: where a person gets the files (the repository tree at the commit).
        layout: what the folder must hold (shown in errors).
        manifest: name of the per-file checksum manifest inside the folder.
        reference: (relative path, sha256) of reference files (the manifest
            itself, split csvs): a copy that differs is accepted with a warning.
    """

    mirror_path: str
    origin: str
    url: str
    layout: str
    manifest: str = "SHA256SUMS"
    reference: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: how to get its raw files and which importer reads them.

    Attributes:
        name: registry name (also the raw and prepared folder name).
        kind: importer kind: "omniglot_npz", "omniglot_zip", "medmnist", "kmnist",
            "csv_split" (images/ + train/val/test.csv) or "split_folder"
            (split/class/image folders).
        files: the raw files (empty for folder datasets).
        license: licence of the data.
        n_classes: number of classes for labelled array datasets (0 = from the data).
        folder: set for folder datasets (fetched as a whole, see `fetch_folder`).
        role: "source" or "target" for folder datasets ("" = decided by the kind).
    """

    name: str
    kind: str
    files: tuple[SourceFile, ...]
    license: str
    n_classes: int = 0
    folder: SourceFolder | None = None
    role: str = ""


# --------------------------------------------------------------------------- registry
_BITS = "https://raw.githubusercontent.com/bitsandscraps/omniglot/b0481240b7eb42393285a93ce7d2f266ff10c62b"
_LAKE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
_KMNIST = "http://codh.rois.ac.jp/kmnist/dataset/kmnist"
_MIRROR_NOTE = "sha256 of the file in the shared mirror (SHA256SUMS)"

# MedMNIST 2D, 28x28 files: name -> (official MD5, number of classes, multi-label?).
# MD5s from medmnist 3.x info.py (Zenodo record 10519652); retinamnist and
# breastmnist cross-checked against the mirror's *.INFO.json files.
MEDMNIST_2D: dict[str, tuple[str, int, bool]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", 9, False),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", 14, True),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", 7, False),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", 4, False),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", 2, False),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", 5, False),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", 2, False),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", 8, False),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", 8, False),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", 11, False),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", 11, False),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", 11, False),
}

# Extra accepted checksums for MedMNIST files as held by the shared mirror.
_MEDMNIST_MIRROR_SHA256: dict[str, Checksum] = {
    "retinamnist": Checksum(
        "sha256", "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69",
        "sha256 of the official file (mirror copy is byte-identical)"),
    "breastmnist": Checksum(
        "sha256", "5e68d79723fb3a63a399b0a66b66451799fc2eb3651f469cec0b679cfd743b68",
        "mirror copy with (N,) labels instead of the official (N, 1); same arrays otherwise"),
}


def medmnist_source(name: str) -> DatasetSource:
    """The registry entry of a MedMNIST 2D dataset (28x28 file) by name.

    Args:
        name: lowercase MedMNIST name, e.g. "dermamnist".

    Returns:
        Its DatasetSource (kind "medmnist").

    Raises:
        DataError: the name is not a MedMNIST 2D dataset with a known MD5.
    """
    if name not in MEDMNIST_2D:
        raise DataError(
            f"unknown MedMNIST 2D dataset {name!r}; known: {sorted(MEDMNIST_2D)}. "
            "Add its official MD5 to MEDMNIST_2D in metatransfer/data/sources.py."
        )
    md5, n_classes, _ = MEDMNIST_2D[name]
    sums = [Checksum("md5", md5, "official MD5 (medmnist info.py, Zenodo record 10519652)")]
    if name in _MEDMNIST_MIRROR_SHA256:
        sums.append(_MEDMNIST_MIRROR_SHA256[name])
    f = SourceFile(
        name=f"{name}.npz",
        url=f"https://zenodo.org/records/10519652/files/{name}.npz?download=1",
        mirror_path=f"medmnist/{name}.npz",
        checksums=tuple(sums),
    )
    return DatasetSource(name=name, kind="medmnist", files=(f,), license="CC BY 4.0 (dermamnist: CC BY-NC 4.0)",
                         n_classes=n_classes)


def _sha(value: str, note: str = _MIRROR_NOTE) -> tuple[Checksum, ...]:
    return (Checksum("sha256", value, note),)


DATASETS: dict[str, DatasetSource] = {
    "omniglot": DatasetSource(
        name="omniglot",
        kind="omniglot_npz",
        license="MIT",
        files=(
            SourceFile("images_background.npz", f"{_BITS}/images_background.npz",
                       "omniglot/images_background.npz",
                       _sha("8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199")),
            SourceFile("images_evaluation.npz", f"{_BITS}/images_evaluation.npz",
                       "omniglot/images_evaluation.npz",
                       _sha("0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276")),
            SourceFile("character_index.csv", "", "omniglot/character_index.csv",
                       _sha("a32d00b7d8b49c0b8f1afbf748796f9676a9dd15480dbb1fd30b59a6235d85f4",
                            "derived index with no upstream URL; sha256 from the mirror's SHA256SUMS")),
        ),
    ),
    "omniglot_zip": DatasetSource(
        name="omniglot_zip",
        kind="omniglot_zip",
        license="MIT",
        files=(
            SourceFile("images_background.zip", f"{_LAKE}/images_background.zip",
                       "omniglot/official/images_background.zip",
                       (Checksum("md5", "68d2efa1b9178cc56df9314c21c6e718", "official zip MD5 (as in torchvision)"),)),
            SourceFile("images_evaluation.zip", f"{_LAKE}/images_evaluation.zip",
                       "omniglot/official/images_evaluation.zip",
                       (Checksum("md5", "6b91aef0f799c5bb55b94e3f2daec811", "official zip MD5 (as in torchvision)"),)),
        ),
    ),
    "omniglot_small": DatasetSource(
        name="omniglot_small",
        kind="omniglot_zip",
        license="MIT",
        files=(
            SourceFile("images_background_small1.zip", f"{_LAKE}/images_background_small1.zip",
                       "omniglot/official_small/images_background_small1.zip",
                       _sha("f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
                            "sha256 of the official file (mirror SHA256SUMS)")),
            SourceFile("images_background_small2.zip", f"{_LAKE}/images_background_small2.zip",
                       "omniglot/official_small/images_background_small2.zip",
                       _sha("3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
                            "sha256 of the official file (mirror SHA256SUMS)")),
        ),
    ),
    "retinamnist": medmnist_source("retinamnist"),
    "breastmnist": medmnist_source("breastmnist"),
    "kmnist": DatasetSource(
        name="kmnist",
        kind="kmnist",
        license="CC BY-SA 4.0",
        n_classes=10,
        files=(
            SourceFile("kmnist-test-imgs.npz", f"{_KMNIST}/kmnist-test-imgs.npz", "kmnist/kmnist-test-imgs.npz",
                       _sha("692d824896bec8f3c357ebf7a0fe904ed67ac632ce953d0b58f7fbef7bb27d87",
                            "sha256 of the official file (CODH publishes none; mirror is byte-identical)")),
            SourceFile("kmnist-test-labels.npz", f"{_KMNIST}/kmnist-test-labels.npz", "kmnist/kmnist-test-labels.npz",
                       _sha("660f13a4705431ea2a6391c41ecbe384cd0d932c595a101ec4f3b8989e785046",
                            "sha256 of the official file (CODH publishes none; mirror is byte-identical)")),
        ),
    ),
}


_GH = "https://github.com"
DATASETS["mini_imagenet"] = DatasetSource(
    name="mini_imagenet",
    kind="csv_split",
    role="source",
    license="ImageNet terms of access (non-commercial research and education)",
    files=(),
    folder=SourceFolder(
        mirror_path="mini_imagenet",
        origin=("images: GitHub Deo0330/split_minidataset@557ebcae0db23651f9370f54a5f31b1f0fd4064d "
                "(train/<wnid>/*.jpg, val/<wnid>/*.jpg; mini-ImageNet, Vinyals et al. 2016); class split: "
                "Ravi & Larochelle (2017) train.csv/val.csv/test.csv"),
        url=f"{_GH}/Deo0330/split_minidataset/tree/557ebcae0db23651f9370f54a5f31b1f0fd4064d",
        layout="images/<wnid><8-digit index>.jpg, train.csv, val.csv, test.csv (header filename,label), SHA256SUMS",
        reference=(
            ("SHA256SUMS", "62695bddadddba1002f50cdcdda6c68203475e8637d8c29d62ad6db5b7d30287"),
            ("train.csv", "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f"),
            ("val.csv", "87cfa0034e67f95d29c77685dddf4df18575a95e8daf89928c6f2e49917349a9"),
            ("test.csv", "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa"),
        ),
    ),
)
DATASETS["brain_tumor_mri"] = DatasetSource(
    name="brain_tumor_mri",
    kind="split_folder",
    role="target",
    license="CC BY 4.0 (figshare part, Cheng et al. 2017); Kaggle 'Brain Tumor MRI Dataset' (M. Nickparvar)",
    files=(),
    folder=SourceFolder(
        mirror_path="brain_tumor_mri",
        origin=("GitHub KomalChaudhari8/BRAIN_TUMOR_APP@1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec, "
                "Training/<class>/, Testing/<class>/ (copy of the Kaggle Brain Tumor MRI Dataset; the mirror "
                "holds the first 300/150 files per class after removing exact duplicates)"),
        url=f"{_GH}/KomalChaudhari8/BRAIN_TUMOR_APP/tree/1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec",
        layout="Training/<class>/*.jpg, Testing/<class>/*.jpg, SHA256SUMS",
        reference=(("SHA256SUMS", "68fe684071f03408d4330a9dc67b4169634fd62abcf902b28c32ba8763e41932"),),
    ),
)
DATASETS["ham10000_mel_nv"] = DatasetSource(
    name="ham10000_mel_nv",
    kind="split_folder",
    role="target",
    license="CC BY-NC 4.0 (HAM10000, Tschandl et al. 2018, doi:10.7910/DVN/DBW86T): non-commercial use",
    files=(),
    folder=SourceFolder(
        mirror_path="ham10000_mel_nv",
        origin=("GitHub Criscraft/workshop_ki_hautkrebserkennung@25b3c4a6b36efdc2b1468b78116f1ae2fb9b69b0, "
                "data/{train,test}/{mel,nv}/ (HAM10000 images)"),
        url=f"{_GH}/Criscraft/workshop_ki_hautkrebserkennung/tree/25b3c4a6b36efdc2b1468b78116f1ae2fb9b69b0/data",
        layout="train/{mel,nv}/ISIC_*.jpg, test/{mel,nv}/ISIC_*.jpg, SHA256SUMS",
        reference=(("SHA256SUMS", "7e96c5f1c7739a730140e653f25251d67e85f4368e5c1224bcf07b9c6b13de5f"),),
    ),
)


def get_source(name: str) -> DatasetSource:
    """Look a dataset up in the registry (any MedMNIST 2D name also works).

    Args:
        name: registry name.

    Returns:
        The DatasetSource.

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    if name in DATASETS:
        return DATASETS[name]
    if name in MEDMNIST_2D:
        return medmnist_source(name)
    raise DataError(
        f"unknown dataset {name!r}; registered: {sorted(DATASETS)} and MedMNIST 2D: {sorted(MEDMNIST_2D)}. "
        "Fix fetch.datasets in params.yaml."
    )


# --------------------------------------------------------------------------- checksums
def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a file, read in chunks.

    Args:
        path: the file.
        algo: hashlib algorithm name ("md5", "sha256").

    Returns:
        Lowercase hex digest.
    """
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _digests(path: Path, algos: set[str]) -> dict[str, str]:
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def matching_checksum(path: Path, spec: SourceFile) -> Checksum | None:
    """The first accepted checksum `path` matches, or None.

    Args:
        path: the file to check.
        spec: its registry entry.

    Returns:
        The matching Checksum, or None when none matches.
    """
    found = _digests(path, {c.algo for c in spec.checksums})
    for c in spec.checksums:
        if found[c.algo] == c.value.lower():
            return c
    return None


def verify_file(path: Path, spec: SourceFile) -> Checksum:
    """Check a file against its accepted checksums.

    Args:
        path: the file.
        spec: its registry entry.

    Returns:
        The matching Checksum (its note says which provenance matched).

    Raises:
        ChecksumError: no checksum matches; the message names the file, every
            expected value and the value found.
    """
    found = _digests(path, {c.algo for c in spec.checksums})
    for c in spec.checksums:
        if found[c.algo] == c.value.lower():
            return c
    expected = "; ".join(f"{c.algo} {c.value} ({c.note})" for c in spec.checksums)
    got = ", ".join(f"{a} {v}" for a, v in sorted(found.items()))
    raise ChecksumError(
        f"{path}: checksum mismatch for {spec.name}: expected one of [{expected}], found {got}. "
        "The file is corrupt or not the official one: delete it and fetch again, or fix the mirror copy."
    )


# --------------------------------------------------------------------------- fetch
def resolve_mirror(param: str, base_dir: Path | None = None) -> Path | None:
    """Resolve the mirror folder: env METATRANSFER_MIRROR (when set) overrides `param`.

    Args:
        param: ``data.mirror`` from params.yaml ("" = download from official URLs).
        base_dir: folder relative paths are resolved against (default: cwd).

    Returns:
        The absolute mirror folder, or None to download.
    """
    value = os.environ.get(MIRROR_ENV, param)
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    return p.resolve()


def _download(url: str, out: BinaryIO, attempts: int = 3, timeout: float = 60.0) -> None:
    """Stream `url` into `out`, retrying on I/O errors (the only retried step)."""
    for attempt in range(1, attempts + 1):
        try:
            out.seek(0)
            out.truncate()
            req = urllib.request.Request(url, headers={"User-Agent": "metatransfer"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (official https/http URLs)
                shutil.copyfileobj(resp, out, _CHUNK)
            return
        except OSError as exc:  # URLError is an OSError
            if attempt == attempts:
                raise DataError(
                    f"{url}: download failed after {attempts} attempts ({exc}). "
                    "Check the network, or set data.mirror / METATRANSFER_MIRROR to a folder with the files."
                ) from None
            log.warning("download of %s failed (%s); retry %d/%d", url, exc, attempt, attempts - 1)
            time.sleep(2.0 * attempt)


def fetch_file(spec: SourceFile, dest: Path, mirror: Path | None) -> Path:
    """Copy (mirror) or download (URL) one file to `dest`, verified and atomically.

    Args:
        spec: registry entry of the file.
        dest: final path.
        mirror: mirror folder, or None to download.

    Returns:
        `dest`.

    Raises:
        DataError: the mirror lacks the file, or it has no official URL and no mirror.
        ChecksumError: the copied/downloaded bytes do not match; nothing is left at `dest`.
    """
    if dest.is_file():
        if matching_checksum(dest, spec) is not None:
            log.info("%s: present with a valid checksum, skipped", dest)
            return dest
        log.warning("%s: present but its checksum does not match; fetching it again", dest)
    if mirror is not None:
        src = mirror / spec.mirror_path
        if not src.is_file():
            raise DataError(
                f"{src}: not found in the mirror (looked for {spec.mirror_path!r} under {mirror}). "
                f"Put the official file there ({spec.url or 'no public URL: copy it from a mirror that has it'}), "
                f"point data.mirror / {MIRROR_ENV} at a folder that has it, or set the mirror to '' to download."
            )
    elif not spec.url:
        raise DataError(
            f"{spec.name}: has no public download URL (it is a derived file); set data.mirror or "
            f"{MIRROR_ENV} to a folder holding {spec.mirror_path!r}."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if mirror is not None:
                with open(mirror / spec.mirror_path, "rb") as fh:
                    shutil.copyfileobj(fh, out, _CHUNK)
            else:
                log.info("downloading %s", spec.url)
                _download(spec.url, out)
        try:
            used = verify_file(tmp, spec)
        except ChecksumError as exc:
            origin = mirror / spec.mirror_path if mirror is not None else spec.url
            raise ChecksumError(str(exc).replace(str(tmp), f"{dest} (from {origin})", 1)) from None
        os.replace(tmp, dest)
        log.info("%s: fetched, %s ok (%s)", dest, used.algo, used.note)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------- folder datasets
def read_manifest(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` manifest (``<hex>  <relative path>`` per line).

    Args:
        path: the SHA256SUMS file.

    Returns:
        {relative posix path: lowercase sha256}, in file order.

    Raises:
        DataError: a line that is not ``<64 hex> <path>``, or a path listed twice (names the line).
    """
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            digest, _, rel = line.partition(" ")
            rel = rel.lstrip(" ").removeprefix("*")
            if len(digest) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digest) or not rel:
                raise DataError(f"{path}: line {no}: expected '<64 hex sha256>  <relative path>', found {line[:120]!r}. "
                                "Regenerate it with `sha256sum` (run inside the folder).")
            rel = rel.removeprefix("./")
            if rel in out:
                raise DataError(f"{path}: line {no}: {rel!r} is listed twice; remove one line.")
            out[rel] = digest.lower()
    return out


def _tree_files(folder: Path) -> list[str]:
    """Every file under `folder` as a sorted relative posix path (dot-files included)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def verify_folder(folder: Path, manifest: dict[str, str], origin: Path | None = None, workers: int = 4) -> int:
    """Check every file listed in a manifest against its sha256.

    Args:
        folder: the folder the manifest's paths are relative to.
        manifest: {relative path: sha256} (see `read_manifest`).
        origin: where the files came from (named in the error), if not `folder`.
        workers: hashing threads (hashlib releases the GIL on large reads).

    Returns:
        The number of files verified.

    Raises:
        ChecksumError: a listed file is missing or its sha256 differs; the message
            names each file (up to 20), the expected and the found hash, and what to do.
    """
    rels = list(manifest)

    def one(rel: str) -> str | None:
        p = folder / rel
        return file_digest(p, "sha256") if p.is_file() else None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(one, rels, chunksize=256))
    bad = [(rel, manifest[rel], got) for rel, got in zip(rels, found) if got != manifest[rel]]
    if bad:
        src = origin or folder
        lines = [f"  {src / rel}: expected sha256 {exp}, found {got or 'no such file'}" for rel, exp, got in bad[:20]]
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ChecksumError(
            f"{src}: {len(bad)} of {len(rels)} file(s) listed in SHA256SUMS are missing or do not match:\n"
            + "\n".join(lines) + more
            + "\nThe copy is incomplete or corrupt: restore those files from the public source, or, if you changed "
              "the folder on purpose, regenerate SHA256SUMS inside it (`sha256sum $(find . -type f ! -name SHA256SUMS) "
              "> SHA256SUMS`). Nothing was written to the raw folder."
        )
    return len(rels)


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link `src` to `dst` when possible (same file system), else copy; True when linked."""
    try:
        os.link(src, dst)
        return True
    except OSError:  # other file system, no permission (protected_hardlinks), no link support
        shutil.copyfile(src, dst)
        return False


def _check_reference(name: str, folder: Path, spec: SourceFolder) -> list[str]:
    """Reference files (manifest, split csvs) that differ from the registered reference copy."""
    differ = []
    for rel, sha in spec.reference:
        p = folder / rel
        if p.is_file() and file_digest(p, "sha256") != sha:
            differ.append(rel)
    if differ:
        log.warning("%s: %s differ(s) from the reference copy (%s); using this copy as given (its files are "
                    "verified against its own %s)", name, ", ".join(differ), spec.origin, spec.manifest)
    return differ


def _folder_is_current(dest: Path, src: Path, spec: SourceFolder) -> bool:
    """True when `dest` already holds exactly `src`'s files, verified."""
    if not dest.is_dir() or _tree_files(dest) != _tree_files(src):
        return False
    man_src, man_dest = src / spec.manifest, dest / spec.manifest
    if man_src.is_file():
        if file_digest(man_src, "sha256") != file_digest(man_dest, "sha256"):
            return False
        manifest = read_manifest(man_dest)
        try:
            verify_folder(dest, manifest)
        except ChecksumError:
            return False
        unlisted = [r for r in _tree_files(src) if r not in manifest]
    else:
        unlisted = _tree_files(src)
    return all(file_digest(src / r, "sha256") == file_digest(dest / r, "sha256") for r in unlisted)


def fetch_folder(source: DatasetSource, dest: Path, mirror: Path | None) -> Path:
    """Link/copy a folder dataset from the mirror into `dest`, verified, atomically.

    Every file of ``<mirror>/<folder.mirror_path>`` is hard-linked (or copied
    when linking fails) into a temporary folder beside `dest`; every file the
    folder's SHA256SUMS lists is verified; only then is the temporary folder
    renamed to `dest` (an older `dest` is replaced). On any error the
    temporary folder is removed and `dest` is left as it was.

    Args:
        source: a registry entry with `folder` set.
        dest: the final folder (``<raw_dir>/<name>``).
        mirror: the mirror root, or None (then this is an error: folder datasets are not downloadable here).

    Returns:
        `dest`.

    Raises:
        DataError: no mirror, or the mirror lacks the folder (says where to get it and where to put it).
        ChecksumError: a listed file is missing or does not match.
    """
    spec = source.folder
    assert spec is not None, f"{source.name} is not a folder dataset"
    where_to_get = (f"Get it from {spec.url} ({spec.origin}); it must hold {spec.layout}.")
    if mirror is None:
        raise DataError(
            f"{source.name}: a folder dataset that this project cannot download (no single archive with a published "
            f"checksum). {where_to_get} Put the folder at <mirror>/{spec.mirror_path}/ and set data.mirror in "
            f"params.yaml (or {MIRROR_ENV}) to <mirror>."
        )
    src = mirror / spec.mirror_path
    if not src.is_dir():
        raise DataError(
            f"{src}: folder not found in the mirror (looked for {spec.mirror_path!r} under {mirror}). {where_to_get} "
            f"Put it at {src}/, or point data.mirror / {MIRROR_ENV} at a folder that has {spec.mirror_path}/."
        )
    manifest_path = src / spec.manifest
    manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is None:
        log.warning("%s: no %s in %s: files are copied without verification; add one (`sha256sum`) to "
                    "have them checked", source.name, spec.manifest, src)
    elif _folder_is_current(dest, src, spec):
        log.info("%s: present and verified (%d files), skipped", dest, len(manifest))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    old = dest.parent / f".{dest.name}.old-{tag}"
    try:
        tmp.mkdir()
        files = _tree_files(src)
        linked = 0
        made: set[Path] = {tmp}
        for rel in files:
            target = tmp / rel
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            linked += _link_or_copy(src / rel, target)
        if manifest is not None:
            verify_folder(tmp, manifest, origin=src)
            unlisted = [r for r in files if r not in manifest and r != spec.manifest]
            if unlisted:
                log.info("%s: %d file(s) not listed in %s (copied unverified): %s", source.name, len(unlisted),
                         spec.manifest, ", ".join(unlisted[:5]) + (", ..." if len(unlisted) > 5 else ""))
        _check_reference(source.name, tmp, spec)
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    log.info("%s: fetched %d files from %s (%d hard-linked, %d copied)%s", dest, len(files), src, linked,
             len(files) - linked, f", {len(manifest)} verified against {spec.manifest}" if manifest else "")
    return dest


def raw_folder(name: str, raw_dir: Path, verify: bool = True) -> Path:
    """Locate (and verify) the fetched folder of a folder dataset.

    Args:
        name: registry name of a folder dataset.
        raw_dir: the raw data root.
        verify: check every file listed in the folder's SHA256SUMS.

    Returns:
        ``raw_dir/<name>``.

    Raises:
        DataError: the folder is missing (run fetch first).
        ChecksumError: a listed file is missing or altered.
    """
    src = get_source(name)
    spec = src.folder
    if spec is None:
        raise DataError(f"{name}: not a folder dataset (kind {src.kind}); use raw_files.")
    folder = Path(raw_dir) / name
    if not folder.is_dir():
        raise DataError(f"{folder}: raw folder missing for dataset {name!r}; run the fetch stage first "
                        "(python -m metatransfer.stages.fetch).")
    if verify and (folder / spec.manifest).is_file():
        verify_folder(folder, read_manifest(folder / spec.manifest))
    return folder


def fetch(name: str, raw_dir: Path, mirror: str | Path | None) -> list[Path]:
    """Fetch every raw file of a registered dataset into ``raw_dir/<name>/``.

    Files already present with a valid checksum are skipped. Callers resolve
    the mirror with `resolve_mirror` (environment override) first.

    Args:
        name: registry name (see DATASETS, or any MedMNIST 2D name).
        raw_dir: the raw data root (e.g. data/raw).
        mirror: mirror folder; None or "" downloads from the official URLs.

    Returns:
        The paths of the dataset's raw files, in registry order (for a folder
        dataset: the one folder ``raw_dir/<name>``).

    Raises:
        DataError: unknown dataset or missing mirror file.
        ChecksumError: a file does not match its checksum.
    """
    src = get_source(name)
    mirror_path = Path(mirror) if mirror else None
    out_dir = Path(raw_dir) / name
    if src.folder is not None:
        return [fetch_folder(src, out_dir, mirror_path)]
    return [fetch_file(f, out_dir / f.name, mirror_path) for f in src.files]


def raw_files(name: str, raw_dir: Path, verify: bool = True) -> dict[str, Path]:
    """Locate (and verify) the fetched raw files of a dataset.

    Args:
        name: registry name.
        raw_dir: the raw data root.
        verify: check each file's checksum.

    Returns:
        Mapping file name -> path.

    Raises:
        DataError: a file is missing (run the fetch stage first).
        ChecksumError: a file does not match its checksum.
    """
    src = get_source(name)
    if src.folder is not None:  # folder dataset: the folder itself, every listed file verified
        return {name: raw_folder(name, raw_dir, verify)}
    out: dict[str, Path] = {}
    for f in src.files:
        p = Path(raw_dir) / name / f.name
        if not p.is_file():
            raise DataError(f"{p}: raw file missing for dataset {name!r}; run the fetch stage first "
                            "(python -m metatransfer.stages.fetch).")
        if verify:
            verify_file(p, f)
        out[f.name] = p
    return out
