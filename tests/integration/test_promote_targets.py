"""`promote_targets` tells "no challenger" from every other registry error by its type.

Real components: the tiny project (tests/tiny_project.py: sqlite MLflow store, a
registered target model whose version 1 is `champion`, no `challenger`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metatransfer import registry
from metatransfer.registry import GateSettings, NoChallengerError, RegistryError
from tests.tiny_project import TARGET, make_tiny_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    dest = tmp_path_factory.mktemp("promote_targets") / "project"
    make_tiny_project(dest)
    yield dest
    mp.undo()


def test_a_target_without_challenger_is_reported_when_missing_is_ok(project: Path) -> None:
    (result,) = registry.promote_targets(project, [TARGET], missing_ok=True)
    assert (result.target, result.name, result.decision) == (TARGET, registry.model_name(TARGET), "no_challenger")
    assert result.reason.startswith(f"{registry.model_name(TARGET)}: no version with alias 'challenger' in ")
    assert result.challenger is None and result.champion_after is None


def test_without_missing_ok_no_challenger_is_an_error_of_its_own_type(project: Path) -> None:
    with pytest.raises(NoChallengerError, match=r"run the pipeline \(`dvc repro` or the `pipeline` flow\)") as info:
        registry.promote_targets(project, [TARGET])
    assert isinstance(info.value, RegistryError)


def test_missing_ok_does_not_hide_other_registry_errors(project: Path) -> None:
    """A bad gate setting is a RegistryError too, but not "no challenger": it is raised."""
    with pytest.raises(RegistryError, match=r"promote\.n_folds: must be >= 2") as info:
        registry.promote_targets(project, [TARGET], GateSettings(n_folds=1), missing_ok=True)
    assert not isinstance(info.value, NoChallengerError)
