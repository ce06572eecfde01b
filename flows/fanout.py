"""The `fan_out` flow: one stage (meta_train, finetune) run as independent pieces on a task runner.

    python -m flows.pipeline --task-runner dask                          # a local Dask cluster per stage
    python -m flows.pipeline --task-runner dask --dask-address tcp://host:8786   # an existing scheduler

The pieces (meta_train: one per algorithm, finetune: one per target) run as
Prefect tasks on the chosen runner, each the stage's own command in its own
folder (metatransfer/dvc_stages.py); the flow then merges their outputs into
the project and records them with `dvc commit <stage>`, so dvc.lock, the
outputs and `dvc status` are those of `dvc repro <stage>` (DVC stays the owner
of what is up to date; an up-to-date stage runs no piece).

Workers of an existing scheduler must see the project at the same path (one
machine, or a shared file system) and have the package installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow

from tasks.stages import merge_pieces, piece_setting, run_piece, stage_pieces

TASK_RUNNERS = ("local", "dask")


@dataclass(frozen=True)
class TaskRunnerChoice:
    """Where the flow's independent work runs.

    kind: "local" (the default: every stage in this process, `dvc repro <stage>`) or
        "dask" (meta_train and finetune fan out on a Dask cluster).
    address: a running Dask scheduler ("tcp://host:8786"); "" starts a local cluster of
        `workers` processes with `threads_per_worker` threads each on 127.0.0.1.
    """

    kind: str = "local"
    address: str = ""
    workers: int = 2
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        from metatransfer.errors import ConfigError

        if self.kind not in TASK_RUNNERS:
            raise ConfigError(f"task_runner.kind (--task-runner) must be one of {list(TASK_RUNNERS)}, "
                              f"found {self.kind!r}")
        if self.address and self.kind != "dask":
            raise ConfigError(f"task_runner.address (--dask-address) {self.address!r} needs task_runner.kind 'dask' "
                              f"(--task-runner dask), found {self.kind!r}")
        if self.address and "://" not in self.address:
            raise ConfigError(f"task_runner.address (--dask-address) must be a scheduler URL such as "
                              f"'tcp://127.0.0.1:8786', found {self.address!r}")
        for key, flag, value in (("workers", "--dask-workers", self.workers),
                                 ("threads_per_worker", "--dask-threads-per-worker", self.threads_per_worker)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"task_runner.{key} ({flag}) must be an integer >= 1, found {value!r}")

    @property
    def fans_out(self) -> bool:
        """Whether meta_train and finetune run as pieces."""
        return self.kind == "dask"

    def build(self) -> Any:
        """The Prefect task runner: a `DaskTaskRunner` (prefect-dask) for "dask", else the default."""
        if self.kind == "local":
            from prefect.task_runners import ThreadPoolTaskRunner

            return ThreadPoolTaskRunner()
        from prefect_dask import DaskTaskRunner

        if self.address:
            return DaskTaskRunner(address=self.address)
        # Processes, not threads: each piece is a training process with its own interpreter anyway,
        # and the task's bookkeeping must not share a GIL with the flow.
        cluster_kwargs: dict[str, Any] = {
            "n_workers": self.workers, "threads_per_worker": self.threads_per_worker, "processes": True,
            "host": "127.0.0.1", "dashboard_address": ":0"}
        api = flow_api_url()
        if api:  # workers report to this flow's API instead of each starting a temporary server of its own
            cluster_kwargs["env"] = {"PREFECT_API_URL": api}
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def flow_api_url() -> str | None:
    """The Prefect API this process reports to: $PREFECT_API_URL, or the temporary server it started, or None."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one instance per process that Prefect's client starts
    return server.api_url if server.running else None


@flow(name="fan_out")
def fan_out(root: str, stage: str, parent_run_id: str | None = None, force: bool = False) -> list[str]:
    """Run `stage` as pieces on this flow's task runner, merge them, `dvc commit` the stage.

    Args:
        root: the project root.
        stage: "meta_train" or "finetune".
        parent_run_id: MLflow parent run of the pieces' stage runs.
        force: run even if DVC finds the stage up to date.

    Returns:
        [stage] when it ran, [] when DVC found it up to date.
    """
    pieces = stage_pieces(root, stage, force)
    if not pieces:
        return []
    setting = piece_setting(root)
    futures = [run_piece.submit(setting, stage, piece, parent_run_id) for piece in pieces]
    return merge_pieces(root, stage, [future.result() for future in futures])
