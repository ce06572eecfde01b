"""A target without labels through `dvc repro` (issue 15 item 3): scenarios/unsupervised.yaml shrunk to
mini-ImageNet -> BreastMNIST, BreastMNIST unlabelled. The cluster models are saved as target models,
selection.json says no label was used, metrics/evaluate.json scores them against the hidden test labels,
and both reports say so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metatransfer import quick
from metatransfer.data.store import load_split
from metatransfer.evaluation.clustering import clustering_scores
from metatransfer.pixels import to_float
from metatransfer.quick import project_env, quick_params
from metatransfer.training.finetune import load_target_model
from tests.integration.conftest import slice_mirror

ROOT = Path(__file__).resolve().parents[2]
TARGET = "breastmnist"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """The unsupervised scenario, shrunk to one source and the unlabelled target, after `dvc repro`."""
    params = quick_params(yaml.safe_load((ROOT / "scenarios" / "unsupervised.yaml").read_text()), slice_mirror(mirror))
    params["fetch"]["datasets"] = ["mini_imagenet", TARGET]
    params["episodes"]["sets"] = {k: s for k, s in params["episodes"]["sets"].items() if s["dataset"] == "mini_imagenet"}
    params["finetune"]["targets"] = [TARGET]
    params["finetune"]["unlabeled"][TARGET].update(k_max=3, self_training_steps=3)
    dest = quick.make_project(tmp_path_factory.mktemp("unsupervised"), params, ROOT)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=dest, env=project_env(dest),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return dest


@pytest.mark.slow
def test_unlabelled_target_runs_end_to_end_and_is_scored_against_hidden_labels(project: Path) -> None:
    selection = json.loads((project / "models" / "target" / TARGET / "selection.json").read_text())
    info = selection["unlabeled"]
    assert selection["chosen"] == "protonet" and info["labels_used"] == 0 and info["registered"] is False
    assert set(selection["methods"]) == {"protonet", "fomaml", "pretrain", "scratch"}
    k = info["k"]
    n_train = len(load_split(project / "data" / "prepared", TARGET, "train").labels)
    assert 2 <= k <= 3 and info["images"] == n_train > 500  # BreastMNIST's train split, whole
    for method, fit in selection["methods"].items():
        assert sum(fit["cluster_sizes"]) == n_train and sorted(fit["silhouettes"]) == ["2", "3"]
        assert fit["self_training_steps"] in (0, 3)
        model = load_target_model(project / "models" / "target" / TARGET / method, fit["weights_sha256"])
        assert model.class_names == [f"cluster_{i}" for i in range(fit["k"])]
    scores = json.loads((project / "metrics" / "evaluate.json").read_text())["unlabeled_targets"][TARGET]
    assert scores["k"] == k and len(scores["class_names"]) == 2
    test = load_split(project / "data" / "prepared", TARGET, "test")
    for method in ("protonet", "scratch", "pretrain"):
        r = scores["methods"][method]
        assert r["images"] == len(test.labels) > 100 and 0.0 <= r["nmi"] <= 1.0 and -0.5 <= r["ari"] <= 1.0  # the whole test split
        # the same numbers from the saved model and the hidden labels, recomputed here
        model = load_target_model(project / "models" / "target" / TARGET / method)
        with torch.no_grad():
            pred = model(to_float(np.array(test.images))).argmax(1).numpy()
        assert {key: r[key] for key in ("nmi", "ari", "matched_acc", "majority_rate")} == {
            key: clustering_scores(test.labels, pred)[key] for key in ("nmi", "ari", "matched_acc", "majority_rate")}
    assert TARGET not in json.loads((project / "metrics" / "evaluate.json").read_text())["target_models"]
    sentence = f"No labels were used for training; k={k}, clustering in the protonet embedding; scored against hidden labels"
    assert sentence in (project / "reports" / "evaluate.md").read_text()
    assert sentence in (project / "reports" / "index.html").read_text()
