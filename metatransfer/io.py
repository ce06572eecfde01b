"""File writes that never leave half a file, and file digests (a leaf module: standard library only).

A reader (DVC, a browser refreshing the report, another stage) sees either the
old file or the new one: the text goes to a temporary file in the same folder,
is flushed to disk, then renamed over the target (`os.replace` is atomic on
one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, mode 0644; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, mode 0644 (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented, key-sorted JSON (floats for numpy scalars) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in `chunk`-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fresh_dirs(*folders: str | Path) -> None:
    """Remove each folder (if present) and create it empty, as DVC removes a stage's
    outputs before running it (used when a stage's outputs are assembled from pieces)."""
    import shutil

    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True)
