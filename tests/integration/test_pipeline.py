"""The shrunk pipeline end to end, both ways (`dvc repro` and the Prefect flow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.integration.conftest import project_env

pytestmark = pytest.mark.slow

STAGES = ["check_params", "fetch", "prepare", "episodes", "pretrain", "meta_train", "finetune", "evaluate"]


def _params(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def _mlflow_runs(project: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metatransfer")
    assert exp is not None, "no MLflow experiment 'metatransfer' in the project store"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True, check=True)


def test_dvc_repro_runs_every_stage_and_logs_to_mlflow(dvc_project: Path) -> None:
    log = (dvc_project / "repro1.log").read_text()
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    client, runs = _mlflow_runs(dvc_project)
    names = {r.info.run_name for r in runs}
    assert {"pretrain", "meta_train", "meta_train/protonet", "meta_train/fomaml", "finetune", "evaluate"} <= names
    pre = next(r for r in runs if r.info.run_name == "pretrain")
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "pretrain/loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "val/acc")] == [3, 6]
    mt = next(r for r in runs if r.info.run_name == "meta_train/protonet")
    history = client.get_metric_history(mt.info.run_id, "meta_train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # every step logged
    assert "val/acc" in mt.data.metrics
    ev = next(r for r in runs if r.info.run_name == "evaluate")
    assert ev.data.tags["git_commit"] != "" and len(ev.data.tags["dvc_lock_sha256"]) == 64
    assert ev.data.tags["data_version"] == yaml.safe_load((dvc_project / "dvc.lock").read_text())[
        "stages"]["prepare"]["outs"][0]["md5"]


def test_metrics_report_and_models_are_consistent(dvc_project: Path) -> None:
    metrics = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    params = _params(dvc_project)
    first_set = next(iter(params["episodes"]["sets"]))
    assert set(metrics["episodes"]) == set(params["episodes"]["sets"])
    assert set(metrics["episodes"][first_set]) == set(params["evaluate"]["methods"])
    row = metrics["episodes"][first_set]["protonet"]["1"]
    assert 0.0 <= row["acc_mean"] <= 1.0 and row["episodes"] == 4
    assert "diff_vs_reference" in row  # paired against the reference (scratch here)
    assert "diff_vs_reference" not in metrics["episodes"][first_set]["scratch"]["1"]
    report = (dvc_project / "reports" / "evaluate.md").read_text()
    assert f"{100 * row['acc_mean']:.2f} ± {100 * row['acc_ci95']:.2f}" in report
    pre = json.loads((dvc_project / "metrics" / "pretrain.json").read_text())
    assert pre["steps"] == params["pretrain"]["steps"] and 0.0 <= pre["best_val_acc"] <= 1.0
    for target in params["finetune"]["targets"]:
        sel = json.loads((dvc_project / "models" / "target" / target / "selection.json").read_text())
        best = max(sel["methods"], key=lambda m: sel["methods"][m]["val_acc"])
        assert sel["methods"][sel["chosen"]]["val_acc"] == sel["methods"][best]["val_acc"]


def test_target_model_loads_and_predicts(dvc_project: Path) -> None:
    from metatransfer.data.store import load_split
    from metatransfer.training.finetune import load_target_model

    model = load_target_model(dvc_project / "models" / "target" / "breastmnist" / "protonet")
    test = load_split(dvc_project / "data" / "prepared", "breastmnist", "test")
    x = torch.from_numpy(np.array(test.images[:32])).float() / 255
    logits = model(x)
    assert logits.shape == (32, 2) and torch.isfinite(logits).all()
    metrics = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    assert 0 <= metrics["target_models"]["breastmnist"]["methods"]["protonet"]["test_acc"] <= 1


def test_second_repro_runs_nothing_and_status_is_clean(dvc_project: Path) -> None:
    out = _dvc(dvc_project, "repro").stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert _dvc(dvc_project, "status", "--json").stdout.strip() in ("{}", "")


def test_finetune_param_change_does_not_rerun_meta_train(dvc_project: Path) -> None:
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["finetune"]["lr"] = params["finetune"]["lr"] * 2
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        out = _dvc(dvc_project, "repro", "--dry").stdout
        assert "Running stage 'finetune'" in out
        assert "Running stage 'meta_train'" not in out
    finally:
        params["finetune"]["lr"] = params["finetune"]["lr"] / 2
        (dvc_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_prefect_flow_leaves_the_same_state_as_dvc_repro(prefect_project: Path, dvc_project: Path) -> None:
    status = _dvc(prefect_project, "status", "--json").stdout.strip()
    assert status in ("{}", ""), status
    lock_a = yaml.safe_load((prefect_project / "dvc.lock").read_text())["stages"]
    lock_b = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
    assert set(lock_a) == set(STAGES)
    # Same data, episodes, models, metrics and plots (CPU, seeded, step budget; run-specific
    # facts are in MLflow and reports/run_facts.json, not in DVC outputs).
    for stage in STAGES:
        assert lock_a[stage]["outs"] and lock_a[stage]["outs"] == lock_b[stage]["outs"], stage
    client, runs = _mlflow_runs(prefect_project)
    # The fixture's flow made the first `pipeline` run (test_params_guard runs a refused flow later).
    parent = min((r for r in runs if r.info.run_name == "pipeline"), key=lambda r: r.info.start_time)
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"meta_train", "finetune", "evaluate"} <= children


def test_logged_mlflow_models_load_with_pyfunc_and_match_the_library(dvc_project: Path) -> None:
    import mlflow
    import pandas as pd

    from metatransfer.artifacts import load_learner
    from metatransfer.data.store import load_split
    from metatransfer.training.finetune import load_target_model

    mlflow.set_tracking_uri(f"sqlite:///{dvc_project / 'mlflow.db'}")
    target = _params(dvc_project)["finetune"]["targets"][0]
    test = load_split(dvc_project / "data" / "prepared", target, "test")
    x = (test.images[:16].astype(np.float32) / 255.0)
    n_classes = len(test.class_names)

    sel = json.loads((dvc_project / "models" / "target" / target / "selection.json").read_text())
    facts = json.loads((dvc_project / "reports" / "run_facts.json").read_text())  # MLflow URIs: not in DVC outputs
    served = mlflow.pyfunc.load_model(facts["finetune"][target]["model_uri"])
    out = served.predict(x)
    assert isinstance(out, pd.DataFrame) and list(out.columns[:2]) == ["prediction", "label"]
    lib = load_target_model(dvc_project / "models" / "target" / target / sel["chosen"])
    with torch.no_grad():
        expected = lib(torch.from_numpy(x)).argmax(1).numpy()
    assert out["prediction"].tolist() == expected.tolist()
    assert np.allclose(out[[f"prob_{i}" for i in range(n_classes)]].sum(axis=1), 1.0)
    with pytest.raises(Exception, match=r"shape"):
        served.predict(x[:, :, :10, :10])  # wrong image size: a readable schema error

    few_shot = mlflow.pyfunc.load_model(facts["meta_train"]["algorithms"]["protonet"]["model_uri"])
    sx = np.concatenate([x[test.labels[:16] == c][:1] for c in np.unique(test.labels[:16])])
    sy = np.arange(len(sx), dtype=np.int64)
    out = few_shot.predict({"support_x": sx, "support_y": sy, "query_x": x})
    learner = load_learner(dvc_project / "models" / "meta" / "protonet")
    with torch.no_grad():
        ref = learner.adapt(torch.from_numpy(sx), torch.from_numpy(sy), len(sx))(torch.from_numpy(x)).argmax(1)
    assert out["prediction"].tolist() == ref.tolist()
    # Each support image is its own class's nearest prototype.
    out_s = few_shot.predict({"support_x": sx, "support_y": sy, "query_x": sx})
    assert out_s["prediction"].tolist() == sy.tolist()


def test_characters_scenario_runs_end_to_end(tmp_path: Path, mirror: Path) -> None:
    """The second scenario (Omniglot -> MedMNIST, 28 px grey) through the same stages."""
    from tests.integration.conftest import ROOT, make_project

    project = make_project(tmp_path / "characters", mirror, ROOT / "scenarios" / "characters.yaml")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=project_env(project),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(metrics["episodes"]) == {"omniglot_test", "retinamnist_test", "breastmnist_test"}
    assert metrics["episodes"]["omniglot_test"]["protonet"]["1"]["episodes"] == 4
    from metatransfer.data.store import load_split

    assert load_split(project / "data" / "prepared", "omniglot", "meta_test").images.shape[1:] == (1, 28, 28)
    assert _dvc(project, "status", "--json").stdout.strip() in ("{}", "")
