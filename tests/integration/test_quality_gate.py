"""The quality gate in the real `finetune` stage: a starved target model (0 fine-tuning steps from
a random initialisation, one labelled image per class, on the imbalanced BreastMNIST validation
split) is refused at registration with one clear line, recorded for the report, and promotion
cannot pick it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metatransfer import registry
from tests.integration.conftest import project_env

pytestmark = pytest.mark.slow
TARGET = "breastmnist"


def _versions(project: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    try:
        return sorted(str(v.version) for v in client.search_model_versions(f"name='{registry.model_name(TARGET)}'"))
    except Exception:  # noqa: BLE001  (no registered model yet)
        return []


def test_a_starved_target_model_is_refused_at_registration(dvc_project: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(dvc_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"].update(targets=[TARGET], methods=["scratch"], steps=0, shots_per_class=1, val_per_class=0)
    params["promote"].update(quality_gate=True, baseline="scratch")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = _versions(project)

    proc = subprocess.run([sys.executable, "-m", "metatransfer.stages.finetune"], cwd=project,
                          env=project_env(project), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]  # refusing is not a failure: the pipeline goes on
    lines = [ln for ln in out.splitlines() if "quality gate: target model scratch NOT registered as challenger" in ln]
    assert len(lines) == 1, out[-3000:]
    assert "vs chance" in lines[0] and "(majority-class rate): one-sided binomial p = " in lines[0]

    sel = json.loads((project / "models" / "target" / TARGET / "selection.json").read_text())
    gate = sel["methods"]["scratch"]["quality_gate"]
    assert gate["passed"] is False and gate["test"] == "binomial" and gate["chance"] > 0.5  # the majority rate
    facts = json.loads((project / "reports" / "run_facts.json").read_text())["finetune"][TARGET]
    assert facts["refused"] == gate["reason"] and facts["model_uri"] is None
    assert _versions(project) == before  # nothing registered

    # Promotion never sees it: the challenger alias (if any) is still an earlier, gated version.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    if before:
        chall = client.get_model_version_by_alias(registry.model_name(TARGET), registry.CHALLENGER)
        assert str(chall.version) in before
