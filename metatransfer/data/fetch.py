"""fetch: a dataset's raw files from the mirror folder or the official URL, verified; and locating them.

The mirror is ``data.mirror`` in params.yaml, overridden by the environment
variable ``METATRANSFER_MIRROR``; the source table (sources.py) says where each file
lies in it, its official URL and its accepted checksums.

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
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import BinaryIO

from metatransfer.data.checksums import CHUNK, file_digest, matching_checksum, read_manifest, verify_file, verify_folder
from metatransfer.data.sources import DatasetSource, SourceFile, SourceFolder, get_source
from metatransfer.data.workdirs import swapped_in
from metatransfer.errors import ChecksumError, DataError

log = logging.getLogger(__name__)

MIRROR_ENV = "METATRANSFER_MIRROR"


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
                shutil.copyfileobj(resp, out, CHUNK)
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
        spec: source-table entry of the file.
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
                    shutil.copyfileobj(fh, out, CHUNK)
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




def _tree_files(folder: Path) -> list[str]:
    """Every file under `folder` as a sorted relative posix path (dot-files included)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())



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
        source: a source-table entry with `folder` set.
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
    with swapped_in(dest, uuid.uuid4().hex[:8]) as tmp:
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
    log.info("%s: fetched %d files from %s (%d hard-linked, %d copied)%s", dest, len(files), src, linked,
             len(files) - linked, f", {len(manifest)} verified against {spec.manifest}" if manifest else "")
    return dest


def raw_folder(name: str, raw_dir: Path, verify: bool = True) -> Path:
    """Locate (and verify) the fetched folder of a folder dataset.

    Args:
        name: source name of a folder dataset.
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
        name: source name (see DATASETS, or any MedMNIST 2D name).
        raw_dir: the raw data root (e.g. data/raw).
        mirror: mirror folder; None or "" downloads from the official URLs.

    Returns:
        The paths of the dataset's raw files, in source-table order (for a folder
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
        name: source name.
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
