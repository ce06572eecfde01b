"""Runs: one per stage (a child of the pipeline run when there is one), nested runs, the
pipeline's parent run, and the reaper of runs whose process was killed.

Every run carries its owner process (tags `owner.host`, `owner.pid`,
`owner.started`); `reap_stale_runs` marks FAILED each RUNNING run whose owner is
gone from this host, after undoing the registry changes it journaled
(`metatransfer.journal`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from metatransfer import provenance
from metatransfer.journal import registry_changes, revert_changes
from metatransfer.tracking.record import log_params
from metatransfer.tracking.store import configure, tracking_uri

PARENT_ENV = "METATRANSFER_PARENT_RUN_ID"
OWNER_TAGS = ("owner.host", "owner.pid", "owner.started")  # the process that runs (ran) a run
REAPED_TAG = "reaped"
# Actions deferred to the end of each open stage run (innermost last): see `at_run_end`.
_run_end_actions: list[list[Callable[[], None]]] = []

log = logging.getLogger(__name__)


def standard_tags(root: str | Path = ".") -> dict[str, str]:
    """Tags every run carries: git commit, dvc.lock digest, prepared-data version (`provenance.identify`)."""
    return provenance.identify(root).run_tags()


@contextlib.contextmanager
def parent_run(run_id: str | None) -> Iterator[None]:
    """Make stage runs opened inside (in this process or its children) children of `run_id`.

    Sets $METATRANSFER_PARENT_RUN_ID for the duration and restores it after;
    with no `run_id` nothing changes (runs attach to the inherited parent, if any).
    """
    if not run_id:
        yield
        return
    saved = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = saved


@contextlib.contextmanager
def stage_run(stage: str, root: str | Path = ".", params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage (a child of $METATRANSFER_PARENT_RUN_ID if set).

    Logs the flattened params, the standard tags, the runtime tags (device,
    torch version, threads, CPU model, load average at start: see
    `metatransfer.runtime.run_tags`) and the owner tags; yields the active run.
    Runs left RUNNING by killed processes are reaped first (`reap_stale_runs`);
    actions deferred with `at_run_end` run after the body succeeded; if the body
    or one of them fails, the registry changes the run journaled are undone.
    """
    import mlflow

    from metatransfer import runtime

    configure(root)
    reap_stale_runs(root, quiet=True)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"stage": stage, **standard_tags(root), **runtime.run_tags(), **owner_tags()}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as run:
        if params:
            log_params(params)
        _run_end_actions.append([])
        try:
            yield run
            for action in _run_end_actions[-1]:  # e.g. moving `challenger`: only once everything else is done
                action()
        except BaseException:
            _undo_registry_changes(run.info.run_id)
            raise
        finally:
            _run_end_actions.pop()


def at_run_end(action: Callable[[], None]) -> None:
    """Run `action` as the last step of the innermost open `stage_run`, only if its body succeeded.

    For registry changes (moving an alias): the run then ends FINISHED right after,
    so an alias never points at a version whose run is still going or failed. Outside
    a stage run the action runs at once.
    """
    if _run_end_actions:
        _run_end_actions[-1].append(action)
    else:
        action()


@contextlib.contextmanager
def child_run(name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested run under the active one (e.g. one per algorithm)."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags={**(tags or {}), **owner_tags()}) as run:
        yield run


def owner_tags() -> dict[str, str]:
    """The tags naming this process as a run's owner: host, pid, process start time."""
    from metatransfer.ownership import identity

    host, pid, started = identity()
    return dict(zip(OWNER_TAGS, (host, str(pid), f"{started:.3f}")))


def run_owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the owner process named by a run's tags still runs (None: another host's, or untagged)."""
    from metatransfer.ownership import alive

    try:
        host, pid, started = (tags[k] for k in OWNER_TAGS)
        return alive(host, int(pid), float(started))
    except (KeyError, ValueError):
        return None


def _undo_registry_changes(run_id: str) -> list[dict[str, Any]]:
    """Undo what a failing run changed in the registry (best effort: the reaper retries nothing here)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        changes = registry_changes(client.get_run(run_id).data.tags)
        if not changes:
            return []
        return revert_changes(client, changes)
    except Exception as exc:  # noqa: BLE001  (the run's own failure is the error to report)
        log.warning("run %s failed and its registry changes could not be undone: %s", run_id, exc)
        return []


def reap_stale_runs(root: str | Path = ".", quiet: bool = False) -> list[str]:
    """Mark FAILED every RUNNING run whose owner process is gone from this host.

    First undoes the registry changes each such run journaled (an alias it moved
    goes back where it was, unless someone moved it since). Runs of live
    processes, of other hosts and runs without owner tags are left alone.

    Args:
        root: project root (the store).
        quiet: log a store failure as a warning and return [] instead of raising
            (at stage start: housekeeping must not stop a stage).

    Returns:
        The ids of the runs marked FAILED.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    try:
        exp_id = configure(root)
        client = MlflowClient(tracking_uri(root))
        stale, token = [], None
        while True:
            page = client.search_runs([exp_id], "attributes.status = 'RUNNING'", ViewType.ACTIVE_ONLY,
                                      max_results=1000, page_token=token)
            stale += [r for r in page if run_owner_alive(r.data.tags) is False]
            token = page.token
            if not token:
                break
        reaped = []
        for run in stale:
            tags = run.data.tags
            changes = registry_changes(tags)
            if changes:
                revert_changes(client, changes)
            client.set_tag(run.info.run_id, REAPED_TAG,
                           f"owner pid {tags['owner.pid']} on {tags['owner.host']} is gone (killed or lost); "
                           f"marked FAILED by pid {os.getpid()}")
            client.set_terminated(run.info.run_id, status="FAILED")
            log.warning("MLflow run %s (%s) was left RUNNING by pid %s, which is gone: marked FAILED%s",
                        run.info.run_name, run.info.run_id, tags["owner.pid"],
                        f", {len(changes)} registry change(s) undone" if changes else "")
            reaped.append(run.info.run_id)
        return reaped
    except Exception as exc:  # noqa: BLE001
        if not quiet:
            raise
        log.warning("could not check %s for runs left RUNNING by killed processes: %s", tracking_uri(root), exc)
        return []


def begin_pipeline_run(root: str | Path = ".", name: str = "pipeline", tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run and return its id.

    The run stays RUNNING until `end_pipeline_run`; stage processes attach their
    runs to it through $METATRANSFER_PARENT_RUN_ID.
    """
    from mlflow.tracking import MlflowClient

    exp_id = configure(root)
    client = MlflowClient(tracking_uri(root))
    all_tags = {"mlflow.runName": name, "stage": "pipeline", **standard_tags(root), **owner_tags(), **(tags or {})}
    return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id


def end_pipeline_run(run_id: str, root: str | Path = ".", status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED or FAILED (tags refreshed: dvc.lock changed during the run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    for key, value in standard_tags(root).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)
