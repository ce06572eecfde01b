"""Prefect tasks around MLflow (registry/store I/O: retried)."""

from __future__ import annotations

from prefect import task

from metatransfer import tracking


@task(name="begin_mlflow_run", retries=2, retry_delay_seconds=5)
def begin_run(root: str) -> str:
    """Open the MLflow parent run of this pipeline run; returns its id."""
    return tracking.begin_pipeline_run(root)


@task(name="end_mlflow_run", retries=2, retry_delay_seconds=5)
def end_run(run_id: str, root: str, status: str) -> None:
    """Close the MLflow parent run as FINISHED or FAILED."""
    tracking.end_pipeline_run(run_id, root, status)


@task(name="reap_stale_runs", retries=2, retry_delay_seconds=5)
def reap_stale_runs(root: str) -> list[str]:
    """Mark MLflow runs left RUNNING by killed processes FAILED and undo their registry changes."""
    return tracking.reap_stale_runs(root)
