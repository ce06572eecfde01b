"""One Prefect task per pipeline stage: each reproduces the DVC stage of the same
name, so a Prefect run and `dvc repro` run the same code and leave the same
dvc.lock. No task retries: the one step whose I/O fails transiently, a
download, is retried inside the library (`metatransfer.data.fetch._download`)."""

from __future__ import annotations

from prefect import task

from metatransfer import dvc_stages


@task(name="check_params")
def check_params(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Validate params.yaml before any stage runs (DVC deletes a stage's outputs before running it)."""
    return dvc_stages.reproduce_stage("check_params", root, force=force, parent_run_id=parent_run_id)


@task(name="image_folders")
def image_folders(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Manifests of the folders in prepare.image_folders (prepare re-runs when one changes)."""
    return dvc_stages.reproduce_stage("image_folders", root, force=force, parent_run_id=parent_run_id)


# No Prefect retries here: the library already retries each download
# (data.fetch._download, 3 attempts with back-off) and re-raises for good with the
# URL; retrying the whole stage on top would repeat every download 3 x 3 times
# and re-copy the files that had arrived, only to fail the same way.
@task(name="fetch")
def fetch(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Raw files into data/raw (download or mirror copy, checksums verified)."""
    return dvc_stages.reproduce_stage("fetch", root, force=force, parent_run_id=parent_run_id)


@task(name="prepare")
def prepare(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Decode, convert, validate, write the prepared store."""
    return dvc_stages.reproduce_stage("prepare", root, force=force, parent_run_id=parent_run_id)


@task(name="episodes")
def episodes(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Fixed evaluation episode files."""
    return dvc_stages.reproduce_stage("episodes", root, force=force, parent_run_id=parent_run_id)


@task(name="pretrain")
def pretrain(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Supervised pre-training of the backbone on every source class."""
    return dvc_stages.reproduce_stage("pretrain", root, force=force, parent_run_id=parent_run_id)


@task(name="meta_train")
def meta_train(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Meta-train every configured algorithm."""
    return dvc_stages.reproduce_stage("meta_train", root, force=force, parent_run_id=parent_run_id)


@task(name="finetune")
def finetune(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Fine-tune target models from φ and choose the one to ship."""
    return dvc_stages.reproduce_stage("finetune", root, force=force, parent_run_id=parent_run_id)


@task(name="evaluate")
def evaluate(root: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Score every method on the fixed episodes; write metrics, plots, report."""
    return dvc_stages.reproduce_stage("evaluate", root, force=force, parent_run_id=parent_run_id)


@task(name="dvc_status")
def dvc_status(root: str) -> dict:
    """`dvc status`: {} when the workspace matches dvc.lock."""
    return dvc_stages.pipeline_status(root)


# Fan-out (flows/fanout.py): a stage run as pieces on the flow's task runner, then recorded by DVC.
@task(name="stage_pieces")
def stage_pieces(root: str, stage: str, force: bool = False) -> list[str]:
    """The pieces of a fan-out stage to run now: [] when DVC finds the stage up to date (and not forced)."""
    if not force and not dvc_stages.stage_changed(stage, root):
        return []
    return dvc_stages.fanout_pieces(stage, root)


@task(name="piece_setting")
def piece_setting(root: str) -> dict[str, str]:
    """What pieces on other workers need from this process: the absolute root and the MLflow store."""
    from pathlib import Path

    from metatransfer.tracking import tracking_uri

    return {"root": str(Path(root).resolve()), "store_uri": tracking_uri(root)}


@task(name="run_piece", task_run_name="{stage}/{piece}")
def run_piece(setting: dict[str, str], stage: str, piece: str, parent_run_id: str | None = None) -> str:
    """One piece (an algorithm of meta_train, a target of finetune) in its own folder and process."""
    return dvc_stages.run_piece(stage, piece, setting["root"], parent_run_id, setting["store_uri"])


@task(name="merge_pieces", task_run_name="{stage}/merge")
def merge_pieces(root: str, stage: str, folders: list[str]) -> list[str]:
    """The stage's outputs from its pieces, then `dvc commit` of the stage: dvc.lock as `dvc repro` writes it."""
    from pathlib import Path

    from metatransfer.config import load_params
    from metatransfer.stages import finetune as finetune_stage
    from metatransfer.stages import meta_train as meta_train_stage

    merge = {"meta_train": meta_train_stage.merge_pieces, "finetune": finetune_stage.merge_pieces}[stage]
    project = Path(root).resolve()
    merge(load_params(project / "params.yaml"), project, [Path(f) for f in folders])
    dvc_stages.clear_pieces(stage, root)
    return dvc_stages.commit_stage(stage, root)
