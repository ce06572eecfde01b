"""Unlabelled targets in the registry (issue 15 items 2-3), end to end on a tiny project in seconds.

The real `finetune` stage clusters a tiny prepared target (dark and bright 1 x 16 x 16 images, a
4-channel conv4, no label read) and registers the shipped cluster model in a real MLflow sqlite store;
the test serves it in-process through `metatransfer serve`'s app, then walks the promotion rule of
docs/registry.md "Unlabelled targets": gated on cross-fitted matched accuracy against the hidden test
labels, `needs_review` without them, and only a person's `--force --reason` then.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from metatransfer import registry
from tests.unit.test_unsupervised import two_kinds_of_images, unlabeled_raw

TARGET = "cells"
NAME = registry.model_name(TARGET)


def write_store(prepared: Path, test_classes: list[str]) -> np.ndarray:
    """Train: 10 dark + 10 bright images (labels present but never read by finetune); val: 4;
    test: 10 dark + 10 bright with `test_classes` as their classes. Returns the test images, float."""
    images = (two_kinds_of_images(per=10).numpy() * 255).astype(np.uint8)
    test = (two_kinds_of_images(per=10, seed=1).numpy() * 255).astype(np.uint8)
    rows = [{"id": i, "dataset": TARGET, "split": "train", "class": f"{TARGET}/{'ab'[i // 10]}"} for i in range(20)]
    rows += [{"id": 20 + i, "dataset": TARGET, "split": "val", "class": f"{TARGET}/{'ab'[i % 2]}"} for i in range(4)]
    rows += [{"id": 24 + i, "dataset": TARGET, "split": "test", "class": c} for i, c in enumerate(test_classes)]
    (prepared / TARGET).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(prepared / TARGET / "manifest.parquet")
    np.save(prepared / TARGET / "images.npy", np.concatenate([images, images[[0, 10, 1, 11]], test]))
    return test.astype(np.float32) / 255


def post_json(app, payload: object) -> tuple[int, dict]:
    """One JSON POST to /invocations through an ASGI app, in-process (a full HTTP scope, as uvicorn gives)."""
    import asyncio

    body, sent = json.dumps(payload).encode(), []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/invocations", "raw_path": b"/invocations", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 5001)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def run_finetune(root: Path) -> dict:
    """The `finetune` stage of the project (its real entry), returning metrics/finetune.json."""
    from metatransfer.config import load_params
    from metatransfer.stages.finetune import run

    return run(load_params(root / "params.yaml"), root)


def collapsed_model(root: Path) -> Path:
    """A cluster model that puts every image in cluster_0: the reference a first champion must beat."""
    from metatransfer.models import BackboneSpec
    from metatransfer.training.finetune import TargetModel, save_target_model

    torch.manual_seed(0)
    model = TargetModel(BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4), ["cluster_0", "cluster_1"],
                        "scratch")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([1.0, 0.0]))
    folder = root / "models" / "target" / TARGET / "collapsed"
    save_target_model(model, folder)
    return folder


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    root = tmp_path / "project"
    test_x = write_store(root / "data" / "prepared", [f"{TARGET}/a"] * 10 + [f"{TARGET}/b"] * 10)
    (root / "params.yaml").write_text(yaml.safe_dump(unlabeled_raw()))
    return root, test_x


def test_cluster_model_is_registered_served_and_promoted_by_the_documented_rule(project, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking
    from metatransfer.artifacts import load_pyfunc_model
    from metatransfer.cli import main as cli
    from metatransfer.config import load_params
    from metatransfer.evaluation.clustering import clustering_scores
    from metatransfer.report import build_report
    from metatransfer.serving.server import build_app
    from metatransfer.training.finetune import load_target_model

    root, test_x = project
    summary = run_finetune(root)
    sel = json.loads((root / "models" / "target" / TARGET / "selection.json").read_text())
    assert summary[TARGET] == sel and sel["unlabeled"]["labels_used"] == 0 and sel["unlabeled"]["registered"] is True
    client = MlflowClient(tracking.tracking_uri(root))

    # Registered like a target model: challenger, provenance, label-free evidence, hidden-label scores.
    mv = client.get_model_version_by_alias(NAME, "challenger")
    facts = json.loads((root / "reports" / "run_facts.json").read_text())["finetune"]
    assert facts[TARGET]["registered"] == {"model": {"name": NAME, "version": "1"}, "learner": None}
    assert str(mv.version) == "1" and mv.tags["mlflow_run_id"] == facts["run_id"]
    model = load_target_model(root / "models" / "target" / TARGET / "scratch")
    with torch.no_grad():
        clusters = model(torch.from_numpy(test_x)).argmax(1).numpy()
    scores = clustering_scores(np.repeat([0, 1], 10), clusters)
    assert scores["matched_acc"] == 1.0  # dark vs bright: the clusters are the classes
    assert {k: mv.tags[k] for k in ("kind", "labels_used", "k", "silhouette", "method", "quality_gate", "nmi", "ari",
                                    "matched_acc", "scored_images", "class_names")} == {
        "kind": "cluster_model", "labels_used": "0", "k": "2", "silhouette": f"{sel['methods']['scratch']['silhouette']:.6f}",
        "method": "scratch", "quality_gate": "not_tested", "nmi": f"{scores['nmi']:.6f}", "ari": f"{scores['ari']:.6f}",
        "matched_acc": "1.000000", "scored_images": "20", "class_names": '["cluster_0", "cluster_1"]'}
    assert {"data_version", "git_commit", "params_sha256"} <= set(mv.tags) and "learner_version" not in mv.tags
    assert "answers a cluster id per image (`cluster_0` .. `cluster_1`), not a diagnosis" in mv.description
    assert not registry.model_exists(client, registry.learner_name(TARGET))  # a learner needs labelled supports

    # Served by `metatransfer serve`'s app: a cluster id per image, the library's.
    loaded = load_pyfunc_model(f"models:/{NAME}@challenger", root / "download")
    app, _ = build_app(loaded)
    status, answer = post_json(app, {"inputs": test_x[[0, 15]].tolist()})
    answers = answer["predictions"]
    assert status == 200 and [a["prediction"] for a in answers] == clusters[[0, 15]].tolist()
    assert [a["class_name"] for a in answers] == [f"cluster_{c}" for c in clusters[[0, 15]]]

    # Hidden labels exist: the gate runs on matched accuracy. The challenger (scratch) is the baseline
    # method itself and no other method was clustered: rejected, with the way out named.
    first = registry.promote(root, TARGET)
    assert first.decision == "rejected" and "--force" in first.reason and first.champion_after is None
    settings = registry.GateSettings(margin=0.01, confidence=0.95, n_folds=4, baseline="collapsed", seed=0)
    collapsed_model(root)
    gated = registry.promote(root, TARGET, settings)
    folds = registry.test_folds(20, 4, 0)
    expected = registry.cross_fitted_matched_accuracies(clusters, np.repeat([0, 1], 10), folds)
    assert gated.decision == "promoted" and gated.champion_after == "1" and gated.reference == "baseline collapsed"
    assert gated.evidence["score"] == "matched_accuracy_cross_fitted"
    assert gated.evidence["per_fold"]["challenger"] == expected.tolist() == [1.0] * 4
    assert gated.reason.startswith("matched accuracy (each cluster mapped to a class on the other folds' images)")
    assert gated.gain_ci_low > 0

    # The same model again (a re-run of finetune): judged against the champion, gain 0, rejected.
    run_finetune(root)
    again = registry.promote(root, TARGET, settings)
    assert (again.challenger, again.decision, again.reference, again.gain_mean) == ("2", "rejected", "champion v1", 0.0)

    # No hidden labels (every test image of one class): nothing to measure, a person decides.
    write_store(root / "data" / "prepared", [f"{TARGET}/a"] * 20)
    assert cli(["--root", str(root), "promote"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}: needs_review (challenger v2 vs none (no labels); champion now v1): version 2 is a cluster model" in out
    assert f"`metatransfer promote --target {TARGET} --force --reason" in out
    record = json.loads((root / "reports" / "promotion.json").read_text())[TARGET]
    assert (record["decision"], record["champion_after"]) == ("needs_review", "1")
    forced = registry.force_promote(root, TARGET, "clusters reviewed with 20 example images each by A. B.")
    assert (forced.decision, forced.forced, forced.champion_after) == ("promoted", True, "2")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert registry.champion_history(client, NAME) == ["1", "2"]

    # The report says what was done without labels, what the model answers, and where it stands.
    page = build_report(root, load_params(root / "params.yaml")).read_text()
    card = page.split(f'<h3 id="target-{TARGET}">', 1)[1].split("<h2", 1)[0]
    assert "No labels were used for training; k=2, clustering in the scratch embedding" in card
    assert "The model answers a cluster id per image (cluster_0 … cluster_1), not a diagnosis" in card
    assert f"registered as {NAME} v2" in card and "Clustered without labels. Promoted: champion v2. clusters reviewed" in card


def test_cross_fitted_mapping_never_scores_a_fold_with_its_own_mapping() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    # Cluster 2 appears only in fold 0 and cluster 0 only in fold 2: the other folds give them
    # no evidence, so there they stay unmapped and count as wrong (a mapping fitted on the fold itself
    # would score 1.0 everywhere). Cluster 1 is class 1 wherever it is seen.
    clusters = np.array([2, 2, 1, 1, 0, 1])
    folds = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    assert registry.cross_fitted_matched_accuracies(clusters, labels, folds).tolist() == [0.0, 1.0, 0.5]
    # A classifier's own class ids: the mapping is the identity.
    assert registry.cross_fitted_matched_accuracies(labels, labels, folds).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(registry.RegistryError, match=r"predictions \(5,\) and labels \(6,\) differ in shape"):
        registry.cross_fitted_matched_accuracies(clusters[:5], labels, folds)


def test_hidden_labels_need_a_test_split_of_two_classes(project) -> None:
    from metatransfer.config import load_params
    from metatransfer.errors import DataError
    from metatransfer.registry.unlabeled import hidden_labels

    root, test_x = project
    params = load_params(root / "params.yaml")
    images, labels, _ = hidden_labels(params, root, TARGET)
    assert labels.tolist() == [0] * 10 + [1] * 10 and np.array_equal(images, test_x)
    manifest = root / "data" / "prepared" / TARGET / "manifest.parquet"
    rows = pd.read_parquet(manifest)
    rows.loc[rows["split"] == "test", "split"] = "val"  # no test split left
    rows.to_parquet(manifest)
    assert hidden_labels(params, root, TARGET) is None
    with pytest.raises(DataError, match="dataset 'breastmnist' is not prepared"):  # not there at all: an error, not "no labels"
        hidden_labels(params, root, "breastmnist")
