"""Prefect task around the model registry: the promotion gate after a pipeline run.

Retries only on registry I/O (the MLflow store or server failing
transiently, e.g. "database is locked"); a user error (no baseline model,
bad gate settings) fails at once, and the gate's own evaluation is
deterministic, so a retry repeats it exactly.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from metatransfer import registry
from metatransfer.errors import MetatransferError


def _registry_io_failed(task: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the failure is an error meant for people (MetatransferError)."""
    try:
        state.result()
    except MetatransferError:
        return False
    except Exception:  # noqa: BLE001  (MLflow/SQLAlchemy/OS errors: registry I/O)
        return True
    return False


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=_registry_io_failed)
def promote(root: str, parent_run_id: str | None = None, targets: list[str] | None = None) -> list[dict[str, Any]]:
    """Gate each target's challenger against its champion (or the baseline); move `champion` if it passes.

    A target whose challenger is already champion, or that has none (finetune
    did not run), is reported, not failed; a challenger that is the baseline
    method itself is judged against the next-best method (`registry.promote`).
    An unlabelled target without test labels answers `needs_review`: the champion
    stays until a person decides (docs/registry.md, "Unlabelled targets").
    Never forced: a promotion without the gate is a person's `metatransfer
    promote --force --reason`. The decision runs are children of
    `parent_run_id` (the pipeline's MLflow run).

    Returns:
        One dict per target: decision, reason, versions, gain and its interval.
    """
    return [r.to_dict() for r in registry.promote_targets(root, targets, missing_ok=True, parent_run_id=parent_run_id)]
