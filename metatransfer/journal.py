"""The journal of model-registry changes a run makes, and their undo.

Every alias move and registered-model tag edit is written to the MLflow run
that makes it (run tag `registry_changes`, a JSON list, oldest first) with the
value before, just before it is made (`record_registry_change`). A run that
fails, or is found RUNNING after its process was killed, has those changes
undone (`revert_changes`), so an alias never rests on a version whose run did
not finish.

Both `metatransfer.tracking` (which ends and reaps runs) and
`metatransfer.registry` (which makes the changes) use this module; it imports
neither, which keeps the two free of an import cycle.
"""

from __future__ import annotations

import json
import logging
from typing import Any

CHANGES_TAG = "registry_changes"  # JSON list of the registry changes a run made, oldest first
# MLflow error codes of "no such registered model / version / alias" (they differ by store).
_MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")

log = logging.getLogger(__name__)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The ModelVersion behind `name@alias`, or None when the model or alias does not exist.

    Args:
        client: an `mlflow.tracking.MlflowClient`.
        name: the registered model.
        alias: e.g. "champion".
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (*_MISSING_CODES, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def model_exists(client: Any, name: str) -> bool:
    """Whether the registered model `name` exists."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code in _MISSING_CODES:
            return False
        raise


def alias_target(client: Any, name: str, alias: str) -> str | None:
    """The version number `name@alias` points at, or None."""
    mv = alias_version(client, name, alias)
    return str(mv.version) if mv is not None else None


def model_tag(client: Any, name: str, key: str) -> str | None:
    """A registered-model tag's value, or None (no such tag or model)."""
    return (client.get_registered_model(name).tags or {}).get(key) if model_exists(client, name) else None


def registry_changes(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The registry changes journaled in a run's tags, oldest first ([] when none)."""
    try:
        changes = json.loads(tags.get(CHANGES_TAG) or "[]")
    except json.JSONDecodeError:
        return []
    return changes if isinstance(changes, list) else []


def record_registry_change(change: dict[str, Any]) -> None:
    """Journal a registry change on the active run (tag `registry_changes`) before it is made.

    Outside a run nothing is journaled.

    Args:
        change: {"name": registered model, "alias" or "tag": what changes, "from": the value
            before (None: unset), "to": the new value (None: removed)}.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    run = mlflow.active_run()
    if run is None:
        return
    client = MlflowClient()
    changes = registry_changes(client.get_run(run.info.run_id).data.tags)
    client.set_tag(run.info.run_id, CHANGES_TAG, json.dumps([*changes, change], sort_keys=True))


def revert_changes(client: Any, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Undo journaled registry changes, newest first.

    A change is undone only where the alias or tag still holds the value the run
    set: a later change by someone else is never overwritten.

    Returns:
        The changes undone.
    """
    from mlflow.exceptions import MlflowException

    undone = []
    for change in reversed(changes):
        name, before, after = change.get("name"), change.get("from"), change.get("to")
        try:
            if "alias" in change:
                alias = change["alias"]
                if alias_target(client, name, alias) != after:
                    continue
                if before is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, before)
            elif "tag" in change:
                if model_tag(client, name, change["tag"]) != after:
                    continue
                if before is None:
                    client.delete_registered_model_tag(name, change["tag"])
                else:
                    client.set_registered_model_tag(name, change["tag"], before)
            else:
                continue
        except MlflowException as exc:  # e.g. the earlier version was deleted since
            log.warning("%s: could not undo %s: %s", name, change, exc)
            continue
        log.warning("%s: undid %s %s -> %s (its run did not finish)", name,
                    f"alias {change['alias']!r}" if "alias" in change else f"tag {change['tag']!r}", before, after)
        undone.append(change)
    return undone
