"""The MLflow model registry of the project: names, aliases, tags, versions, champion history.

Every alias move and champion-history edit is journaled on the MLflow run that
makes it, with the value before, just before it is made (`move_alias`,
`set_model_tag`; see `metatransfer.journal`). `register_version` moves its
alias only as the last step of the stage run (`tracking.at_run_end`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metatransfer import provenance, tracking
from metatransfer.journal import (  # noqa: F401  (re-exported: part of the registry client)
    alias_target,
    alias_version,
    model_exists,
    model_tag,
    record_registry_change,
    revert_changes,
)
from metatransfer.registry.gate import RegistryError

PREFIX = "metatransfer"
CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
LEARNER_TAG = "learner_version"  # on a target-model version: its learner's version


class NoChallengerError(RegistryError):
    """A target has no version with the alias `challenger` (its `finetune` registered none)."""


def model_name(target: str) -> str:
    """Registered-model name of a target's shipped model: `metatransfer-<target>`."""
    return f"{PREFIX}-{target}"


def learner_name(target: str) -> str:
    """Registered-model name of a target's few-shot learner: `metatransfer-<target>-learner`."""
    return f"{PREFIX}-{target}-learner"


def provenance_tags(root: str | Path) -> dict[str, str]:
    """Tags every registered version carries: data version (DVC md5 of the prepared store), git commit,
    params digest (`provenance.identify`)."""
    return provenance.identify(root).version_tags()


def client_for(root: str | Path) -> Any:
    """An MlflowClient on the project store (and the global URI set, for pyfunc loading)."""
    from mlflow.tracking import MlflowClient

    tracking.configure(root)
    return MlflowClient(tracking.tracking_uri(root))


def require_challenger(client: Any, name: str, root: str | Path) -> Any:
    """The ModelVersion behind `name@challenger`.

    Raises:
        NoChallengerError: there is none; the message says how to get one.
    """
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise NoChallengerError(
            f"{name}: no version with alias '{CHALLENGER}' in {tracking.tracking_uri(root)}; "
            "run the pipeline (`dvc repro` or the `pipeline` flow) so `finetune` registers one")
    return challenger


def champion_history(client: Any, name: str) -> list[str]:
    """Versions that were champion, oldest first (the `champion_history` tag)."""
    tags = client.get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def set_history(client: Any, name: str, history: list[str]) -> None:
    """Replace the champion history of `name` (journaled)."""
    set_model_tag(client, name, HISTORY_TAG, ",".join(history))


def move_alias(client: Any, name: str, alias: str, version: str | None) -> None:
    """Point `name@alias` at `version` (None: remove the alias), journaled on the active run first."""
    before = alias_target(client, name, alias)
    record_registry_change({"name": name, "alias": alias, "from": before,
                            "to": None if version is None else str(version)})
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))


def set_model_tag(client: Any, name: str, key: str, value: str) -> None:
    """Set a registered-model tag, journaled on the active run first."""
    record_registry_change({"name": name, "tag": key, "from": model_tag(client, name, key), "to": value})
    client.set_registered_model_tag(name, key, value)


def move_champion(client: Any, target: str, version: str, learner_version: str | None) -> None:
    """Point `champion` at `version` (and the learner registered with it, if any); journaled."""
    move_alias(client, model_name(target), CHAMPION, version)
    if learner_version and model_exists(client, learner_name(target)):
        move_alias(client, learner_name(target), CHAMPION, learner_version)


def register_version(client: Any, model_uri: str, name: str, tags: dict[str, str], description: str,
                     alias: str | None = CHALLENGER) -> str:
    """Register `model_uri` as a new version of `name` with tags, description and an alias.

    Inside a stage run the alias moves only as the run's last step
    (`tracking.at_run_end`): a run killed or failing before that leaves the alias
    where it was.

    Returns:
        The new version number (as a string).
    """
    import mlflow

    if not model_exists(client, name):
        client.create_registered_model(name, description=f"{name}: see docs/registry.md (aliases champion / challenger)")
    mv = mlflow.register_model(model_uri, name, tags={k: str(v)[:5000] for k, v in tags.items()})
    client.update_model_version(name, mv.version, description=description)
    if alias:
        tracking.at_run_end(lambda: move_alias(client, name, alias, str(mv.version)))
    return str(mv.version)
