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
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import urllib.request
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
class DatasetSource:
    """A registered dataset: how to get its raw files and which importer reads them.

    Attributes:
        name: registry name (also the raw and prepared folder name).
        kind: importer kind: "omniglot_npz", "omniglot_zip", "medmnist" or "kmnist".
        files: the raw files.
        license: licence of the data.
        n_classes: number of classes for labelled array datasets (0 = from the data).
    """

    name: str
    kind: str
    files: tuple[SourceFile, ...]
    license: str
    n_classes: int = 0


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


def fetch(name: str, raw_dir: Path, mirror: str | Path | None) -> list[Path]:
    """Fetch every raw file of a registered dataset into ``raw_dir/<name>/``.

    Files already present with a valid checksum are skipped. Callers resolve
    the mirror with `resolve_mirror` (environment override) first.

    Args:
        name: registry name (see DATASETS, or any MedMNIST 2D name).
        raw_dir: the raw data root (e.g. data/raw).
        mirror: mirror folder; None or "" downloads from the official URLs.

    Returns:
        The paths of the dataset's raw files, in registry order.

    Raises:
        DataError: unknown dataset or missing mirror file.
        ChecksumError: a file does not match its checksum.
    """
    src = get_source(name)
    mirror_path = Path(mirror) if mirror else None
    out_dir = Path(raw_dir) / name
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
