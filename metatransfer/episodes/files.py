"""Fixed episode files: a zip of .npy arrays plus meta.json, written byte-for-byte deterministically and read
back checked."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from metatransfer.data.store import SplitData
from metatransfer.episodes.fixed import FixedEpisodes
from metatransfer.errors import EpisodeError

FIXED_FORMAT = "metatransfer.fixed_episodes/1"
_ARRAYS = ("classes", "rotations", "support_idx", "query_idx")
# A fixed timestamp and attributes make the zip bytes depend on content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _meta(fe: FixedEpisodes) -> dict[str, object]:
    """The JSON-able metadata of a FixedEpisodes (everything but the arrays).

    The exclusion keys appear only when a class was excluded, so a set without
    exclusions is byte-identical to one written before the keys existed.
    """
    extra: dict[str, object] = {}
    if fe.excluded_classes:
        extra = {"min_images_per_class": int(fe.min_images_per_class),
                 "excluded_classes": {str(k): int(v) for k, v in fe.excluded_classes.items()}}
    return {
        **extra,
        "format": FIXED_FORMAT,
        "dataset": fe.dataset,
        "split": fe.split,
        "n_way": int(fe.n_way),
        "k_shot": int(fe.k_shot),
        "n_query": int(fe.n_query),
        "seed": int(fe.seed),
        "rotation_augment": bool(fe.rotation_augment),
        "fingerprint": fe.fingerprint,
        "n_episodes": len(fe),
    }


def _zip_entry(name: str) -> zipfile.ZipInfo:
    """A ZipInfo with fixed time, system and permissions (byte-identical files)."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # unix, whatever platform writes it
    info.external_attr = 0o644 << 16
    return info


def save_fixed_episodes(fe: FixedEpisodes, path: str | os.PathLike[str]) -> Path:
    """Write `fe` to `path` deterministically and atomically.

    The file is a zip readable by `np.load` (one .npy per array plus
    meta.json), but written with fixed timestamps and attributes, so the same
    episodes always give the same bytes (np.savez stamps the current time).
    It is written to a temporary file beside `path` and moved into place, so
    a crash never leaves a half-written file.

    Args:
        fe: the episode set.
        path: destination (parent folders are created).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_meta(fe), sort_keys=True, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w") as zf:
                zf.writestr(_zip_entry("meta.json"), meta.encode("utf-8"))
                for name in _ARRAYS:
                    buf = io.BytesIO()
                    arr = np.ascontiguousarray(getattr(fe, name), dtype="<i8")
                    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
                    zf.writestr(_zip_entry(f"{name}.npy"), buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_fixed_episodes(
    path: str | os.PathLike[str], split: SplitData | None = None
) -> FixedEpisodes:
    """Read a file written by save_fixed_episodes.

    Args:
        path: the file.
        split: if given, checked against the stored fingerprint now
            (otherwise on first materialise).

    Returns:
        The FixedEpisodes (with `source` set to `path`).

    Raises:
        EpisodeError: missing, unreadable or inconsistent file (re-run the
            `episodes` stage), or a split that does not match.
    """
    path = Path(path)
    rerun = "Re-run the `episodes` stage (e.g. `dvc repro episodes`)."
    if not path.is_file():
        raise EpisodeError(f"{path}: no fixed episode file there. {rerun}")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json").decode("utf-8"))
            arrays = {}
            for name in _ARRAYS:
                with zf.open(f"{name}.npy") as fh:
                    arrays[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise EpisodeError(f"{path}: not a readable fixed episode file ({exc}). {rerun}") from exc
    if meta.get("format") != FIXED_FORMAT:
        raise EpisodeError(
            f"{path}: format {meta.get('format')!r}, expected {FIXED_FORMAT!r}. {rerun}"
        )
    fe = FixedEpisodes(
        dataset=meta["dataset"],
        split=meta["split"],
        n_way=meta["n_way"],
        k_shot=meta["k_shot"],
        n_query=meta["n_query"],
        seed=meta["seed"],
        rotation_augment=meta["rotation_augment"],
        fingerprint=meta["fingerprint"],
        source=str(path),
        min_images_per_class=int(meta.get("min_images_per_class", 0)),
        excluded_classes=dict(meta.get("excluded_classes", {})),
        **arrays,
    )
    e, n = meta["n_episodes"], fe.n_way
    expected = {
        "classes": (e, n),
        "rotations": (e, n),
        "support_idx": (e, n * fe.k_shot),
        "query_idx": (e, n * fe.n_query),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise EpisodeError(
                f"{path}: {name} has shape {arrays[name].shape}, expected {shape}. {rerun}"
            )
    if split is not None:
        fe.check_split(split)
    return fe
