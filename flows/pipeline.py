"""The `pipeline` flow: data → episodes → pretrain → meta_train → finetune → evaluate → promote.

Each stage is a Prefect task that reproduces the DVC stage of the same name,
so the flow and `dvc repro` run the same code and leave the same state; one
MLflow parent run groups the stage runs of one pipeline run. `promote` (a
registry action, not a DVC stage) gates each target's newly registered
challenger against the champion (docs/registry.md).

A run owns its workspace and its child processes (metatransfer/ownership.py):
a second pipeline or `dvc repro` in the same project refuses while it runs,
and killing it (even with SIGKILL) stops the stage process and the ephemeral
Prefect server with it. Runs found RUNNING after such a kill are closed at the
next start.

    python -m flows.pipeline [--root DIR] [--force] [--task-runner dask [--dask-address URL]]

With `--task-runner dask` (flow parameter `task_runner`), meta_train and
finetune fan out: one piece per algorithm / target on a Dask cluster, merged
and recorded by `dvc commit` (flows/fanout.py); the outputs and dvc.lock are
those of the default in-process run.

`params` and `targets` are for deployments (flows/deploy.py): a params file
made the project's params.yaml before the stages run, and the targets the
`promote` step gates (finetune, a DVC stage, always trains every target of
params.yaml).
"""

from __future__ import annotations

import sys

from prefect import flow

from flows import run_owned
from flows.data import data
from flows.fanout import TaskRunnerChoice, fan_out
from metatransfer.dvc_stages import FANOUT_STAGES
from tasks.deployment import check_targets, use_params
from tasks.recovery import recover_crashed_runs
from tasks.registry import promote
from tasks.stages import dvc_status, episodes, evaluate, finetune, meta_train, pretrain
from tasks.tracking import begin_run, end_run, reap_stale_runs
from tasks.workspace import claim_workspace, release_workspace


@flow(name="pipeline")
def pipeline(root: str = ".", force: bool = False, params: str | None = None,
             targets: list[str] | None = None, task_runner: str = "local", dask_address: str = "",
             dask_workers: int = 2, dask_threads_per_worker: int = 1) -> dict:
    """Run every stage that changed.

    Args:
        root: the project root (holds dvc.yaml and params.yaml).
        force: re-run every stage even if DVC finds nothing changed.
        params: a params file (relative to `root` or absolute) copied over root/params.yaml
            before any stage runs; None keeps params.yaml.
        targets: the targets `promote` gates (each must be in finetune.targets); None: all.
        task_runner: "local" (every stage in this process) or "dask" (meta_train and finetune
            fan out on Dask: flows/fanout.py).
        dask_address: a running Dask scheduler; "" starts a local cluster of `dask_workers`
            processes with `dask_threads_per_worker` threads each, on 127.0.0.1.

    Returns:
        {"ran": stages DVC ran, "mlflow_run_id": the parent run, "dvc_status": {} when clean,
         "promotion": the gate's decision per target}.
    """
    runner = TaskRunnerChoice(task_runner, dask_address, dask_workers, dask_threads_per_worker)
    claim_workspace(root)  # refuses while another pipeline or `dvc repro` runs here
    try:
        use_params(root, params)
        targets = check_targets(root, targets)
        recover_crashed_runs("pipeline")  # Prefect runs left "Running" by a killed process -> Crashed
        reap_stale_runs(root)  # MLflow runs left RUNNING -> FAILED, registry changes they made undone
        run_id = begin_run(root)
        status = "FAILED"
        try:
            ran = data(root, run_id, force)["ran"]
            for stage in (episodes, pretrain, meta_train, finetune, evaluate):
                if runner.fans_out and stage.name in FANOUT_STAGES:
                    ran += fan_out.with_options(task_runner=runner.build())(root, stage.name, run_id, force)
                else:
                    ran += stage(root, run_id, force)
            promotion = promote(root, run_id, targets)
            status = "FINISHED"
        finally:
            end_run(run_id, root, status)
        return {"ran": ran, "mlflow_run_id": run_id, "dvc_status": dvc_status(root), "promotion": promotion}
    finally:
        release_workspace(root)


if __name__ == "__main__":
    sys.exit(run_owned(pipeline, "python -m flows.pipeline"))
