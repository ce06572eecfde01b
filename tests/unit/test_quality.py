"""The quality gate before registration: the tests it applies, and a starved model refused
at registration (no MLflow call is made for it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metatransfer import quality, registry
from metatransfer.algorithms import build_algorithm
from metatransfer.config import load_params
from metatransfer.models import BackboneSpec
from metatransfer.training.finetune import FinetuneSettings, finetune

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_majority_rate_is_the_constant_classifiers_accuracy() -> None:
    assert quality.majority_rate(np.array([0, 0, 0, 1])) == 0.75
    assert quality.majority_rate(np.repeat(np.arange(5), 10)) == pytest.approx(0.2)


def test_binomial_p_value_is_the_exact_upper_tail() -> None:
    n, p, k = 20, 0.3, 10
    exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    assert quality.binomial_sf(k, n, p) == pytest.approx(exact, rel=1e-12)
    assert quality.binomial_sf(0, n, p) == 1.0


def test_target_quality_against_the_majority_rate() -> None:
    good = quality.target_quality(30, 50, 0.2, 0.95)
    assert good.passed and good.p_value < 0.05 and good.value == 0.6
    # 12/50 = 0.24 on a 5-class balanced set: not distinguishable from guessing.
    chance = quality.target_quality(12, 50, 0.2, 0.95)
    assert not chance.passed and chance.p_value >= 0.05
    assert chance.reason.startswith("validation accuracy 0.2400 (12/50) vs chance 0.2000 (majority-class rate): "
                                    "one-sided binomial p = ")
    # 75 % on a 73 %-majority binary target is what a constant classifier gets: refused
    # (a test against 1/n_classes = 0.5 would have passed it).
    assert not quality.target_quality(59, 78, 0.73, 0.95).passed
    assert quality.target_quality(59, 78, 0.5, 0.95).passed
    assert not quality.target_quality(0, 0, 0.5, 0.95).passed


def test_learner_quality_needs_the_episode_ci_above_one_over_n_way() -> None:
    assert quality.learner_quality([0.9, 0.95, 0.92, 0.88], 5, 0.95).passed
    low = quality.learner_quality([0.2, 0.27, 0.17, 0.22], 5, 0.95)
    assert not low.passed and low.ci_low < 0.2 and "<= chance 0.2000 (1/5) over 4 episodes" in low.reason
    assert not quality.learner_quality([0.9], 5, 0.95).passed  # one episode: no interval
    assert quality.learner_quality([0.5, 0.5, 0.5], 5, 0.95).passed  # zero spread: the mean decides


def _params(**promote: object):
    """The repository's params.yaml with `promote` keys changed, through the real loader."""
    import tempfile

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw.setdefault("promote", {}).update(confidence=0.95, **promote)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return load_params(path)


def test_the_gate_can_be_switched_off_and_says_so() -> None:
    params = _params(quality_gate=False)
    verdict = quality.target_gate(10, 50, 0.2, params)
    assert verdict.passed and verdict.test == "off" and verdict.reason.startswith("quality gate off")


def test_a_starved_model_is_refused_at_registration(caplog) -> None:
    """A target model fine-tuned for 0 steps from a random, never-trained learner on a
    5-class target whose labels carry no signal: refused, and MLflow is never called."""
    torch.manual_seed(0)
    spec = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)
    learner = build_algorithm("protonet", spec, 5, None)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 16, 16, generator=gen)
    y = torch.arange(5).repeat(20)  # labels unrelated to the (random) pixels
    vx, vy = torch.rand(100, 1, 16, 16, generator=gen), torch.arange(5).repeat(20)
    result = finetune(learner, x[:5], y[:5], vx, vy, [f"c{i}" for i in range(5)],
                      FinetuneSettings(steps=0, lr=1e-3, batch_size=5, train_layers="all", eval_every=1, patience=0),
                      seed=0)
    params = _params(quality_gate=True)
    gate = quality.target_gate(result.val_correct, result.val_n, result.val_chance, params)
    assert result.val_n == 100 and result.val_chance == pytest.approx(0.2) and not gate.passed
    entry = {"chosen": "protonet", "reason": "highest target validation accuracy",
             "methods": {"protonet": {"val_acc": result.val_acc, quality.QUALITY_TAG: gate.to_dict()}}}
    with caplog.at_level("WARNING", logger="metatransfer.registry"):
        out = registry.register_finetune_result("/nonexistent-project", "retinamnist", entry, "models:/m-x", None)
    assert out["model"] is None and out["learner"] is None and out["refused"] == gate.reason
    assert ("retinamnist: protonet not registered as challenger: quality gate refused it "
            f"({gate.reason})") in caplog.text
