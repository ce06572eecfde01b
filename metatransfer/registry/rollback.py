"""Rollback of `champion` to the previous champion, and the registry's status per target.

Champion history is the registered-model tag `champion_history` (comma-separated
versions, oldest first); `rollback` moves `champion` back to the previous entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from metatransfer import tracking
from metatransfer.registry.client import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    LEARNER_TAG,
    alias_version,
    champion_history,
    client_for,
    learner_name,
    model_exists,
    model_name,
    move_alias,
    move_champion,
    set_history,
)
from metatransfer.registry.gate import RegistryError
from metatransfer.registry.record import RollbackResult, now, project_params, record_decision

log = logging.getLogger(__name__)


def rollback(root: str | Path, target: str) -> RollbackResult:
    """Move `champion` of `target` back to the previous champion.

    The rolled-back version is tagged `rolled_back=true`; if it still holds
    `challenger`, that alias is removed so the next `promote` does not
    re-promote it. The learner's `champion` follows. Logged as a run `rollback`.

    Raises:
        RegistryError: no champion, no previous champion, or the alias and history disagree.
    """
    import mlflow

    root = Path(root).resolve()
    client = client_for(root)
    name = model_name(target)
    if not model_exists(client, name):
        raise RegistryError(f"{name}: not registered in {tracking.tracking_uri(root)}; nothing to roll back")
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name}: has no '{CHAMPION}' alias; nothing to roll back")
    current = str(champion.version)
    history = champion_history(client, name)
    if not history or history[-1] != current:
        raise RegistryError(
            f"{name}: '{CHAMPION}' is version {current} but the {HISTORY_TAG} tag is {history or 'empty'}; "
            "the alias was moved outside `metatransfer promote`. Set the alias back or fix the tag "
            f"(MlflowClient().set_registered_model_tag({name!r}, {HISTORY_TAG!r}, '...'))")
    if len(history) < 2:
        raise RegistryError(
            f"{name}: version {current} is the first champion; there is no previous champion to roll back to. "
            f"To withdraw it, delete the alias (MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r}))")
    previous = history[-2]
    prev_mv = client.get_model_version(name, previous)
    # Inside the run, journaled: a rollback killed half-way is undone by the reaper.
    with tracking.stage_run("rollback", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "from_version": current, "to_version": previous})
        run_id = run.info.run_id
        move_champion(client, target, previous, prev_mv.tags.get(LEARNER_TAG))
        set_history(client, name, history[:-1])
        chall = alias_version(client, name, CHALLENGER)
        if chall is not None and str(chall.version) == current:
            move_alias(client, name, CHALLENGER, None)
    client.set_model_version_tag(name, current, "rolled_back", "true")
    log.info("%s: champion rolled back from v%s to v%s", name, current, previous)
    result = RollbackResult(target, name, current, previous, history[:-1], run_id)
    record_decision(root, target, {"decision": "rolled_back", "name": name, "champion_before": current,
                                   "champion_after": previous, "run_id": run_id, "time": now()})
    return result


def registry_status(root: str | Path, targets: list[str] | None = None) -> dict[str, Any]:
    """Aliases, champion history and versions of every target's registered models.

    Returns:
        {target: {name: {"aliases": {alias: version}, "history": [...],
                         "versions": [{"version", "method", "aliases", "gate_decision", "rolled_back", "created"}]}}}
    """
    root = Path(root).resolve()
    if targets is None:
        params = project_params(root)
        targets = list(params.finetune.targets) if params.finetune else []
    client = client_for(root)
    out: dict[str, Any] = {}
    for target in targets:
        out[target] = {}
        for name in (model_name(target), learner_name(target)):
            if not model_exists(client, name):
                out[target][name] = None
                continue
            rm = client.get_registered_model(name)
            aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
            versions = []
            for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
                versions.append({
                    "version": str(mv.version), "method": mv.tags.get("method", ""),
                    "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                    "gate_decision": mv.tags.get("gate_decision", ""), "rolled_back": mv.tags.get("rolled_back", "") == "true",
                    "created": int(mv.creation_timestamp or 0),
                })
            out[target][name] = {"aliases": aliases, "history": champion_history(client, name), "versions": versions}
    return out
