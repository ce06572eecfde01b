"""Unlabelled targets in the registry: the cluster model registered like a target model, and what
the promotion gate scores it with.

A target of `finetune.unlabeled` ships a cluster model: a target model whose
classes are `cluster_0` .. `cluster_<k-1>` (metatransfer/training/unsupervised.py).
`publish_cluster_result` logs it with the same pyfunc loader as every target
model (so `metatransfer serve` answers a cluster id per image) and registers
it as a new version of `metatransfer-<target>` with the alias `challenger`,
the provenance tags of every version, `kind=cluster_model`, `labels_used=0`,
`k`, `silhouette` and, when the test split holds labels (hidden labels, read
for scoring only, after the model is fitted), `nmi`, `ari`, `matched_acc`.
No few-shot learner is registered with it: a learner needs labelled supports.

Promotion (docs/registry.md, "Unlabelled targets"): a cluster id means
nothing until someone says which cluster is which finding, and a silhouette
compares embeddings with themselves, not with the clinic's classes, so it is
never a gate. With hidden labels the usual gate runs on **matched accuracy**:
each model's clusters are mapped one-to-one to classes (Hungarian algorithm)
on the *other* test folds' images and scored on the fold's own
(`cross_fitted_matched_accuracies`), so no fold is scored with a mapping
chosen on it. Without hidden labels nothing can be measured: `promote`
answers `needs_review` and names `--force --reason`, a person's decision.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from metatransfer import tracking
from metatransfer.layout import Layout
from metatransfer.quality import QUALITY_TAG
from metatransfer.registry.client import CHALLENGER, client_for, model_name, provenance_tags, register_version
from metatransfer.registry.gate import RegistryError
from metatransfer.registry.predict import predict_folder
from metatransfer.registry.publish import class_tags, method_table
from metatransfer.registry.record import PromotionResult, now, record_decision

log = logging.getLogger(__name__)

CLUSTER_KIND = "cluster_model"  # the `kind` tag of a cluster model's versions (target models: target_model)
NEEDS_REVIEW = "needs_review"  # the decision of `promote` on a cluster model with nothing to score it on


def is_cluster_model(version: Any) -> bool:
    """Whether a registered model version is the cluster model of an unlabelled target."""
    return (getattr(version, "tags", None) or {}).get("kind") == CLUSTER_KIND


def hidden_labels(params: Any, root: str | Path, target: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The target's test images and labels when the split has at least two classes, else None.

    An unlabelled target's store may hold labels (a public dataset run without them, as in
    scenarios/unsupervised.yaml): they are read for scoring only. A target without a test split,
    whose test images are all of one class, or an unlabelled store (labels -1), gives None: there is
    nothing to score clusters on.

    Raises:
        DataError: the target is not in the prepared store at all (`dvc pull` or `dvc repro prepare`).

    Returns:
        (images float32 (N, C, H, W) in [0, 1], int64 labels, the split's fingerprint) or None.
    """
    from metatransfer.data.store import load_manifest
    from metatransfer.registry.predict import held_out_images

    # DataError (naming what is prepared) when the target is not in the store at all.
    if "test" not in set(load_manifest(Layout.of(root, params).prepared_dir, target, validate=False)["split"]):
        return None
    images, labels, fingerprint = held_out_images(params, root, target)
    labelled = bool((labels >= 0).all()) and len(np.unique(labels)) >= 2  # an image folder without classes: -1
    return (images, labels, fingerprint) if labelled else None


def hidden_label_scores(params: Any, root: str | Path, target: str, folder: str | Path) -> dict[str, Any] | None:
    """NMI, ARI, matched accuracy and majority rate of a saved cluster model on the hidden test labels
    (`evaluation.clustering.clustering_scores`), or None without hidden labels."""
    from metatransfer.evaluation.clustering import clustering_scores

    held = hidden_labels(params, root, target)
    if held is None:
        return None
    images, labels, _ = held
    return clustering_scores(labels, predict_folder(folder, images))


def cross_fitted_matched_accuracies(predictions: np.ndarray, labels: np.ndarray,
                                    folds: list[np.ndarray]) -> np.ndarray:
    """Per-fold accuracy of cluster ids, each test fold scored with the cluster -> class mapping fitted
    on the other folds' images.

    The mapping is the one-to-one assignment (Hungarian algorithm) that maximises the matches on the
    other folds; a cluster with no image there stays unmapped and counts as wrong. Fitting it on
    the fold itself would score every model with the mapping best for that fold: optimistic,
    and most for the model with the most clusters. A classifier's class ids work too (its mapping is
    the identity wherever it is better than chance).

    Args:
        predictions: cluster (or class) id per test image.
        labels: class per test image (int, >= 0).
        folds: disjoint index arrays (`gate.test_folds`).

    Returns:
        float64 accuracy per fold.
    """
    from scipy.optimize import linear_sum_assignment

    pred, lab = np.asarray(predictions, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if pred.shape != lab.shape:
        raise RegistryError(f"predictions {pred.shape} and labels {lab.shape} differ in shape")
    shape = (int(pred.max()) + 1, int(lab.max()) + 1)
    full = np.zeros(shape, dtype=np.int64)
    np.add.at(full, (pred, lab), 1)
    out = []
    for e in folds:
        rest = full.copy()
        np.subtract.at(rest, (pred[e], lab[e]), 1)
        rows, cols = linear_sum_assignment(rest, maximize=True)
        mapping = np.full(shape[0], -1, dtype=np.int64)
        keep = rest[rows, cols] > 0  # a pair without any image behind it is no evidence
        mapping[rows[keep]] = cols[keep]
        out.append(float((mapping[pred[e]] == lab[e]).mean()))
    return np.asarray(out, dtype=np.float64)


def cluster_table(entry: dict[str, Any]) -> str:
    """Markdown table of the finetune evidence of an unlabelled target (k and train silhouette per method)."""
    return method_table(entry, ["method", "k", "silhouette (train)", "images per cluster", "shipped"],
                        lambda m: [f"{m.get('k', '')}", f"{m.get('silhouette', float('nan')):.4f}",
                                   f"{m.get('cluster_sizes', '')}"])


def publish_cluster_result(root: str | Path, params: Any, target: str, entry: dict[str, Any], folder: str | Path,
                           run_id: str = "") -> dict[str, Any]:
    """Log the shipped cluster model to the active MLflow run and register it as `challenger`.

    Args:
        root: project root.
        params: loaded params (image shape, prepared store).
        target: the unlabelled target.
        entry: its selection entry ({"chosen", "reason", "unlabeled": {...}, "methods": {m: {"k", "silhouette", ...}}}).
        folder: the shipped cluster model's folder.
        run_id: the active MLflow run.

    Returns:
        The run-specific facts: {"chosen", "model_uri", "learner_uri": None, "registered": {"model", "learner"},
        "refused": None, "hidden_label_scores": scores or None}.
    """
    chosen = entry["chosen"]
    fit = entry["methods"][chosen]
    k = int(fit["k"])
    names = tracking.target_class_names(folder)
    scores = hidden_label_scores(params, root, target, folder)
    model_uri = tracking.log_target_model(folder, params.prepare.channels, params.prepare.image_size, k,
                                          name=f"target_{target}",
                                          metadata={"kind": CLUSTER_KIND, "labels_used": 0, "k": k})
    tags = {
        **provenance_tags(root), "target": target, "method": chosen, "mlflow_run_id": run_id, "kind": CLUSTER_KIND,
        QUALITY_TAG: "not_tested", "quality_reason": "no labels: the quality gate tests validation accuracy against labels",
        "labels_used": "0", "k": str(k), "silhouette": f"{fit['silhouette']:.6f}",
        "selection_reason": entry.get("reason", ""), **class_tags(names),
        "cluster_table": json.dumps({m: {key: v.get(key) for key in ("k", "silhouette", "cluster_sizes")}
                                     for m, v in entry.get("methods", {}).items()}, sort_keys=True),
    }
    if scores is not None:  # hidden labels, read for scoring only
        tags.update({key: f"{scores[key]:.6f}" for key in ("nmi", "ari", "matched_acc", "majority_rate")})
        tags["scored_images"] = str(scores["images"])
    scored = ("" if scores is None else
              f"Against the hidden labels of the test split ({scores['images']} images, read for scoring only): "
              f"NMI {scores['nmi']:.4f}, ARI {scores['ari']:.4f}, matched accuracy {scores['matched_acc']:.4f} "
              f"(majority class {scores['majority_rate']:.4f}).\n\n")
    description = (f"Cluster model for `{target}`: k={k} clusters in the `{chosen}` embedding, fitted without any "
                   f"label ({(entry.get('unlabeled') or {}).get('method', 'soft k-means')}). It answers a cluster id "
                   f"per image (`cluster_0` .. `cluster_{k - 1}`), not a diagnosis: which cluster is which finding "
                   f"is for a person to decide.\n\n{scored}Label-free evidence:\n\n{cluster_table(entry)}\n")
    version = register_version(client_for(root), model_uri, model_name(target), tags, description)
    log.info("%s: registered cluster model %s v%s (k=%d, %s embedding, no labels) as %s", target,
             model_name(target), version, k, chosen, CHALLENGER)
    return {"chosen": chosen, "model_uri": model_uri, "learner_uri": None,
            "registered": {"model": {"name": model_name(target), "version": version}, "learner": None},
            "refused": None, "hidden_label_scores": scores}


def needs_review(root: Path, target: str, name: str, challenger: str, champion: str | None) -> PromotionResult:
    """The answer of `promote` for a cluster model without hidden labels: nothing to measure, a person decides.

    Recorded in reports/promotion.json (no MLflow run: nothing was evaluated).
    """
    reason = (f"version {challenger} is a cluster model of an unlabelled target and {target} has no labelled test "
              "images (two classes or more) to score it on; a silhouette only compares an embedding with itself, "
              "so the gate cannot judge it. Review its clusters (e.g. example images per cluster) and promote it "
              f"deliberately: `metatransfer promote --target {target} --force --reason \"...\"`")
    log.warning("%s: %s", name, reason)
    result = PromotionResult(target, name, NEEDS_REVIEW, reason, challenger, champion, champion, "none (no labels)")
    record_decision(root, target, {**result.to_dict(), "time": now()})
    return result
