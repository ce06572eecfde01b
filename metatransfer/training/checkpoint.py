"""Crash-safe training checkpoints: kill the process at any moment, re-run, resume.

A checkpoint is a folder `<dir>/step-<step>/` in the safe artifact format of
`metatransfer.artifacts` (no pickle anywhere):

    model.safetensors   every tensor and NumPy array of the training state
                        (weights, optimizer moments, best-validation weights,
                        RNG states of torch and NumPy), named by its place in
                        the state tree; safetensors records dtype and shape
    config.json         the tree itself as JSON: step, counters, curves,
                        Python's RNG state, optimizer hyper-parameters; a
                        tensor, array or tuple is a small tagged object there
    checksums.json      sha256 of both, verified before anything is read

Nothing is ever unpickled: both files are data formats, so an altered
checkpoint can fail to load but cannot run code. A checkpoint of an older
format (FORMAT) is discarded with a warning and training starts from step 0;
it is never decoded with rules it was not written with.

Writing is atomic: the files go into a hidden temporary folder, are fsynced,
and the folder is renamed into place, so a SIGKILL (or power loss) leaves
either the new checkpoint complete or only a `.tmp-*` leftover that the next
load deletes; older checkpoints are removed only after the new one is in place.

A checkpoint remembers a *fingerprint* of the settings that produced it
(params, data, algorithm); a checkpoint with another fingerprint belongs to a
different run and is discarded rather than resumed.

Resuming restores every source of randomness (Python `random`, NumPy's global
state, torch's global generator, and the episode sampler), so that on CPU a
killed-and-resumed run ends with bit-identical weights.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from metatransfer.artifacts import CHECKSUMS, CONFIG, WEIGHTS, ArtifactError, fsync_path, load_state, sha256_file
from metatransfer.episodes import Episode
from metatransfer.errors import is_disk_full

log = logging.getLogger(__name__)

# 2: NumPy arrays are safetensors tensors of their own dtype (1 stored their raw bytes as uint8).
FORMAT = 2
STEP_PREFIX = "step-"


class CheckpointError(ArtifactError):
    """A checkpoint folder exists but cannot be trusted (altered, not the safe format)."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often a training loop checkpoints.

    Attributes:
        folder: the run's checkpoint folder (one per algorithm / model).
        every: checkpoint every `every` completed steps (0: only at the end).
        fingerprint: identity of the settings; a checkpoint with another one is discarded.
        keep: how many most recent checkpoints to keep (>= 1).
    """

    folder: Path
    every: int
    fingerprint: str
    keep: int = 2


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the step it was taken after and the decoded state tree."""

    step: int
    state: dict[str, Any]
    path: Path


# --------------------------------------------------------------------------- encoding
def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able form of `value`; tensors and arrays move into `tensors` under `path`."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if path in tensors:
            # "a.b" as one key and as two nested keys name the same tensor: refuse rather than overwrite.
            raise TypeError(f"checkpoint state at {path!r}: two tensors of the state have this name")
        if isinstance(value, torch.Tensor):
            # clone(): safetensors refuses tensors that share storage (state_dict views).
            tensors[path] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        try:  # uint32 (MT19937's key) and the other numeric dtypes map to torch's; safetensors keeps them
            # copy(order="C"), not ascontiguousarray: that turns a 0-d array into a 1-d one.
            tensors[path] = torch.from_numpy(value.copy(order="C"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint state at {path!r}: cannot store a {value.dtype} array ({exc})") from None
        return {"__ndarray__": path}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            # Integer keys (optimizer state) would come back as strings: say so loudly.
            raise TypeError(f"checkpoint state at {path!r}: dict keys must be strings, found {list(value)[:5]}")
        if any(k.startswith("__") and k.endswith("__") for k in value):
            raise TypeError(f"checkpoint state at {path!r}: keys like '__x__' are reserved")
        return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state at {path!r}: cannot store {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def fingerprint(data: Any) -> str:
    """SHA-256 of the canonical JSON of `data` (settings that must match to resume)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict's names, dtypes, shapes and bytes (e.g. a learner in a fingerprint)."""
    h = hashlib.sha256()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def code_digest(paths: tuple[str, ...]) -> str:
    """SHA-256 over the Python sources at `paths` (files or folders, relative to the package).

    Part of a checkpoint's fingerprint: after a code change the old state is not resumed.
    """
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in paths:
        target = package / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- state helpers
def rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch (CPU)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by `rng_state` (after `_decode`)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer's state_dict with string keys (per-parameter state keyed by index)."""
    sd = optimizer.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state captured by `optimizer_state` into a freshly built optimizer of the same kind."""
    fresh = optimizer.state_dict()
    groups = []
    for saved, current in zip(state["param_groups"], fresh["param_groups"]):
        group = dict(current)
        for key, value in saved.items():
            # JSON turns tuples (Adam's betas) into lists; keep the type the optimizer built.
            group[key] = tuple(value) if isinstance(current.get(key), tuple) else value
        groups.append(group)
    optimizer.load_state_dict({"state": {int(k): v for k, v in state["state"].items()}, "param_groups": groups})


class ResumableSampler:
    """Wraps an episode source so its position can be saved and restored.

    The position is restored exactly: by the source's own `state()`/`set_state()`
    when it offers them (O(1)), else by replaying the recorded number of draws
    on a freshly seeded source (every sampler here is a deterministic function
    of its seed; replay costs ~0.3 ms per Omniglot episode).

    Args:
        sample: returns one episode per call.
        get_state: optional, returns the source's RNG state (tensors/arrays allowed).
        set_state: optional, restores it.
    """

    def __init__(
        self,
        sample: Callable[[], Episode],
        get_state: Callable[[], Any] | None = None,
        set_state: Callable[[Any], None] | None = None,
    ) -> None:
        self._sample = sample
        self._get_state = get_state
        self._set_state = set_state
        self.draws = 0

    def __call__(self) -> Episode:
        """Draw the next episode."""
        self.draws += 1
        return self._sample()

    def state(self) -> dict[str, Any]:
        """The position: number of draws, plus the source's own state when it has one."""
        inner = self._get_state() if self._get_state is not None else None
        return {"draws": self.draws, "inner": inner}

    def restore(self, state: dict[str, Any]) -> None:
        """Move a freshly built source to `state` (see the class doc)."""
        if state.get("inner") is not None and self._set_state is not None:
            self._set_state(state["inner"])
        else:
            if self.draws:
                raise ValueError("replaying draws needs a freshly built sampler (it has drawn already)")
            for _ in range(int(state["draws"])):
                self._sample()
        self.draws = int(state["draws"])


# --------------------------------------------------------------------------- files
def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(STEP_PREFIX):])
    except ValueError:
        return -1


def checkpoint_dirs(folder: str | Path) -> list[Path]:
    """The complete checkpoint folders in `folder`, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and _step_of(p) >= 0]
    return sorted(found, key=_step_of, reverse=True)


def _discard(path: Path) -> None:
    """Remove a folder so that no half-deleted checkpoint is ever visible (rename first)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(folder: Path) -> None:
    """Delete temporary and trash folders a killed process left behind."""
    for p in folder.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(config: CheckpointConfig, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as the checkpoint of `step` atomically and prune old ones.

    Args:
        config: folder, fingerprint, how many to keep.
        step: completed steps (names the folder).
        state: a tree of dicts (string keys), lists, tuples, JSON scalars,
            torch tensors and numpy arrays.

    Returns:
        The checkpoint folder.
    """
    folder = Path(config.folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "step": int(step), "fingerprint": config.fingerprint, "state": _encode(state, tensors, "")}
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{STEP_PREFIX}{step}-", dir=folder))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(doc, sort_keys=True))
        sums = {name: sha256_file(tmp / name) for name in (WEIGHTS, CONFIG)}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, sort_keys=True))
        for name in (WEIGHTS, CONFIG, CHECKSUMS):
            fsync_path(tmp / name)
        final = folder / f"{STEP_PREFIX}{step:09d}"
        if final.exists():  # the end-of-run checkpoint can share a step with a periodic one
            _discard(final)
        os.replace(tmp, final)
        fsync_path(folder)
    except Exception as exc:
        if is_disk_full(exc):
            # safetensors and write() do not say which file: name the checkpoint folder.
            raise OSError(errno.ENOSPC, "No space left on device", str(folder)) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no partial folder behind
    for old in checkpoint_dirs(folder)[max(1, config.keep):]:
        _discard(old)
    return final


def load_latest(config: CheckpointConfig) -> Checkpoint | None:
    """The newest checkpoint in `config.folder` written with `config.fingerprint`.

    Leftovers of a killed write are deleted. Checkpoints written with other
    settings (another fingerprint) or in another format (an older version of
    this module) are deleted with a warning and None is returned: the run
    starts over rather than mixing two configurations or misreading a state.

    Returns:
        The checkpoint, or None when there is none to resume from.

    Raises:
        CheckpointError: a checkpoint fails its checksums or is not safetensors
            (refused, never unpickled); the message says how to start over.
    """
    folder = Path(config.folder)
    if not folder.is_dir():
        return None
    _clean_leftovers(folder)
    dirs = checkpoint_dirs(folder)
    if not dirs:
        return None
    newest = dirs[0]
    try:
        tensors, doc = load_state(newest)
    except ArtifactError as exc:
        raise CheckpointError(
            f"{newest}: refusing to resume from this checkpoint: {exc} Delete {folder} to start "
            "this training run from scratch."
        ) from None
    # Checked before decoding: the state of another format is never read with these rules.
    if doc.get("format") != FORMAT:
        stale = f"format {doc.get('format')} (this version reads format {FORMAT})"
    elif doc.get("fingerprint") != config.fingerprint:
        stale = (f"other settings or data (fingerprint {str(doc.get('fingerprint'))[:12]}, "
                 f"now {config.fingerprint[:12]})")
    else:
        return Checkpoint(step=int(doc["step"]), state=_decode(doc["state"], tensors), path=newest)
    log.warning("%s: checkpoint written with %s; discarding it and starting from step 0", newest, stale)
    clear_checkpoints(folder)
    return None


def clear_checkpoints(folder: str | Path) -> None:
    """Delete a checkpoint folder (after the run it belongs to has finished)."""
    folder = Path(folder)
    if folder.exists():
        _discard(folder)
