"""Unlabelled targets (issue 15 item 3): clustering scores, soft k-means, k by silhouette, the cluster
model, the finetune stage's label-free path and the config keys."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from metatransfer.algorithms import build_algorithm
from metatransfer.config import AugmentParams, params_from_mapping
from metatransfer.errors import ConfigError
from metatransfer.evaluation.clustering import ari, clustering_scores, matched_accuracy, nmi, silhouette
from metatransfer.models import BackboneSpec
from metatransfer.training.unsupervised import ClusterSettings, choose_k, fit_unlabeled, soft_kmeans

ROOT = Path(__file__).resolve().parents[2]
TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


def blobs(k: int = 3, per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`k` well-separated Gaussian blobs in 2-D (centres 10 apart, unit spread) and their ids."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])[:k]
    x = np.concatenate([c + rng.normal(size=(per, 2)) for c in centres])
    return x, np.repeat(np.arange(k), per)


# ---------------------------------------------------------------- scores on hand-computed cases


def test_renamed_identical_partition_scores_one() -> None:
    assert (nmi([0, 0, 1, 1], [1, 1, 0, 0]), ari([0, 0, 1, 1], [1, 1, 0, 0]),
            matched_accuracy([0, 0, 1, 1], [1, 1, 0, 0])) == (1.0, 1.0, 1.0)


def test_independent_partition_scores_by_hand() -> None:
    # contingency [[1, 1], [1, 1]]: MI 0; ARI (0 - 2*2/6) / ((2+2)/2 - 2*2/6) = -1/2; best matching 2 of 4
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5, abs=1e-12)
    assert matched_accuracy([0, 0, 1, 1], [0, 1, 0, 1]) == 0.5


def test_split_class_scores_by_hand() -> None:
    # classes 000111, clusters 001122: contingency [[2, 1, 0], [0, 1, 2]]
    labels, clusters = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    # MI = 2 * (1/3) ln 2; H(classes) = ln 2, H(clusters) = ln 3; NMI = MI / mean(H)
    assert nmi(labels, clusters) == pytest.approx((4 / 3) * math.log(2) / math.log(6), abs=1e-12)
    # pairs: index 1+1 = 2, rows 3+3 = 6, cols 1+1+1 = 3, all 15: (2 - 6*3/15) / (4.5 - 1.2) = 8/33
    assert ari(labels, clusters) == pytest.approx(8 / 33, abs=1e-12)
    # Hungarian: cluster 0 -> class 0 (2), cluster 2 -> class 1 (2); cluster 1 unmatched
    assert matched_accuracy(labels, clusters) == pytest.approx(4 / 6, abs=1e-12)
    s = clustering_scores(np.array(labels), np.array(clusters))
    assert (s["majority_rate"], s["images"], s["clusters_used"]) == (0.5, 6, 3)


def test_one_cluster_for_all_scores_the_majority_rate() -> None:
    labels = [0, 0, 0, 1]
    assert matched_accuracy(labels, [5, 5, 5, 5]) == 0.75
    assert nmi(labels, [5, 5, 5, 5]) == 0.0 and ari(labels, [5, 5, 5, 5]) == 0.0


def test_silhouette_by_hand() -> None:
    # points 0, 1 | 10, 11: a = 1 for each; b = 10.5, 9.5, 9.5, 10.5
    s = silhouette(np.array([[0.0], [1.0], [10.0], [11.0]]), np.array([0, 0, 1, 1]))
    assert s == pytest.approx((2 * 9.5 / 10.5 + 2 * 8.5 / 9.5) / 4, abs=1e-12)
    with pytest.raises(ConfigError, match=r"^silhouette: needs 2\.\.3 distinct clusters for 4 images, found 1$"):
        silhouette(np.zeros((4, 1)), np.zeros(4))


def test_scores_refuse_arrays_of_different_length() -> None:
    with pytest.raises(ConfigError, match="labels and clusters must be non-empty and of one length, found 3 and 2"):
        nmi([0, 1, 1], [0, 1])


def test_scores_agree_with_scikit_learn_where_installed() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.integers(0, 4, 60), rng.integers(0, 3, 60)
        x = rng.normal(size=(60, 3))
        assert nmi(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), abs=1e-12)
        assert ari(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b), abs=1e-12)
        assert silhouette(x, b) == pytest.approx(metrics.silhouette_score(x, b), abs=1e-12)


# ---------------------------------------------------------------- soft k-means and k


def test_soft_kmeans_is_deterministic_and_recovers_separated_blobs() -> None:
    x, ids = blobs()
    a, b = soft_kmeans(x, 3, 0.1, seed=4), soft_kmeans(x, 3, 0.1, seed=4)
    assert np.array_equal(a.centres, b.centres) and np.array_equal(a.resp, b.resp) and a.energy == b.energy
    assert ari(ids, a.resp.argmax(1)) == 1.0
    assert np.allclose(a.resp.sum(1), 1.0)
    with pytest.raises(ConfigError, match="needs k >= 2 and at least k images, found k=5 for 4 images"):
        soft_kmeans(x[:4], 5, 0.1, seed=0)


def test_silhouette_chooses_three_clusters_on_three_blobs() -> None:
    x, _ = blobs(3)
    k, scores, _ = choose_k(x, ClusterSettings(select_k=True, k_max=6), seed=0)
    assert k == 3 and sorted(scores) == [2, 3, 4, 5, 6]
    assert scores[3] == max(scores.values()) > 0.7
    k4, _, _ = choose_k(blobs(4)[0], ClusterSettings(select_k=True, k_max=6), seed=0)
    assert k4 == 4
    assert choose_k(x, ClusterSettings(k=5), seed=0)[0] == 5  # without select_k, k is the param


# ---------------------------------------------------------------- the cluster model


def two_kinds_of_images(per: int = 12, seed: int = 0) -> torch.Tensor:
    """Dark and bright 1x16x16 images, a little noise: two obvious clusters for any embedding."""
    g = torch.Generator().manual_seed(seed)
    dark = 0.15 + 0.05 * torch.rand(per, 1, 16, 16, generator=g)
    bright = 0.85 - 0.05 * torch.rand(per, 1, 16, 16, generator=g)
    return torch.cat([dark, bright])


def test_cluster_model_head_is_the_soft_assignment_and_fits_are_identical() -> None:
    images = two_kinds_of_images()
    learner = build_algorithm("scratch", TINY, 2, {"steps": 1})
    r1 = fit_unlabeled(learner, images, ClusterSettings(k=2), seed=0)
    r2 = fit_unlabeled(learner, images, ClusterSettings(k=2), seed=0)
    assert r1.model.class_names == ["cluster_0", "cluster_1"] and r1.k == 2
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assigned = r1.model(images).argmax(1).numpy()
    assert ari(np.repeat([0, 1], 12), assigned) == 1.0  # dark vs bright
    assert sorted(r1.cluster_sizes) == [12, 12] and r1.steps == 0


def test_self_training_runs_its_steps_on_confident_images_only() -> None:
    images = two_kinds_of_images()
    learner = build_algorithm("scratch", TINY, 2, {"steps": 1})
    views = AugmentParams(enabled=True, color_jitter=0.0)
    plain = fit_unlabeled(learner, images, ClusterSettings(k=2, temperature=1.0), seed=0)
    trained = fit_unlabeled(learner, images, ClusterSettings(k=2, temperature=1.0, self_training_steps=3,
                                                            confidence=0.6, augment=views), seed=0)
    assert trained.steps == 3 and trained.confident == 24
    assert not torch.equal(plain.model.head.weight, trained.model.head.weight)
    again = fit_unlabeled(learner, images, ClusterSettings(k=2, temperature=1.0, self_training_steps=3,
                                                          confidence=0.6, augment=views), seed=0)
    assert torch.equal(again.model.head.weight, trained.model.head.weight)  # seeded batches and views
    # No image can reach a probability above 1: self-training is skipped (a warning), the model is the plain fit.
    none = fit_unlabeled(learner, images, ClusterSettings(k=2, temperature=1.0, self_training_steps=3,
                                                         confidence=1.5), seed=0)
    assert (none.confident, none.steps) == (0, 0)
    assert torch.equal(none.model.head.weight, plain.model.head.weight)


# ---------------------------------------------------------------- the stage never reads train labels


def write_target(prepared: Path, name: str, train_classes: list[str]) -> None:
    """A prepared target: 10 dark then 10 bright train images with the given class per train row."""
    images = (two_kinds_of_images(per=10).numpy() * 255).astype(np.uint8)
    rows = [{"id": i, "dataset": name, "split": "train", "class": c} for i, c in enumerate(train_classes)]
    rows += [{"id": 20 + i, "dataset": name, "split": sp, "class": f"{name}/{'ab'[i % 2]}"}
             for i, sp in enumerate(["val"] * 4 + ["test"] * 6)]
    (prepared / name).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(prepared / name / "manifest.parquet")
    np.save(prepared / name / "images.npy", np.concatenate([images, images[:10]]))


def unlabeled_raw(**entry) -> dict:
    raw = yaml.safe_load((ROOT / "scenarios" / "characters.yaml").read_text())
    raw.pop("pretrain", None)
    raw["prepare"].update(channels=1, image_size=16)
    raw["model"].update(hidden=4)
    raw["finetune"].update(targets=["cells"], methods=["scratch"], unlabeled={"cells": {"k": 2, **entry}})
    raw["promote"]["baseline"] = "scratch"
    return raw


def test_unlabeled_stage_output_does_not_depend_on_train_labels(tmp_path: Path) -> None:
    from metatransfer.stages.finetune import finetune_unlabeled_target

    classes = ["cells/a"] * 10 + ["cells/b"] * 10
    shuffled = list(np.random.default_rng(0).permutation(classes))
    out = []
    for i, train_classes in enumerate([classes, shuffled, ["cells/a"] * 19 + ["cells/b"]]):
        root = tmp_path / f"p{i}"
        write_target(root / "data" / "prepared", "cells", train_classes)
        results, chosen, reason = finetune_unlabeled_target("cells", params_from_mapping(unlabeled_raw()), root)
        assert chosen == "scratch" and "no labels" in reason
        out.append(results["scratch"])
    for r in out[1:]:
        assert r.cluster_sizes == out[0].cluster_sizes and r.silhouette == out[0].silhouette
        assert all(torch.equal(v, out[0].model.state_dict()[n]) for n, v in r.model.state_dict().items())
    assert sorted(out[0].cluster_sizes) == [10, 10]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("entry", "where", "message"), [
    ({"k": 1}, "cells.k", "must be >= 2 (clusters), found 1"),
    ({"select_k": True, "k_max": 1}, "cells.k_max", "must be >= 2 with select_k"),
    ({"embedding": "maml"}, "cells.embedding", "must be '' (the first of finetune.methods) or one of "
                                                "finetune.methods ['scratch'], found 'maml'"),
    ({"temperature": 0.0}, "cells.temperature", "must be > 0, found 0.0"),
    ({"self_training_steps": -1}, "cells.self_training_steps", "must be >= 0 (0: no self-training), found -1"),
    ({"confidence": 1.0}, "cells.confidence", "must be in (0, 1), found 1.0"),
    ({"clusters": 3}, "cells", "unknown key(s) ['clusters']"),
])
def test_unlabeled_keys_are_checked_by_name(entry: dict, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        params_from_mapping(unlabeled_raw(**entry))
    assert f"finetune.unlabeled.{where}" in str(err.value) and message in str(err.value)


def test_unlabeled_target_must_be_a_target() -> None:
    raw = unlabeled_raw()
    raw["finetune"]["unlabeled"] = {"other": {}}
    with pytest.raises(ConfigError, match=r"finetune.unlabeled.other: 'other' is not in finetune.targets \['cells'\] \(nor a "
                                          r"dataset prepare builds\); add it there"):
        params_from_mapping(raw)


def test_an_entry_for_a_prepared_dataset_that_is_not_a_target_is_accepted_unused() -> None:
    # A fan-out piece of finetune (metatransfer/dvc_stages.py) cuts finetune.targets to one target
    # and keeps the section: the other targets' entries must still load.
    raw = unlabeled_raw()
    raw["finetune"]["unlabeled"]["breastmnist"] = {"k": 3}
    assert "breastmnist" in raw["fetch"]["datasets"] and "breastmnist" not in raw["finetune"]["targets"]
    assert params_from_mapping(raw).finetune.unlabeled["breastmnist"].k == 3


def test_without_the_key_no_target_is_unlabeled() -> None:
    raw = copy.deepcopy(unlabeled_raw())
    del raw["finetune"]["unlabeled"]
    assert params_from_mapping(raw).finetune.unlabeled == {}
    p = params_from_mapping(unlabeled_raw(select_k=True))
    assert p.finetune.unlabeled["cells"].select_k and p.finetune.unlabeled["cells"].k_max == 8


# ---------------------------------------------------------------- the report


def test_report_card_says_plainly_what_was_done_without_labels() -> None:
    from metatransfer.report.inputs import ReportInputs, RunFacts
    from metatransfer.report.page import render_report

    sel = {"chosen": "protonet", "reason": "no labels: the embedding of finetune.unlabeled.cells.embedding ...",
           "unlabeled": {"labels_used": 0, "k": 3, "select_k": True, "images": 40, "self_training_steps": 5},
           "methods": {"protonet": {"k": 3, "silhouette": 0.41}, "scratch": {"k": 2, "silhouette": 0.2}}}
    scores = {"cells": {"chosen": "protonet", "k": 3, "methods": {
        "protonet": {"nmi": 0.5, "ari": 0.25, "matched_acc": 0.75, "majority_rate": 0.5},
        "scratch": {"nmi": 0.01, "ari": -0.02, "matched_acc": 0.5, "majority_rate": 0.5}}}}
    facts = RunFacts("abc", "", "", "now", "p")
    page = render_report(ReportInputs(facts, evaluate={"unlabeled_targets": scores}, selections={"cells": sel}))
    assert ("No labels were used for training; k=3, clustering in the protonet embedding; scored against hidden "
            "labels (those of the test split, used for scoring only).") in page
    assert "soft k-means (k chosen by silhouette), then 5 self-training steps on confident pseudo-labels" in page
    assert "<td>protonet (selected)</td><td>3</td><td>0.410</td><td>0.500</td><td>0.250</td><td>75.00</td>" in page
    assert "<td>scratch</td><td>2</td><td>0.200</td><td>0.010</td><td>-0.020</td><td>50.00</td>" in page
    before = render_report(ReportInputs(facts, selections={"cells": sel}))
    assert "scores against hidden labels appear after dvc repro evaluate" in before


def test_documented_scenario_has_one_unlabelled_target_and_no_episodes_on_it() -> None:
    from metatransfer.config import load_params

    p = load_params(ROOT / "scenarios" / "unsupervised.yaml")
    assert list(p.finetune.unlabeled) == ["breastmnist"] and "breastmnist" in p.finetune.targets
    assert p.finetune.unlabeled["breastmnist"].embedding in p.finetune.methods
    assert all(s.dataset != "breastmnist" for s in p.episodes.sets.values())
    assert load_params(ROOT / "params.yaml").finetune.unlabeled == {}  # the default: every target labelled
