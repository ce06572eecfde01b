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
