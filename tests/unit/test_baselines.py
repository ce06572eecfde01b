"""Invariants of the honest baselines: Scratch, Baseline, Baseline++, BNAdapt, TIM."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from metatransfer.algorithms import build_algorithm
from metatransfer.algorithms.baseline import Baseline, BaselineHparams, global_targets
from metatransfer.algorithms.baselinepp import BaselinePP, BaselinePPHparams, CosineHead
from metatransfer.algorithms.bn_adapt import BNAdapt, BNAdaptHparams
from metatransfer.algorithms.scratch import Scratch, ScratchHparams
from metatransfer.algorithms.tim import TIM, TIMHead, TIMHparams, fit_tim, tim_logits
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec

SPEC = BackboneSpec(hidden=8, image_size=16)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These models are tiny: one thread avoids OpenMP spin-waiting, which
    # made a 100-step fit 10x slower on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def images(n: int, seed: int) -> torch.Tensor:
    """n random grey 16x16 images in [0, 1]."""
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def episode(classes: list[int], k_shot: int = 2, n_query: int = 3, seed: int = 0) -> Episode:
    """A random episode whose ways carry the global ids `classes`."""
    n = len(classes)
    return Episode(
        support_x=images(n * k_shot, seed),
        support_y=torch.arange(n).repeat_interleave(k_shot),
        query_x=images(n * n_query, seed + 1),
        query_y=torch.arange(n).repeat_interleave(n_query),
        n_way=n,
        classes=torch.tensor(classes),
    )


def separable_task(k_shot: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """2-way task: class 0 is bright in the top half, class 1 in the bottom half."""
    x = 0.1 * images(2 * k_shot, 5)
    x[:k_shot, :, :8] += 0.9
    x[k_shot:, :, 8:] += 0.9
    return x, torch.arange(2).repeat_interleave(k_shot)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert all(p.requires_grad for p in module.parameters()), "adapt froze θ"


def modes(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


# --------------------------------------------------------------------------- registry


def test_registry_builds_each_baseline_with_its_flags() -> None:
    expected = {
        "scratch": (Scratch, False),
        "baseline": (Baseline, False),
        "baselinepp": (BaselinePP, False),
        "bn_adapt": (BNAdapt, True),
        "tim": (TIM, True),
    }
    for name, (cls, transductive) in expected.items():
        learner = build_algorithm(name, SPEC, n_way=2, hparams={}, num_classes=10)
        assert type(learner) is cls
        assert learner.name == name
        assert learner.transductive is transductive
        assert learner.track_running_stats is True
    assert build_algorithm("tim", SPEC, 2, {}, num_classes=10).hparams.label_smoothing == 0.1


def test_out_of_range_hparam_names_the_key() -> None:
    expected = r"meta_train\.hparams\.baseline\.adapt_lr: must be > 0, found -1\.0"
    with pytest.raises(ConfigError, match=expected):
        build_algorithm("baseline", SPEC, 2, {"adapt_lr": -1}, num_classes=10)
    with pytest.raises(ConfigError, match=r"baselinepp\.scale: must be > 0"):
        build_algorithm("baselinepp", SPEC, 2, {"scale": 0.0}, num_classes=10)
    with pytest.raises(ConfigError, match=r"tim\.iters: must be >= 0"):
        build_algorithm("tim", SPEC, 2, {"iters": -5}, num_classes=10)


# --------------------------------------------------------------------------- Scratch


def test_scratch_adapt_fits_a_separable_support_set() -> None:
    learner = Scratch(SPEC, n_way=2, hparams=ScratchHparams(steps=100))
    x, y = separable_task()
    with torch.no_grad():  # adapt must train even when called under no_grad
        predictor = learner.adapt(x, y, n_way=2)
        start = F.cross_entropy(learner.initial_model(2)(x), y).item()
        logits = predictor(x)
    end = F.cross_entropy(logits, y).item()
    assert end < 0.5 * start
    assert (logits.argmax(1) == y).all()
    assert len(predictor.fit_losses) == 100
    assert predictor.fit_losses[-1] < predictor.fit_losses[0]


def test_scratch_meta_learn_reports_the_initialisation_and_fills_no_gradient() -> None:
    learner = Scratch(SPEC, n_way=2, hparams=ScratchHparams())
    learner.train()
    learner.zero_grad(set_to_none=True)
    before, flags = snapshot(learner), modes(learner)
    ep = episode([7, 2])
    result = learner.meta_learn([ep])
    assert all(p.grad is None for p in learner.parameters())
    assert_same_state(learner, before)
    assert modes(learner) == flags
    with torch.no_grad():
        logits = learner.initial_model(2)(ep.query_x)
    assert result.loss == pytest.approx(F.cross_entropy(logits, ep.query_y).item(), rel=1e-6)
    assert result.acc == pytest.approx((logits.argmax(1) == ep.query_y).float().mean().item())


def test_scratch_same_seed_same_predictor_whatever_the_global_rng() -> None:
    x, y = separable_task()
    learner = Scratch(SPEC, n_way=2, hparams=ScratchHparams(steps=5, seed=3))
    torch.manual_seed(0)
    first = learner.adapt(x, y, 2)(x)
    torch.manual_seed(123)
    second = learner.adapt(x, y, 2)(x)
    other = Scratch(SPEC, n_way=2, hparams=ScratchHparams(steps=5, seed=4)).adapt(x, y, 2)(x)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


# --------------------------------------------------------------------------- Baseline


def test_global_targets_map_local_labels_to_global_ids() -> None:
    targets = global_targets([episode([7, 2]), episode([4, 0], k_shot=1, n_query=1)], num_classes=10)
    assert targets.tolist() == [7, 7, 2, 2, 7, 7, 7, 2, 2, 2, 4, 0, 4, 0]


def test_baseline_meta_learn_trains_on_global_classes() -> None:
    # With a zero head every class gets probability 1/10, so the mean
    # cross-entropy gradient on the head's bias is 1/10 - (share of class c).
    learner = Baseline(SPEC, n_way=2, hparams=BaselineHparams(), num_classes=10)
    learner.train()
    with torch.no_grad():
        learner.head.weight.zero_()
        learner.head.bias.zero_()
    learner.zero_grad(set_to_none=True)
    result = learner.meta_learn([episode([7, 2])])  # 5 images of class 7, 5 of class 2
    expected = torch.full((10,), 0.1)
    expected[7] = expected[2] = 0.1 - 0.5
    torch.testing.assert_close(learner.head.bias.grad, expected)
    assert result.loss == pytest.approx(math.log(10), rel=1e-6)
    assert result.acc == 0.0  # all-zero logits predict class 0, present nowhere
    assert all(p.grad is not None for p in learner.backbone.parameters())


def test_baseline_needs_num_classes_and_valid_global_ids() -> None:
    with pytest.raises(ConfigError, match=r"num_classes >= 1 .* found 0"):
        Baseline(SPEC, n_way=2, hparams=BaselineHparams(), num_classes=0)
    learner = Baseline(SPEC, n_way=2, hparams=BaselineHparams(), num_classes=10)
    with pytest.raises(ConfigError, match=r"episode 1: global class id 12 is outside 0\.\.9"):
        learner.meta_learn([episode([7, 2]), episode([12, 3])])
    with pytest.raises(ConfigError, match=r"episode 0: `classes` is None"):
        ep = episode([7, 2])
        learner.meta_learn([Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 2, None)])
    with pytest.raises(ConfigError, match="has 3 ids but n_way is 2"):
        ep = episode([7, 2])
        three = torch.tensor([1, 2, 3])
        learner.meta_learn([Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y, 2, three)])


def test_baseline_adapt_trains_a_new_head_on_the_frozen_backbone() -> None:
    learner = Baseline(SPEC, n_way=2, hparams=BaselineHparams(adapt_epochs=30), num_classes=10)
    learner.train()
    before, flags = snapshot(learner), modes(learner)
    x, y = separable_task(k_shot=3)  # 6 images: batches of 4 and 2 -> 2 steps per epoch
    predictor = learner.adapt(x, y, n_way=2, unlabeled_x=images(4, 9))
    assert_same_state(learner, before)
    assert modes(learner) == flags
    assert not predictor.training
    assert predictor.head.weight.shape == (2, learner.backbone.out_dim)
    assert len(predictor.fit_losses) == 60
    # The backbone is θ's, untouched (parameters and BatchNorm statistics).
    for key, value in learner.backbone.state_dict().items():
        assert torch.equal(predictor.backbone.state_dict()[key], value)
    again = learner.adapt(x, y, n_way=2)
    assert torch.equal(predictor(x), again(x))


def test_baseline_finetune_backbone_changes_a_copy_only() -> None:
    hp = BaselineHparams(finetune_backbone=True, adapt_epochs=5, adapt_lr=0.1)
    learner = Baseline(SPEC, n_way=2, hparams=hp, num_classes=10)
    before = snapshot(learner)
    x, y = separable_task()
    predictor = learner.adapt(x, y, n_way=2)
    assert_same_state(learner, before)
    conv = "encoder.0.0.weight"
    assert not torch.equal(predictor.backbone.state_dict()[conv], learner.backbone.state_dict()[conv])
    # BatchNorm stays on its stored statistics while fine-tuning on 4 images.
    for key in ("encoder.0.1.running_mean", "encoder.0.1.running_var"):
        assert torch.equal(predictor.backbone.state_dict()[key], learner.backbone.state_dict()[key])


# --------------------------------------------------------------------------- Baseline++


def test_cosine_head_is_bounded_by_its_scale_and_reaches_it() -> None:
    torch.manual_seed(0)
    head = CosineHead(in_dim=6, out_dim=4, scale=10.0)
    features = torch.randn(50, 6) * torch.logspace(-3, 3, 50).unsqueeze(1)
    logits = head(features)
    assert logits.abs().max() <= 10.0 + 1e-5
    with torch.no_grad():
        aligned = head(3.0 * head.weight)  # feature parallel to each class weight
    torch.testing.assert_close(aligned.diagonal(), torch.full((4,), 10.0))


def test_baselinepp_uses_cosine_heads_for_pretraining_and_adaptation() -> None:
    learner = BaselinePP(SPEC, n_way=2, hparams=BaselinePPHparams(scale=3.0, adapt_epochs=3), num_classes=10)
    assert isinstance(learner.head, CosineHead) and learner.head.weight.shape[0] == 10
    learner.train()
    learner.meta_learn([episode([7, 2])])
    x, y = separable_task()
    predictor = learner.adapt(x, y, n_way=2)
    assert isinstance(predictor.head, CosineHead) and predictor.head.weight.shape[0] == 2
    assert predictor(images(20, 3)).abs().max() <= 3.0 + 1e-5


# --------------------------------------------------------------------------- BNAdapt


def test_bn_adapt_takes_batchnorm_statistics_from_the_target_images() -> None:
    learner = BNAdapt(SPEC, n_way=2, hparams=BNAdaptHparams(adapt_epochs=2), num_classes=10)
    learner.train()
    with torch.no_grad():  # give θ source statistics unlike the target's
        learner.backbone(images(16, 40) * 3.0 + 1.0)
    before, flags = snapshot(learner), modes(learner)
    x, y = separable_task()
    target = images(10, 41) * 0.5
    predictor = learner.adapt(x, y, n_way=2, unlabeled_x=target)
    assert_same_state(learner, before)
    assert modes(learner) == flags

    with torch.no_grad():
        conv_out = learner.backbone.encoder[0][0](torch.cat([x, target]))
    bn = predictor.backbone.encoder[0][1]
    torch.testing.assert_close(bn.running_mean, conv_out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, conv_out.transpose(0, 1).flatten(1).var(dim=1))
    assert bn.momentum == learner.backbone.encoder[0][1].momentum
    # Only statistics change: the adapted copy keeps θ's weights.
    conv = "encoder.0.0.weight"
    assert torch.equal(predictor.backbone.state_dict()[conv], learner.backbone.state_dict()[conv])
    assert not torch.allclose(bn.running_mean, learner.backbone.encoder[0][1].running_mean)


def test_bn_adapt_without_unlabelled_images_uses_the_support() -> None:
    learner = BNAdapt(SPEC, n_way=2, hparams=BNAdaptHparams(adapt_epochs=1), num_classes=10)
    x, y = separable_task()
    predictor = learner.adapt(x, y, n_way=2)
    with torch.no_grad():
        conv_out = learner.backbone.encoder[0][0](x)
    torch.testing.assert_close(predictor.backbone.encoder[0][1].running_mean, conv_out.mean(dim=(0, 2, 3)))


# --------------------------------------------------------------------------- TIM


def unit(degrees: torch.Tensor) -> torch.Tensor:
    """Unit vectors (n, 2) at the given angles."""
    rad = torch.deg2rad(degrees.to(torch.float64))
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_tim_uses_clustered_queries_that_the_support_alone_misreads() -> None:
    # Queries cluster around 0 deg (class 0) and 90 deg (class 1); the two
    # support points sit at 65 and 105 deg, so the support-only classifier
    # (weights = support means, boundary at 85 deg) gives every class-1 query
    # below 85 deg to class 0. TIM moves the boundary into the gap.
    query_z = unit(torch.cat([torch.linspace(-20, 20, 9), torch.linspace(70, 110, 9)]))
    query_y = torch.arange(2).repeat_interleave(9)
    support_z, support_y = unit(torch.tensor([65.0, 105.0])), torch.tensor([0, 1])
    hp = TIMHparams(lr=1e-2, iters=300)

    support_only, _ = fit_tim(support_z, support_y, query_z, 2, TIMHparams(iters=0))
    torch.testing.assert_close(support_only, support_z)
    acc_before = (tim_logits(query_z, support_only, 15.0).argmax(1) == query_y).double().mean().item()
    weights, losses = fit_tim(support_z, support_y, query_z, 2, hp)
    acc_after = (tim_logits(query_z, weights, 15.0).argmax(1) == query_y).double().mean().item()

    assert acc_before == pytest.approx(14 / 18)
    assert acc_after == 1.0
    assert (tim_logits(support_z, weights, 15.0).argmax(1) == support_y).all()
    assert len(losses) == 301
    assert losses[-1] < losses[0] - 0.05
    assert min(losses) == pytest.approx(losses[-1], abs=1e-6)


def test_tim_without_queries_is_support_cross_entropy_only() -> None:
    support_z, support_y = unit(torch.tensor([0.0, 10.0, 80.0, 90.0])), torch.tensor([0, 0, 1, 1])
    _, losses = fit_tim(support_z, support_y, None, 2, TIMHparams(iters=0))
    means = torch.stack([support_z[:2].mean(0), support_z[2:].mean(0)])
    ce = F.cross_entropy(tim_logits(support_z, means, 15.0), support_y).item()
    assert losses == [pytest.approx(0.1 * ce)]


def test_tim_adapt_is_deterministic_and_leaves_theta_alone() -> None:
    learner = TIM(SPEC, n_way=2, hparams=TIMHparams(iters=50, lr=1e-3), num_classes=10)
    learner.train()
    before, flags = snapshot(learner), modes(learner)
    x, y = separable_task()
    target = images(8, 21)
    predictor = learner.adapt(x, y, n_way=2, unlabeled_x=target)
    assert_same_state(learner, before)
    assert modes(learner) == flags
    assert isinstance(predictor.head, TIMHead)
    assert len(predictor.fit_losses) == 51
    assert predictor.fit_losses[-1] < predictor.fit_losses[0]
    # The predictor scores L2-normalised frozen features against the TIM weights.
    with torch.no_grad():
        learner.eval()
        z = F.normalize(learner.backbone(target), dim=1)
        learner.train()
        expected = tim_logits(z, predictor.head.weight, 15.0)
        torch.testing.assert_close(predictor(target), expected)
        again = learner.adapt(x, y, n_way=2, unlabeled_x=target)
        assert torch.equal(predictor(target), again(target))


def test_tim_objective_parts_on_equidistant_queries() -> None:
    # Queries on the bisector of two weights get p = (1/2, 1/2): both
    # entropies are log 2, and the objective is 0.1*CE - (log 2 - 0.1 log 2).
    from metatransfer.algorithms.tim import tim_objective

    weights = unit(torch.tensor([0.0, 90.0]))
    support_z, support_y = weights.clone(), torch.tensor([0, 1])
    query_z = unit(torch.tensor([45.0, 45.0, 225.0]))
    parts = tim_objective(weights, support_z, support_y, query_z, TIMHparams())
    ce = F.cross_entropy(tim_logits(support_z, weights, 15.0), support_y)
    torch.testing.assert_close(parts.conditional_entropy, torch.tensor(math.log(2), dtype=torch.float64))
    torch.testing.assert_close(parts.marginal_entropy, torch.tensor(math.log(2), dtype=torch.float64))
    torch.testing.assert_close(parts.loss, 0.1 * ce - 0.9 * math.log(2))
