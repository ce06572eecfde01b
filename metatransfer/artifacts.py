"""Model artifacts without pickle: safetensors weights + JSON config + checksums.

A saved learner is a folder:

    model.safetensors   the state_dict (tensors only: loading runs no code)
    config.json         what `build_algorithm` needs to rebuild the module
    checksums.json      sha256 of the two files above, checked on every load

Folders are written to a temporary sibling and renamed into place, so a crash
never leaves a half-written model where a good one was.

Loading never runs code from the artifact: weights are read with safetensors
(a pickle, `torch.save` file or anything else is refused before any byte of it
is interpreted), the config is plain JSON, and both are checked against
checksums.json and, when the caller knows it, against the weights' SHA-256
recorded in MLflow / metrics (`expected_sha256`). `pickle_files` finds pickles
in a folder tree (used by the tests over every artifact the pipeline writes).
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


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes a rename inside it durable)."""
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
        fsync_path(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sums


def load_state(
    folder: str | Path, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights + config after checking both against checksums.json.

    Args:
        folder: a folder written by `save_state`.
        expected_sha256: optional SHA-256 of the weights recorded elsewhere (the
            MLflow run, metrics/*.json); guards against a folder whose
            checksums.json was rewritten together with the weights.

    Returns:
        (state_dict, config).

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
    if expected_sha256 is not None and sums.get(WEIGHTS) != expected_sha256:
        raise ArtifactError(
            f"{folder / WEIGHTS}: SHA-256 {sums.get(WEIGHTS)} differs from the one recorded when it "
            f"was trained ({expected_sha256}); the model was replaced. Refusing to load it; re-run "
            "the stage that wrote it."
        )
    _refuse_non_safetensors(folder / WEIGHTS)
    try:
        state = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(
            f"{folder / WEIGHTS}: not a safetensors file ({exc}); refusing to load "
            "(pickled weights are never loaded)."
        ) from None
    return state, json.loads((folder / CONFIG).read_text())


# Leading bytes of formats that execute code or need pickle to load: pickle
# protocol 2-5 (b"\x80" + protocol byte) and zip (torch.save's default format).
_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"


def _refuse_non_safetensors(path: Path) -> None:
    """Raise ArtifactError unless `path` has a well-formed safetensors header.

    Only the header is parsed (8-byte length + JSON), so nothing in the file can
    run; the message says what the file looks like instead.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = path.stat().st_size
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < n <= size - 8
        if ok:
            header = f.read(n)
            try:
                ok = isinstance(json.loads(header), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
    if not ok:
        kind = ("a Python pickle" if head[:2] in _PICKLE_MAGIC else
                "a zip archive (torch.save format, which holds a pickle)" if head[:4] == _ZIP_MAGIC else
                "not a safetensors file")
        raise ArtifactError(
            f"{path}: {kind}; refusing to load it (weights are only read as safetensors, "
            "pickled weights are never loaded because unpickling runs code). Re-create the "
            "model with this project's stages."
        )


def verify_weights(folder: str | Path, expected_sha256: str) -> None:
    """Check a model folder's weights against a SHA-256 recorded elsewhere.

    Raises:
        ArtifactError: the file is missing or its hash differs.
    """
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; re-run the stage that wrote it")
    found = sha256_file(path)
    if found != expected_sha256:
        raise ArtifactError(
            f"{path}: SHA-256 {found} differs from the recorded {expected_sha256}; the model was "
            "replaced after training. Refusing to use it; re-run the stage that wrote it."
        )


def pickle_files(root: str | Path) -> list[Path]:
    """Files under `root` that are pickles or pickle containers (by name or content).

    Looks at the extension (.pkl, .pickle, .pt, .pth, .joblib) and the leading
    bytes (pickle protocol 2-5, or a zip archive holding a `data.pkl`, i.e.
    torch.save's format). A safetensors file whose length header happens to
    start with 0x80 is recognised by its header and not reported.

    Returns:
        The offending paths, sorted.
    """
    import zipfile

    found = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in (".pkl", ".pickle", ".pt", ".pth", ".joblib"):
            found.append(path)
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] in _PICKLE_MAGIC:
            try:
                _refuse_non_safetensors(path)
            except ArtifactError:
                found.append(path)
        elif head == _ZIP_MAGIC and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    found.append(path)
    return found


def check_model_code(model_dir: str | Path) -> None:
    """Refuse an MLflow model folder that could run foreign code when loaded.

    The project's pyfunc models are "models from code": MLflow executes the
    Python file stored in the model folder when it loads it. This check, run
    before `mlflow.pyfunc.load_model`, allows only Python files byte-identical
    to this installed package's `metatransfer/serving/*.py` and no pickles, so
    loading runs this package's code, never the artifact's.

    Args:
        model_dir: a local MLflow model folder (holds MLmodel).

    Raises:
        ArtifactError: a Python file differs from (or is not one of) the
            installed serving modules, or a pickle is present.
    """
    from metatransfer import serving

    model_dir = Path(model_dir)
    installed = {p.name: sha256_file(p) for p in Path(serving.__file__).parent.glob("*.py")}
    for path in sorted(model_dir.rglob("*.py")):
        if installed.get(path.name) != sha256_file(path):
            raise ArtifactError(
                f"{path}: Python code in the model differs from the installed metatransfer.serving."
                f"{path.stem}; refusing to load it (loading would run the artifact's code). Re-log the "
                "model with this version of the package."
            )
    pickles = pickle_files(model_dir)
    if pickles:
        raise ArtifactError(f"{model_dir}: holds pickled files {[str(p) for p in pickles]}; refusing to load it.")


def save_learner(learner: torch.nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Save a MetaLearner (its `config()` + state_dict) to `folder`."""
    config = dict(learner.config())  # type: ignore[operator]
    if extra:
        config["extra"] = extra
    return save_state(learner.state_dict(), config, folder)


def load_learner(folder: str | Path, expected_sha256: str | None = None):  # -> MetaLearner (import cycle otherwise)
    """Rebuild a MetaLearner from a folder written by `save_learner`, in eval mode.

    Args:
        folder: the model folder.
        expected_sha256: optional recorded SHA-256 of the weights (see `load_state`).

    Raises:
        ArtifactError: missing/altered/unsafe files or weights that do not fit.
    """
    from metatransfer.algorithms import build_algorithm
    from metatransfer.models import BackboneSpec

    state, config = load_state(folder, expected_sha256)
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
