"""The two non-default transfer settings of issue 15, each as its documented params file
(scenarios/heterogeneous.yaml, scenarios/unsupervised.yaml), shrunk by `quick_params`, run both
ways: `dvc repro` in one copy, the Prefect `pipeline` flow in another. Both ways must leave the
same DVC state and byte-identical models and metrics, and the report must show the scenario's
results. (The homogeneous setting, params.yaml, is tests/integration/test_pipeline.py.)

The unsupervised run also carries the checks of a target without labels (issue 15 item 3): the
cluster models are saved as target models, selection.json says no label was used,
metrics/evaluate.json scores them against the hidden test labels, and both reports say so."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from metatransfer.config import load_params
from metatransfer.data.store import load_split
from metatransfer.evaluation.clustering import clustering_scores
from metatransfer.pixels import to_float
from metatransfer.report import build_report, fmt_acc_ci
from metatransfer.training.finetune import load_target_model
from tests import quick
from tests.integration.conftest import ROOT, slice_mirror
from tests.integration.test_pipeline import STAGES, _dvc
from tests.quick import project_env, quick_params

pytestmark = pytest.mark.slow


def _run(dest: Path, args: list[str], log: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=dest, env=project_env(dest), capture_output=True, text=True)
    (dest / log).write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(args)} failed in {dest}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


def _both_ways(tmp: pytest.TempPathFactory, name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Two copies of one shrunk scenario project: after `dvc repro`, and after the Prefect flow."""
    repro = quick.make_project(tmp.mktemp(f"{name}_repro"), params, ROOT)
    _run(repro, ["-m", "dvc", "repro"], "repro.log")
    flow = quick.make_project(tmp.mktemp(f"{name}_flow"), params, ROOT)
    _run(flow, ["-m", "flows.pipeline"], "flow.log")
    return repro, flow


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_state(repro: Path, flow: Path) -> None:
    """The flow-vs-repro invariant of test_pipeline: clean status, the same dvc.lock outs stage by
    stage, and (checked directly) the same bytes in every file under models/ and metrics/."""
    assert _dvc(flow, "status", "--json").stdout.strip() in ("{}", "")
    assert _dvc(repro, "status", "--json").stdout.strip() in ("{}", "")
    lock_r = yaml.safe_load((repro / "dvc.lock").read_text())["stages"]
    lock_f = yaml.safe_load((flow / "dvc.lock").read_text())["stages"]
    assert set(lock_r) == set(lock_f) == set(STAGES)
    for stage in STAGES:
        assert lock_f[stage]["outs"] and lock_f[stage]["outs"] == lock_r[stage]["outs"], stage
    for folder in ("models", "metrics"):
        digests = _file_digests(repro / folder)
        assert digests and _file_digests(flow / folder) == digests, folder


def _pages(repro: Path, flow: Path) -> list[str]:
    """The report of each copy, rebuilt by `build_report` (what `metatransfer report` runs)."""
    return [build_report(p, load_params(p / "params.yaml")).read_text() for p in (repro, flow)]


@pytest.fixture(scope="module")
def heterogeneous(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, Path]:
    """scenarios/heterogeneous.yaml shrunk to Omniglot (grey) -> RetinaMNIST (kept RGB), both ways."""
    params = quick_params(yaml.safe_load((ROOT / "scenarios" / "heterogeneous.yaml").read_text()), slice_mirror(mirror))
    assert params["prepare"]["per_dataset"] == {"retinamnist": {"channels": 3}} and params["prepare"]["channels"] == 1
    params["fetch"]["datasets"] = ["omniglot", "retinamnist"]
    params["episodes"]["sets"] = {k: s for k, s in params["episodes"]["sets"].items() if s["dataset"] != "breastmnist"}
    params["finetune"]["targets"] = ["retinamnist"]
    return _both_ways(tmp_path_factory, "heterogeneous", params)


@pytest.fixture(scope="module")
def unsupervised(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, Path]:
    """scenarios/unsupervised.yaml shrunk to mini-ImageNet -> BreastMNIST without labels, both ways."""
    params = quick_params(yaml.safe_load((ROOT / "scenarios" / "unsupervised.yaml").read_text()), slice_mirror(mirror))
    params["fetch"]["datasets"] = ["mini_imagenet", "breastmnist"]
    params["episodes"]["sets"] = {k: s for k, s in params["episodes"]["sets"].items() if s["dataset"] == "mini_imagenet"}
    params["finetune"]["targets"] = ["breastmnist"]
    params["finetune"]["unlabeled"]["breastmnist"].update(k_max=3, self_training_steps=3)
    return _both_ways(tmp_path_factory, "unsupervised", params)


def test_heterogeneous_scenario_both_ways(heterogeneous: tuple[Path, Path]) -> None:
    repro, flow = heterogeneous
    _assert_same_state(repro, flow)
    prepared = repro / "data" / "prepared"
    assert load_split(prepared, "omniglot", "meta_test").images.shape[1:] == (1, 28, 28)
    assert load_split(prepared, "retinamnist", "test").images.shape[1:] == (3, 28, 28)
    sel = json.loads((repro / "models" / "target" / "retinamnist" / "selection.json").read_text())
    for method in sel["methods"]:
        config = json.loads((repro / "models" / "target" / "retinamnist" / method / "config.json").read_text())
        assert config["input"] == {"channels": 3, "image_size": 28}, method  # the target's own shape, not the source's
    metrics = json.loads((repro / "metrics" / "evaluate.json").read_text())
    chosen = metrics["target_models"]["retinamnist"]["chosen"]
    assert chosen == sel["chosen"]
    for page in _pages(repro, flow):
        card = page.split('<h3 id="target-retinamnist">', 1)[1].split('<div class="card">', 1)[0]
        assert card.startswith('retinamnist: <span class="chosen-name">' + chosen)
        for r in metrics["target_models"]["retinamnist"]["methods"].values():  # each method's RGB test accuracy
            assert f"<td>{fmt_acc_ci(r['test_acc'], r['test_acc_ci95'], r['images'])}</td>" in card


def test_unsupervised_scenario_both_ways(unsupervised: tuple[Path, Path]) -> None:
    repro, flow = unsupervised
    _assert_same_state(repro, flow)
    scores = json.loads((repro / "metrics" / "evaluate.json").read_text())["unlabeled_targets"]["breastmnist"]
    sel = json.loads((repro / "models" / "target" / "breastmnist" / "selection.json").read_text())
    assert sel["unlabeled"]["labels_used"] == 0 and scores["k"] == sel["unlabeled"]["k"]
    sentence = (f"No labels were used for training; k={scores['k']}, clustering in the {sel['chosen']} embedding; "
                "scored against hidden labels")
    for page in _pages(repro, flow):
        assert sentence in page
        for r in scores["methods"].values():  # every method's NMI and ARI, as the card prints them
            assert f"<td>{r['nmi']:.3f}</td>" in page and f"<td>{r['ari']:.3f}</td>" in page


def test_unlabelled_target_is_clustered_and_scored_against_hidden_labels(unsupervised: tuple[Path, Path]) -> None:
    project = unsupervised[0]  # the flow's copy holds the same bytes (test above)
    target = project / "models" / "target" / "breastmnist"
    selection = json.loads((target / "selection.json").read_text())
    info = selection["unlabeled"]
    assert selection["chosen"] == "protonet" and info["labels_used"] == 0 and info["registered"] is True
    assert set(selection["methods"]) == {"protonet", "fomaml", "pretrain", "scratch"}
    k = info["k"]
    n_train = len(load_split(project / "data" / "prepared", "breastmnist", "train").labels)
    assert 2 <= k <= 3 and info["images"] == n_train > 500  # BreastMNIST's train split, whole
    for method, fit in selection["methods"].items():
        assert sum(fit["cluster_sizes"]) == n_train and sorted(fit["silhouettes"]) == ["2", "3"]
        assert fit["self_training_steps"] in (0, 3)
        model = load_target_model(target / method, fit["weights_sha256"])
        assert model.class_names == [f"cluster_{i}" for i in range(fit["k"])]
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    scores = metrics["unlabeled_targets"]["breastmnist"]
    assert scores["k"] == k and len(scores["class_names"]) == 2
    test = load_split(project / "data" / "prepared", "breastmnist", "test")
    for method in ("protonet", "scratch", "pretrain"):
        r = scores["methods"][method]
        assert r["images"] == len(test.labels) > 100 and 0.0 <= r["nmi"] <= 1.0 and -0.5 <= r["ari"] <= 1.0  # the whole test split
        # the same numbers from the saved model and the hidden labels, recomputed here
        model = load_target_model(target / method)
        with torch.no_grad():
            pred = model(to_float(np.array(test.images))).argmax(1).numpy()
        keys = ("nmi", "ari", "matched_acc", "majority_rate")
        assert {key: r[key] for key in keys} == {key: clustering_scores(test.labels, pred)[key] for key in keys}
    assert "breastmnist" not in metrics["target_models"]
    sentence = f"No labels were used for training; k={k}, clustering in the protonet embedding; scored against hidden labels"
    # The reports the pipeline itself wrote (the test above rebuilds the page with build_report).
    assert sentence in (project / "reports" / "evaluate.md").read_text()
    assert sentence in (project / "reports" / "index.html").read_text()


def test_unlabelled_cluster_model_is_registered_and_the_flow_gates_it_on_hidden_labels(
        unsupervised: tuple[Path, Path]) -> None:
    """Both ways registered the shipped cluster model as challenger with the scores `evaluate` wrote; the
    flow's `promote` judged it on cross-fitted matched accuracy against the scratch clustering
    (docs/registry.md "Unlabelled targets")."""
    from mlflow.tracking import MlflowClient

    from metatransfer import registry

    scores = json.loads((unsupervised[0] / "metrics" / "evaluate.json").read_text())["unlabeled_targets"]
    expected = {k: f"{scores['breastmnist']['methods']['protonet'][k]:.6f}" for k in ("nmi", "ari", "matched_acc")}
    for project in unsupervised:
        mv = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version_by_alias(
            registry.model_name("breastmnist"), "challenger")
        assert (mv.tags["kind"], mv.tags["labels_used"], mv.tags["method"]) == ("cluster_model", "0", "protonet")
        assert {k: mv.tags[k] for k in expected} == expected
    record = json.loads((unsupervised[1] / "reports" / "promotion.json").read_text())["breastmnist"]
    assert record["reference"] == "baseline scratch" and record["reason"].startswith("matched accuracy")
    passed = record["gain_mean"] >= record["margin"] and record["gain_ci_low"] > 0
    assert record["decision"] == ("promoted" if passed else "rejected")
