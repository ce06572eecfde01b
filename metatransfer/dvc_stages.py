"""Run DVC stages from Python (no Prefect here): the Prefect tasks call this so
that the Prefect flow and `dvc repro` execute the same stage commands and leave
the same dvc.lock (see README, "Two entry points, one state")."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from metatransfer.tracking import parent_run


@contextlib.contextmanager
def _stage_environment(parent_run_id: str | None) -> Iterator[None]:
    """Environment of the stage subprocesses DVC starts.

    This interpreter's bin dir goes first on PATH so stage commands
    (`python -m ...`) run in the same environment even when it was not
    activated; the MLflow parent run id lets stage runs attach to it.
    """
    saved = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved or ""])
    try:
        with parent_run(parent_run_id):
            yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def reproduce_stage(
    stage: str, root: str | Path = ".", force: bool = False, parent_run_id: str | None = None
) -> list[str]:
    """Reproduce one DVC stage (only if its deps, params or outs changed).

    Args:
        stage: stage name in dvc.yaml (e.g. "prepare"), or the name of a
            `foreach` group (e.g. "image_folders": every `image_folders@<key>`
            stage; none when the mapping it iterates over is empty).
        root: the project root (holds dvc.yaml).
        force: run even if nothing changed.
        parent_run_id: MLflow run the stage's run becomes a child of.

    Returns:
        Names of the stages that actually ran (empty when DVC skipped it).
    """
    from metatransfer.ownership import dvc_repo  # reuses the flow's hold of DVC's repo lock

    root = Path(root).resolve()
    # DVC resolves a bare stage name against the dvc.yaml of the *current* folder:
    # name root's dvc.yaml so a caller elsewhere cannot run another project's stage.
    dvc_yaml = root / "dvc.yaml"
    with _stage_environment(parent_run_id), dvc_repo(root) as repo:
        names = [stage]
        if _is_foreach_group(dvc_yaml, stage):
            names = [s.name for s in repo.index.stages
                     if s.name.startswith(f"{stage}@") and Path(s.path).resolve() == dvc_yaml]
            if not names:
                return []
        ran = repo.reproduce(targets=[f"{dvc_yaml}:{n}" for n in names], single_item=True, force=force)
    return [s.name for s in ran]


def _is_foreach_group(dvc_yaml: Path, stage: str) -> bool:
    """True when `stage` is a `foreach` group in `dvc_yaml` (its stages are named `stage@<key>`)."""
    import yaml

    definition = ((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}).get(stage)
    return isinstance(definition, dict) and "foreach" in definition


def pipeline_status(root: str | Path = ".") -> dict:
    """`dvc status` as a mapping: {} when every stage is up to date."""
    from metatransfer.ownership import dvc_repo

    with dvc_repo(root) as repo:
        return dict(repo.status())


# --------------------------------------------------------------------------- fan-out (flows --task-runner dask)
# A fan-out stage runs as independent pieces (one process each, possibly on
# other Dask workers), then `<stage>.merge_pieces` assembles the stage's
# outputs and `commit_stage` records them in dvc.lock exactly as `dvc repro`
# would: DVC stays the owner of what is up to date.
#
# stage -> (the params list whose items are the pieces, the stage's own folder under models/)
FANOUT_STAGES: dict[str, tuple[str, str]] = {"meta_train": ("algorithms", "meta"), "finetune": ("targets", "target")}
# Sections of later stages, left out of a piece's params: they refer to every piece (finetune.methods
# names every algorithm), and a stage reads no later stage's section.
_LATER_SECTIONS = {"meta_train": ("finetune", "evaluate"), "finetune": ("evaluate",)}


def _dvc_target(root: Path, stage: str) -> str:
    return f"{root / 'dvc.yaml'}:{stage}"


def stage_changed(stage: str, root: str | Path = ".") -> bool:
    """Whether DVC would run `stage` now (its deps, params or outs differ from dvc.lock).

    Only the stage itself is checked (the flow runs its upstream stages first).
    """
    from metatransfer.ownership import dvc_repo

    root = Path(root).resolve()
    with dvc_repo(root) as repo:
        return bool(repo.status(targets=[_dvc_target(root, stage)], with_deps=False))


def fanout_pieces(stage: str, root: str | Path = ".") -> list[str]:
    """The pieces of a fan-out stage, in params order (meta_train: algorithms, finetune: targets).

    Raises:
        ConfigError: `stage` has no pieces (not in FANOUT_STAGES) or params.yaml has no such section.
    """
    from metatransfer.config import load_params
    from metatransfer.errors import ConfigError

    if stage not in FANOUT_STAGES:
        raise ConfigError(f"stage {stage!r} cannot fan out: expected one of {sorted(FANOUT_STAGES)}; "
                          "run it with reproduce_stage")
    section = getattr(load_params(Path(root) / "params.yaml"), stage)
    if section is None:
        raise ConfigError(f"{Path(root) / 'params.yaml'} has no `{stage}` section; add it (see the README)")
    return list(getattr(section, FANOUT_STAGES[stage][0]))


def piece_root(stage: str, piece: str, root: str | Path = ".") -> Path:
    """The folder one piece runs in: `checkpoints/fanout/<stage>/<piece>` (outside DVC's outputs)."""
    from metatransfer.config import load_params
    from metatransfer.layout import Layout

    layout = Layout.of(Path(root).resolve(), load_params(Path(root) / "params.yaml"))
    return layout.checkpoints("fanout") / stage / piece


def make_piece_root(stage: str, piece: str, root: str | Path = ".") -> Path:
    """A project folder for one piece: params.yaml with the stage's list cut to `piece`, and
    links to the project's inputs (data folders, models of other stages, dvc.yaml, dvc.lock).

    The stage command run there writes its outputs there (the stage's own models folder,
    metrics, plots, run facts, checkpoints), not in the project. A folder left by a failed
    or killed run is remade, except its `checkpoints/`: the piece resumes from them.
    """
    import shutil

    import yaml

    root = Path(root).resolve()
    folder = piece_root(stage, piece, root)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # a failed or killed run's folder: its checkpoints stay, to resume from
        if old.name == "checkpoints":
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw[stage][FANOUT_STAGES[stage][0]] = [piece]
    for later in _LATER_SECTIONS[stage]:
        raw.pop(later, None)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    data = raw.get("data") or {}
    inputs = {"data", "dvc.yaml", "dvc.lock"} | {
        Path(p).parts[0] for p in (data.get("raw_dir"), data.get("prepared_dir")) if p and not Path(p).is_absolute()}
    for name in sorted(inputs):
        if (root / name).exists():
            (folder / name).symlink_to(root / name)
    (folder / "models").mkdir()
    own = FANOUT_STAGES[stage][1]
    for model_dir in sorted((root / "models").iterdir()) if (root / "models").is_dir() else []:
        if model_dir.is_dir() and model_dir.name != own:  # not DVC's models/.gitignore
            (folder / "models" / model_dir.name).symlink_to(model_dir)
    return folder


def run_piece(stage: str, piece: str, root: str | Path, parent_run_id: str | None = None,
              store_uri: str | None = None) -> str:
    """Run one piece of a fan-out stage: the stage's own command in its piece folder.

    The command is the stage's `python -m metatransfer.stages.<stage>` with the piece's
    params file, in this interpreter's environment (a Dask worker's); its MLflow runs go to
    `store_uri` (the flow's store, `tracking.tracking_uri(root)` there), under `parent_run_id`.

    Args:
        stage, piece: the stage and the piece (an item of its list, FANOUT_STAGES).
        root: the project root, absolute (a worker's folder is not the flow's).
        parent_run_id: MLflow parent run.
        store_uri: MLflow tracking URI; None: `tracking_uri(root)` in this process.

    Returns:
        The piece folder (a string: it crosses process boundaries).

    Raises:
        MetatransferError: the command failed (names the stage, the piece and the log's last lines).
    """
    import subprocess

    from metatransfer.errors import MetatransferError
    from metatransfer.tracking.runs import PARENT_ENV
    from metatransfer.tracking.store import tracking_uri

    root = Path(root).resolve()
    folder = make_piece_root(stage, piece, root)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # The project's own copy of the package first, as for `python -m ...` started in the root by DVC.
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["MLFLOW_TRACKING_URI"] = store_uri or tracking_uri(root)  # the project's store, not the piece folder's
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    env.pop("DVC_STAGE", None)  # not started by DVC (ownership.die_with_dvc)
    log_path = folder / "stage.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.run([sys.executable, "-m", f"metatransfer.stages.{stage}", "--params", "params.yaml"],
                              cwd=folder, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise MetatransferError(f"{stage} piece {piece!r} failed (exit {proc.returncode}); its log is "
                                f"{log_path}:\n{tail}")
    return str(folder)


def commit_stage(stage: str, root: str | Path = ".") -> list[str]:
    """Record a stage's outputs, made outside `dvc repro` (by its pieces), in dvc.lock: `dvc commit <stage>`.

    Returns:
        [stage].
    """
    from metatransfer.ownership import dvc_repo

    root = Path(root).resolve()
    with dvc_repo(root) as repo:
        repo.commit(_dvc_target(root, stage), force=True)
    return [stage]


def clear_pieces(stage: str, root: str | Path = ".") -> None:
    """Remove the piece folders of `stage` (after their outputs were merged into the project)."""
    import shutil

    shutil.rmtree(piece_root(stage, "x", root).parent, ignore_errors=True)
