"""Model artifacts without pickle: safetensors weights + JSON config + checksums.

A saved learner is a folder:

    model.safetensors   the state_dict (tensors only: loading runs no code)
    config.json         what `build_algorithm` needs to rebuild the module
    checksums.json      sha256 of the two files above, checked on every load

Folders are written to a temporary sibling and renamed into place, so a crash
never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metatransfer.errors import MetatransferError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"


class ArtifactError(MetatransferError):
    """A model artifact is missing, altered, or not in the safe format."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(state: dict[str, torch.Tensor], config: dict[str, Any], folder: str | Path) -> dict[str, str]:
    """Write weights + config + checksums into `folder` atomically.

    Args:
        state: a state_dict (tensors only).
        config: JSON-serialisable description needed to rebuild the module.
        folder: destination folder (replaced as a whole if it exists).

    Returns:
        The checksums written ({file name: sha256}).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a published model folder should be readable
    try:
        # clone(): safetensors refuses tensors that share storage.
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        sums = {name: sha256_file(tmp / name) for name in (WEIGHTS, CONFIG)}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS, CONFIG, CHECKSUMS):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sums


def load_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights + config after checking both against checksums.json.

    Raises:
        ArtifactError: a file is missing, a checksum differs, or the weights are
            not safetensors (a pickle is refused, never unpickled).
    """
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG, CHECKSUMS):
        if not (folder / name).is_file():
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise ArtifactError(
                f"{folder}: missing {name} (found {present}). A model folder needs "
                f"{WEIGHTS}, {CONFIG} and {CHECKSUMS}; re-run the stage that wrote it."
            )
    sums = json.loads((folder / CHECKSUMS).read_text())
    for name in (WEIGHTS, CONFIG):
        found = sha256_file(folder / name)
        if sums.get(name) != found:
            raise ArtifactError(
                f"{folder / name}: checksum mismatch (expected {sums.get(name)}, found {found}); "
                "the artifact was altered or corrupted. Refusing to load it."
            )
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(
            f"{folder / WEIGHTS}: not a safetensors file ({exc}); refusing to load "
            "(pickled weights are never loaded)."
        ) from None
    return state, json.loads((folder / CONFIG).read_text())


def save_learner(learner: torch.nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Save a MetaLearner (its `config()` + state_dict) to `folder`."""
    config = dict(learner.config())  # type: ignore[operator]
    if extra:
        config["extra"] = extra
    return save_state(learner.state_dict(), config, folder)


def load_learner(folder: str | Path):  # -> MetaLearner (import cycle otherwise)
    """Rebuild a MetaLearner from a folder written by `save_learner`, in eval mode."""
    from metatransfer.algorithms import build_algorithm
    from metatransfer.models import BackboneSpec

    state, config = load_state(folder)
    learner = build_algorithm(
        config["algorithm"],
        BackboneSpec(**config["backbone"]),
        n_way=config["n_way"],
        hparams=config["hparams"],
        num_classes=config.get("num_classes", 0),
    )
    missing, unexpected = learner.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"{folder}: weights do not fit {config['algorithm']!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    learner.eval()
    return learner
