"""`python -m flows.pipeline --task-runner dask`: meta_train and finetune fan out on a Dask
cluster (2 worker processes on loopback) and leave exactly the state of the in-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.fanout import TaskRunnerChoice
from metatransfer import dvc_stages
from metatransfer.errors import ConfigError
from tests.integration.conftest import ROOT, make_project, project_env

# DVC outputs compared file by file (dvc.lock compares the rest, md5 by md5).
COMPARED = ("models", "metrics", "data/episodes", "plots/meta_train", "plots/finetune")


def _files(project: Path) -> dict[str, bytes]:
    return {str(p.relative_to(project)): p.read_bytes()
            for folder in COMPARED for p in sorted((project / folder).rglob("*")) if p.is_file()}


def _dvc(project: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_dask_fan_out_gives_the_sequential_outputs(prefect_project: Path, tmp_path: Path, mirror: Path) -> None:
    from distributed import Client, LocalCluster

    project = make_project(tmp_path / "dask_project", mirror)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    try:
        command = [sys.executable, "-m", "flows.pipeline", "--task-runner", "dask", "--dask-address",
                   cluster.scheduler_address]
        proc = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True)
        (project / "flow.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        # The pieces, and only they, ran on the cluster's workers: one task per algorithm and per target.
        with Client(cluster) as client:
            counts = client.run_on_scheduler(lambda dask_scheduler: {
                name: dict(prefix.state_counts) for name, prefix in dask_scheduler.task_prefixes.items()})
        params = yaml.safe_load((project / "params.yaml").read_text())
        pieces = len(params["meta_train"]["algorithms"]) + len(params["finetune"]["targets"])
        assert sum(c.get("memory", 0) for c in counts.values()) == pieces, counts
        # A second run: DVC finds both stages up to date, so no piece runs.
        again = subprocess.run(command, cwd=project, env=project_env(project), capture_output=True, text=True)
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        assert "Task run 'meta_train/" not in again.stdout + again.stderr
        with Client(cluster) as client:
            finished = client.run_on_scheduler(lambda dask_scheduler: sum(
                prefix.state_counts.get("memory", 0) for prefix in dask_scheduler.task_prefixes.values()))
        assert finished == pieces
    finally:
        cluster.close()

    assert _dvc(project, "status", "--json").strip() in ("{}", "")
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    sequential = yaml.safe_load((prefect_project / "dvc.lock").read_text())["stages"]
    for stage in ("meta_train", "finetune", "evaluate"):
        assert lock[stage] == sequential[stage], stage
    assert lock == sequential
    ours, theirs = _files(project), _files(prefect_project)
    assert sorted(ours) == sorted(theirs)
    assert [f for f in ours if ours[f] != theirs[f]] == []
    assert sorted(p.name for p in (project / "models" / "meta").iterdir()) == sorted(params["meta_train"]["algorithms"])
    # The piece folders are gone; nothing is left for `dvc repro` to do.
    assert not (project / "checkpoints" / "fanout" / "meta_train").exists()
    assert "Stage 'meta_train' didn't change" in _dvc(project, "repro", "--dry", "meta_train")


@pytest.mark.parametrize("choice, message", [
    (dict(kind="ray"), "task_runner.kind (--task-runner) must be one of ['local', 'dask'], found 'ray'"),
    (dict(kind="local", address="tcp://127.0.0.1:8786"),
     "task_runner.address (--dask-address) 'tcp://127.0.0.1:8786' needs task_runner.kind 'dask'"),
    (dict(kind="dask", address="127.0.0.1:8786"), "task_runner.address (--dask-address) must be a scheduler URL"),
    (dict(kind="dask", workers=0), "task_runner.workers (--dask-workers) must be an integer >= 1, found 0"),
    (dict(kind="dask", threads_per_worker=True),
     "task_runner.threads_per_worker (--dask-threads-per-worker) must be an integer >= 1, found True"),
])
def test_a_bad_task_runner_choice_names_the_key(choice: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        TaskRunnerChoice(**choice)
    assert message in str(err.value)


def test_only_dask_fans_out_and_builds_a_dask_runner() -> None:
    from prefect_dask import DaskTaskRunner

    assert not TaskRunnerChoice().fans_out
    runner = TaskRunnerChoice("dask", workers=3).build()
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_kwargs["n_workers"] == 3
    assert TaskRunnerChoice("dask", address="tcp://127.0.0.1:8786").build().address == "tcp://127.0.0.1:8786"


def test_a_piece_folder_has_one_item_its_inputs_linked_and_no_later_section(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for folder in ("data/prepared", "models/pretrain", "models/meta/protonet"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert dvc_stages.fanout_pieces("meta_train", tmp_path) == ["protonet", "anil"]
    folder = dvc_stages.make_piece_root("meta_train", "anil", tmp_path)
    assert folder == tmp_path / "checkpoints" / "fanout" / "meta_train" / "anil"
    params = yaml.safe_load((folder / "params.yaml").read_text())
    original = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["meta_train"] == {**original["meta_train"], "algorithms": ["anil"]}
    assert "finetune" not in params and "evaluate" not in params and params["pretrain"] == original["pretrain"]
    assert (folder / "data").resolve() == tmp_path / "data" and (folder / "dvc.lock").is_symlink()
    # The stage's own models folder is the piece's to write; the others are the project's.
    assert (folder / "models" / "pretrain").is_symlink() and not (folder / "models" / "meta").exists()
    # Made again (a failed run's folder): its checkpoints stay for the piece to resume from, the rest goes.
    (folder / "checkpoints" / "meta_train" / "anil").mkdir(parents=True)
    (folder / "checkpoints" / "meta_train" / "anil" / "step_2.pt").write_bytes(b"x")
    (folder / "metrics").mkdir()
    (folder / "metrics" / "meta_train.json").write_text("{}")
    assert dvc_stages.make_piece_root("meta_train", "anil", tmp_path) == folder
    assert (folder / "checkpoints" / "meta_train" / "anil" / "step_2.pt").read_bytes() == b"x"
    assert not (folder / "metrics").exists() and (folder / "models" / "pretrain").is_symlink()
    dvc_stages.clear_pieces("meta_train", tmp_path)
    assert not folder.parent.exists() and (tmp_path / "checkpoints" / "fanout").is_dir()
    with pytest.raises(ConfigError, match="stage 'evaluate' cannot fan out: expected one of"):
        dvc_stages.fanout_pieces("evaluate", tmp_path)
