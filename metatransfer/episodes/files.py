"""Fixed episode files: one safetensors file per set and shot count, byte-for-byte deterministic, read back checked.

The four index arrays are the file's tensors (int64); everything else (the
split's fingerprint, how the episodes were drawn) is its metadata, stored as
ONE key holding canonical JSON. safetensors writes its metadata map in hash
order, which differs from process to process; a single key keeps the bytes a
function of the content only. Any safetensors reader opens the file
(`safetensors.numpy.load_file`, `safe_open(...).metadata()`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from metatransfer.data.store import SplitData
from metatransfer.episodes.fixed import FixedEpisodes
from metatransfer.errors import EpisodeError
from metatransfer.io import write_bytes_atomic

# Versions the metadata's schema (the keys of `_meta`), not the container.
FIXED_FORMAT = "metatransfer.fixed_episodes/1"
# The one metadata key of an episode file: canonical JSON of `_meta`.
META_KEY = "metatransfer.fixed_episodes"
_ARRAYS = ("classes", "rotations", "support_idx", "query_idx")
_REQUIRED = {"dataset", "split", "n_way", "k_shot", "n_query", "seed", "rotation_augment", "fingerprint", "n_episodes"}
# The first bytes of the files written before safetensors (a zip of .npy arrays plus meta.json).
_ZIP_MAGIC = b"PK\x03\x04"
_RERUN = "Re-run the `episodes` stage (`dvc repro episodes`)."


def _meta(fe: FixedEpisodes) -> dict[str, object]:
    """The JSON-able metadata of a FixedEpisodes (everything but the arrays).

    The exclusion keys appear only when a class was excluded, so a set without
    exclusions gives the same metadata as before the keys existed.
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


def episode_file_bytes(fe: FixedEpisodes) -> bytes:
    """The bytes of `fe`'s episode file: the same episodes give the same bytes, in any process."""
    arrays = {name: np.ascontiguousarray(getattr(fe, name), dtype="<i8") for name in _ARRAYS}
    meta = json.dumps(_meta(fe), sort_keys=True, separators=(",", ":"))
    return save(arrays, metadata={META_KEY: meta})


def save_fixed_episodes(fe: FixedEpisodes, path: str | os.PathLike[str]) -> Path:
    """Write `fe` to `path` (a `.safetensors` file) deterministically and atomically.

    It is written to a temporary file beside `path` and moved into place
    (`io.write_bytes_atomic`), so a crash never leaves a half-written file.

    Args:
        fe: the episode set.
        path: destination (parent folders are created).

    Returns:
        The path written.
    """
    return write_bytes_atomic(path, episode_file_bytes(fe))


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """The metadata and arrays of an episode file (EpisodeError when it is not one)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == _ZIP_MAGIC:
                raise EpisodeError(
                    f"{path}: an episode file of the old format (a zip of .npy arrays, `<k>shot.npz`); episode "
                    f"files are safetensors now (`<k>shot.safetensors`). {_RERUN}"
                )
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            if not isinstance(meta, dict):
                raise EpisodeError(f"{path}: safetensors file without the {META_KEY!r} metadata object. {_RERUN}")
            missing = sorted(set(_ARRAYS) - set(f.keys()))
            if missing:
                raise EpisodeError(f"{path}: missing array(s) {missing} (found {sorted(f.keys())}). {_RERUN}")
            arrays = {name: f.get_tensor(name) for name in _ARRAYS}
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise EpisodeError(f"{path}: not a readable fixed episode file ({exc}). {_RERUN}") from exc
    return meta, arrays


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
        EpisodeError: missing, unreadable, old-format (.npz) or inconsistent
            file (re-run the `episodes` stage), or a split that does not match.
    """
    path = Path(path)
    if not path.is_file():
        old = path.with_suffix(".npz")
        found = f" (an old-format {old.name} is there: episode files are safetensors now)" if old.is_file() else ""
        raise EpisodeError(f"{path}: no fixed episode file there{found}. {_RERUN}")
    meta, arrays = _read(path)
    if meta.get("format") != FIXED_FORMAT:
        raise EpisodeError(f"{path}: format {meta.get('format')!r}, expected {FIXED_FORMAT!r}. {_RERUN}")
    missing = sorted(_REQUIRED - set(meta))
    if missing:
        raise EpisodeError(f"{path}: metadata without {missing}. {_RERUN}")
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
        if arrays[name].shape != shape or arrays[name].dtype != np.int64:
            raise EpisodeError(
                f"{path}: {name} is {arrays[name].dtype} {arrays[name].shape}, expected int64 {shape}. {_RERUN}"
            )
    if split is not None:
        fe.check_split(split)
    return fe
