"""Checksums: file digests, a file against its accepted checksums, and a folder against its SHA256SUMS."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from metatransfer.data.sources import Checksum, SourceFile
from metatransfer.errors import ChecksumError, DataError

CHUNK = 1 << 20  # bytes read (and copied) per step


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
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _digests(path: Path, algos: set[str]) -> dict[str, str]:
    hs = {a: hashlib.new(a) for a in algos}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            for h in hs.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hs.items()}


def matching_checksum(path: Path, spec: SourceFile) -> Checksum | None:
    """The first accepted checksum `path` matches, or None.

    Args:
        path: the file to check.
        spec: its source-table entry.

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
        spec: its source-table entry.

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

