"""Crash recovery for Prefect flow runs.

A flow killed with SIGKILL (or a machine that lost power) never reports an end
state: without help it stays "Running" in Prefect forever. So every `pipeline`
run tags itself with its owner process (`owner:<host>:<pid>:<process start
time>`) when it starts, and at the same moment marks as Crashed every other
Running run of the flow whose owner process no longer exists on this host.
The start time in the tag guards against a recycled pid. A Running run without
an owner tag (it died before tagging itself) counts as crashed once it is older
than UNTAGGED_GRACE_S, so a run that is just starting is never touched.

Finished stages are not redone on the next run: each stage is a DVC stage, and
DVC skips those whose deps, params and outs are unchanged; an interrupted
`meta_train` resumes from its checkpoints.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from prefect import task

from metatransfer.ownership import alive, identity

OWNER_PREFIX = "owner:"
UNTAGGED_GRACE_S = 600.0

log = logging.getLogger(__name__)


def owner_tag(pid: int | None = None) -> str:
    """`owner:<host>:<pid>:<process start time>` of this (or the given) process."""
    host, pid, started = identity(pid)
    return f"{OWNER_PREFIX}{host}:{pid}:{started:.3f}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process named by an owner tag still runs.

    Returns:
        True/False for a process of this host; None for another host's (unknown).
    """
    host, pid, started = tag[len(OWNER_PREFIX):].rsplit(":", 2)
    try:
        return alive(host, int(pid), float(started))
    except ValueError:
        return False


def crashed(run: Any, now: dt.datetime | None = None) -> bool:
    """Whether a Running flow run's owner is gone (see the module doc)."""
    tags = [t for t in (run.tags or []) if t.startswith(OWNER_PREFIX)]
    if tags:
        return owner_alive(tags[0]) is False
    now = now or dt.datetime.now(dt.timezone.utc)
    start = run.start_time or run.created
    return start is not None and (now - start).total_seconds() > UNTAGGED_GRACE_S


def mark_crashed_flow_runs(client: Any, flow_name: str, current_flow_run_id: Any = None) -> list[str]:
    """Set every Running run of `flow_name` whose owner process is gone to Crashed.

    Args:
        client: a synchronous Prefect client (`get_client(sync_client=True)`).
        flow_name: the flow's name (e.g. "pipeline").
        current_flow_run_id: the caller's own run, never touched.

    Returns:
        The ids of the runs marked Crashed.
    """
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
    )
    marked = []
    for run in runs:
        if str(run.id) == str(current_flow_run_id) or not crashed(run):
            continue
        client.set_flow_run_state(
            run.id, Crashed(message="The process running this flow run is gone (killed or lost); "
                                    "marked Crashed by the next pipeline run."), force=True,
        )
        log.warning("flow run %s (%s) was left Running by a dead process: marked Crashed", run.name, run.id)
        marked.append(str(run.id))
    return marked


@task(name="recover_crashed_runs", retries=2, retry_delay_seconds=5)
def recover_crashed_runs(flow_name: str = "pipeline") -> list[str]:
    """Tag this flow run with its owner process, then mark dead `flow_name` runs Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        current = flow_run.id
        if current:
            client.update_flow_run(current, tags=sorted({*(flow_run.tags or []), owner_tag()}))
        return mark_crashed_flow_runs(client, flow_name, current)
