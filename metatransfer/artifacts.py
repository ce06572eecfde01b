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
recorded in MLflow / metrics (`expected_sha256`). Telling a pickle from
safetensors without unpickling it, and finding pickles in a folder tree, is
`metatransfer/pickles.py`.

Logged MLflow models hold data only: their MLmodel names an installed module
of `metatransfer.serving` as the pyfunc loader. `check_model_code` refuses a
model folder holding code that differs from the installed package, another
loader, code paths or pickles; it runs before every load (`load_pyfunc_model`,
the serving command, and the loaders themselves), so code planted in the
artifact store never runs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metatransfer.errors import MetatransferError, is_disk_full
from metatransfer.io import sha256_file
from metatransfer.pickles import pickle_files, safetensors_problem

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"


class ArtifactError(MetatransferError):
    """A model artifact is missing, altered, or not in the safe format."""



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
    except Exception as exc:
        if is_disk_full(exc):
            # safetensors and write() do not say which file: name the model folder.
            raise OSError(errno.ENOSPC, "No space left on device", str(folder)) from exc
        raise
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


def _refuse_non_safetensors(path: Path) -> None:
    """Raise ArtifactError unless `path` has a well-formed safetensors header (`pickles.safetensors_problem`).

    Only the header is parsed, so nothing in the file can run; the message says
    what the file looks like instead.
    """
    kind = safetensors_problem(path)
    if kind is not None:
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


# The installed modules an MLflow model of this project may name as its pyfunc
# `loader_module`. Both are plain modules of this package: MLflow imports them
# from the installed package, never from the artifact.
PYFUNC_LOADERS = ("metatransfer.serving.target_model", "metatransfer.serving.few_shot_model")
# Files MLflow or Python could import or execute if a model folder were put on sys.path.
_CODE_SUFFIXES = (".py", ".pyc", ".pyw", ".pyx", ".so", ".pth")
_REREGISTER = ("Re-register the model with this version of metatransfer (`metatransfer run --stage finetune "
               "--force` logs and registers it again).")


def check_model_code(model_dir: str | Path) -> None:
    """Refuse an MLflow model folder that could run code other than this installed package's.

    Run before every load of a logged model (the serving command, the registry's
    predictions, and the pyfunc loaders themselves), so that code stored in the
    artifact store never runs. A folder passes when:

    - every code file in it is a `.py` byte-identical to the installed
      `metatransfer/serving/<same name>.py` (the project's models hold none);
    - MLmodel's `python_function` flavor names one of `PYFUNC_LOADERS` (installed
      modules) and no `code` paths (MLflow would put them first on sys.path);
    - no file is a pickle (by name or content).

    Args:
        model_dir: a local MLflow model folder (holds MLmodel).

    Raises:
        ArtifactError: one line naming the file, the expected and found value
            (SHA-256 for code), and what to do.
    """
    import yaml

    from metatransfer import serving

    model_dir = Path(model_dir)
    installed_dir = Path(serving.__file__).parent
    for path in sorted(p for p in model_dir.rglob("*") if p.suffix.lower() in _CODE_SUFFIXES and not p.is_dir()):
        source = installed_dir / path.name
        found = sha256_file(path)
        expected = sha256_file(source) if path.suffix == ".py" and source.is_file() else None
        if found != expected:
            wanted = (f"sha256 {expected} of the installed metatransfer.serving.{path.stem}" if expected else
                      f"no such file: metatransfer.serving has no {path.name}")
            raise ArtifactError(
                f"{path}: code in the model differs from the installed package (expected {wanted}, found sha256 "
                f"{found}); refusing to load the model, as loading could run this file. {_REREGISTER}"
            )
    mlmodel = model_dir / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text()) if mlmodel.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mlmodel}: not a readable MLmodel file ({type(exc).__name__}); {_REREGISTER}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{model_dir}: no MLmodel file (found {sorted(p.name for p in model_dir.iterdir())[:10]}); "
                            f"not an MLflow model folder. {_REREGISTER}")
    conf = (meta.get("flavors") or {}).get("python_function") or {}
    loader = conf.get("loader_module")
    if loader not in PYFUNC_LOADERS:
        raise ArtifactError(
            f"{mlmodel}: python_function loader_module is {loader!r}, expected one of {list(PYFUNC_LOADERS)}; "
            "a model with another loader runs code stored in the artifact (logged by an older metatransfer, or "
            f"altered). Refusing to load it. {_REREGISTER}"
        )
    if conf.get("code"):
        raise ArtifactError(
            f"{mlmodel}: python_function lists code paths {conf.get('code')!r}, expected none (MLflow would import "
            f"them before the installed package). Refusing to load it. {_REREGISTER}"
        )
    pickles = pickle_files(model_dir)
    if pickles:
        raise ArtifactError(f"{model_dir}: holds pickled files {[str(p) for p in pickles][:5]}, expected none; "
                            f"refusing to load it (unpickling runs code). {_REREGISTER}")


def check_model_folder(data_path: str | Path) -> None:
    """`check_model_code` on the MLflow model folder that holds `data_path` (the pyfunc loaders' guard).

    MLflow calls a loader with the model's `data` folder (`<model>/data/<name>`);
    the model folder is the nearest parent holding MLmodel.

    Raises:
        ArtifactError: no MLmodel above `data_path`, or `check_model_code` refuses.
    """
    data_path = Path(data_path).resolve()
    for folder in [data_path, *data_path.parents][:4]:
        if (folder / "MLmodel").is_file():
            check_model_code(folder)
            return
    raise ArtifactError(f"{data_path}: not inside an MLflow model folder (no MLmodel above it); load the model "
                        "with mlflow.pyfunc.load_model(<model URI>).")


def load_pyfunc_model(model_uri: str, dst_path: str | Path):  # -> mlflow.pyfunc.PyFuncModel
    """Download a logged/registered model to `dst_path`, check its code, then load it as pyfunc.

    The check runs on the downloaded copy, the copy that is loaded, so nothing
    changed in the store between check and load can run.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/<model id>`, `runs:/...` or a local folder.
        dst_path: an existing folder to download into.

    Raises:
        ArtifactError: `check_model_code` refuses the model.
    """
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst_path)))
    try:
        check_model_code(local)
    except ArtifactError as exc:
        # Name the file where it lies in the store, not in the private download.
        raise ArtifactError(str(exc).replace(str(local), _store_location(model_uri))) from None
    return mlflow.pyfunc.load_model(str(local))


def _store_location(model_uri: str) -> str:
    """Where a model's files lie in the artifact store (a path for a local store), else the URI itself."""
    location = model_uri
    if model_uri.startswith("models:/"):
        try:
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            location = ModelsArtifactRepository.get_underlying_uri(model_uri)
        except Exception:  # noqa: BLE001 - only for a message; the URI is still meaningful
            return model_uri
    return location.removeprefix("file://").rstrip("/")


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
