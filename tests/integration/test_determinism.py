"""Reproducible by default: the same commit and params give the same bytes.

`dvc repro -f` twice on the shrunk pipeline must leave byte-identical DVC
outputs (models, metrics, episodes, plots) and an unchanged dvc.lock; the
Prefect flow must leave the same outputs as `dvc repro`. Run-specific facts
(wall seconds, MLflow run ids, model URIs, registered versions) live in MLflow
and reports/run_facts.json, which is not a DVC output.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import make_project, project_env

pytestmark = pytest.mark.slow

# Every DVC output the pipeline writes (outs, metrics, plots), as folders or files.
OUTPUTS = ("models", "metrics", "data/episodes", "plots", "reports/evaluate.md")


def snapshot(project: Path) -> dict[str, str]:
    """SHA-256 of every file under the DVC outputs (relative path -> digest)."""
    out: dict[str, str] = {}
    for rel in OUTPUTS:
        base = project / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(project).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def lock_outs(project: Path) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} from dvc.lock."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in st.get("outs", [])} for name, st in stages.items()}


def _run(cmd: list[str], project: Path) -> str:
    proc = subprocess.run(cmd, cwd=project, env=project_env(project), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, dict, dict, bytes, bytes, str]:
    """A scratch project after `dvc repro` and again after `dvc repro -f` (snapshots of both)."""
    project = make_project(tmp_path_factory.mktemp("determinism"), mirror)
    _run([sys.executable, "-m", "dvc", "repro"], project)
    first, lock1 = snapshot(project), (project / "dvc.lock").read_bytes()
    log = _run([sys.executable, "-m", "dvc", "repro", "-f"], project)
    return project, first, snapshot(project), lock1, (project / "dvc.lock").read_bytes(), log


def test_repro_forced_twice_gives_byte_identical_outputs(twice) -> None:
    project, first, second, lock1, lock2, log = twice
    assert "Running stage 'meta_train'" in log and "Running stage 'evaluate'" in log  # -f really re-ran
    # Every kind of output is covered, including the PNG plots and the episode files.
    for prefix in ("models/meta/", "models/target/", "metrics/meta_train.json", "metrics/finetune.json",
                   "metrics/evaluate.json", "data/episodes/", "plots/meta_train/", "plots/evaluate/"):
        assert any(k.startswith(prefix) for k in first), prefix
    assert sorted(first) == sorted(second)
    changed = [k for k in first if first[k] != second[k]]
    assert changed == [], f"outputs that differ between two forced runs: {changed}"
    assert lock1 == lock2  # dvc.lock does not churn


def test_dvc_outputs_hold_no_run_specific_facts(twice) -> None:
    project = twice[0]
    meta = json.loads((project / "metrics" / "meta_train.json").read_text())
    for algo, rec in meta.items():
        assert not {"seconds", "model_uri"} & set(rec), algo
        # The quick profile records the gate's verdict with the gate switched off.
        assert rec["budget_hit"] == "none" and rec["quality_gate"]["test"] == "off"
        assert "quality gate off" in rec["quality_gate"]["reason"], rec
    for curve in (project / "plots" / "meta_train").glob("*.json"):
        assert all(set(row) == {"step", "acc"} for row in json.loads(curve.read_text())), curve
    for sel in (project / "models" / "target").glob("*/selection.json"):
        assert not {"model_uri", "registered"} & set(json.loads(sel.read_text())), sel
    # ... they are in reports/run_facts.json (and MLflow) instead, for the report.
    facts = json.loads((project / "reports" / "run_facts.json").read_text())
    assert facts["meta_train"]["run_id"] and "seconds" in facts["meta_train"]["algorithms"]["protonet"]
    target = yaml.safe_load((project / "params.yaml").read_text())["finetune"]["targets"][0]
    assert facts["finetune"]["run_id"] and "model_uri" in facts["finetune"][target]


def test_every_stage_run_carries_the_runtime_tags(twice) -> None:
    from mlflow.tracking import MlflowClient

    project = twice[0]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metatransfer")
    runs = client.search_runs([exp.experiment_id], "tags.stage != 'pipeline'", max_results=1000)
    stage_runs = [r for r in runs if r.info.run_name in ("meta_train", "finetune", "evaluate")]
    assert len(stage_runs) == 6  # three stages, two runs each
    for r in stage_runs:
        t = r.data.tags
        assert t["runtime.device"] == "cpu" and t["runtime.torch_version"]
        assert int(t["runtime.threads"]) >= 1 and t["runtime.cpu_model"]
        assert float(t["runtime.load_1min_at_start"]) >= 0
    children = [r for r in runs if r.info.run_name.startswith("meta_train/")]
    assert children and all(r.data.tags["budget_hit"] == "none" for r in children)


def test_prefect_flow_gives_the_same_outputs_as_dvc_repro(twice, prefect_project: Path) -> None:
    project, _first, second, *_ = twice
    flow = snapshot(prefect_project)
    assert sorted(flow) == sorted(second)
    changed = [k for k in flow if flow[k] != second[k]]
    assert changed == [], f"outputs that differ between the flow and dvc repro: {changed}"
    assert lock_outs(prefect_project) == lock_outs(project)
