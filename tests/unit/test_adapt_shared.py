"""The shared adaptation code: `_adapt` (metric and fine-tuning learners) and the
fast-weight helpers of `_inner` with Reptile's inner optimiser (MAML family)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _inner, algorithm_class, build_algorithm
from metatransfer.algorithms.reptile import ADAM_BETA2, ADAM_EPS, inner_train
from metatransfer.errors import EpisodeError
from metatransfer.models import BackboneSpec

SPEC = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)
SHARED = ["protonet", "matchingnet", "relationnet", "tadam", "scratch", "baseline", "bn_adapt", "tim"]
METRIC = ["protonet", "matchingnet", "relationnet", "tadam"]
# Short fits keep the fine-tuning learners fast; the code path is the same.
FAST = {"scratch": {"steps": 2}, "baseline": {"adapt_epochs": 2}, "bn_adapt": {"adapt_epochs": 2},
        "tim": {"iters": 3}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def learner(name: str):
    torch.manual_seed(0)
    return build_algorithm(name, SPEC, 3, FAST.get(name, {}), num_classes=5)


def images(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


# ----------------------------------------------------------- metric and fine-tuning learners


@pytest.mark.parametrize("name", SHARED)
def test_the_eight_learners_share_one_adapt(name: str) -> None:
    cls = algorithm_class(name)
    assert issubclass(cls, _adapt.SupportLearner)
    assert cls.adapt is _adapt.SupportLearner.adapt
    assert (cls.adapt_support is _adapt.MetricLearner.adapt_support) == (name in METRIC)


@pytest.mark.parametrize("name", SHARED)
def test_bad_support_labels_name_the_algorithm(name: str) -> None:
    with pytest.raises(EpisodeError, match=rf"^{name} adapt support_y: class\(es\) \[2\] have no support example"):
        learner(name).adapt(images(6, 1), torch.tensor([0, 0, 1, 1, 1, 0]), 3)
    with pytest.raises(EpisodeError, match=rf"^{name} adapt support_y: expected int64 labels"):
        learner(name).adapt(images(6, 1), LABELS.to(torch.int32), 3)


def test_support_set_casts_to_the_learners_dtype_and_drops_empty_unlabelled_images() -> None:
    model = learner("protonet").to(torch.float64)
    support = _adapt.support_set(model, images(6, 1), LABELS, 3, unlabeled_x=images(0, 2))
    assert support.x.dtype == torch.float64 and support.device == torch.device("cpu")
    assert torch.equal(support.x, images(6, 1).double())
    assert support.unlabeled_x is None and support.n_way == 3
    support = _adapt.support_set(model, images(6, 1), LABELS, 3, unlabeled_x=images(4, 2))
    assert support.unlabeled_x is not None and support.unlabeled_x.dtype == torch.float64
    assert support.cast(images(2, 3)).dtype == torch.float64


@pytest.mark.parametrize("name", SHARED)
def test_a_float64_learner_adapts_float32_images(name: str) -> None:
    model = learner(name).to(torch.float64)
    predict = model.adapt(images(6, 1), LABELS, 3, unlabeled_x=images(6, 2))
    logits = predict(images(5, 3))
    assert logits.shape == (5, 3) and logits.dtype == torch.float64


@pytest.mark.parametrize("name", METRIC)
def test_metric_predictor_runs_in_eval_mode_without_grad_and_restores_flags(name: str) -> None:
    model = learner(name).train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()  # a caller's choice that adapt must keep
    flags = [m.training for m in model.modules()]
    predict = model.adapt(images(6, 1), LABELS, 3)
    with torch.enable_grad():
        first = predict(images(5, 3))
    assert not first.requires_grad
    assert [m.training for m in model.modules()] == flags
    # eval mode: BatchNorm uses running statistics, so an image's logits do not depend on its batch.
    torch.testing.assert_close(predict(images(5, 3)[:2]), first[:2], rtol=0, atol=1e-6)


def test_protonet_predictor_is_negative_squared_distance_to_eval_mode_prototypes() -> None:
    model = learner("protonet")
    predict = model.adapt(images(6, 1), LABELS, 3)
    model.eval()
    with torch.no_grad():
        emb = model.backbone(images(6, 1))
        protos = torch.stack([emb[LABELS == k].mean(0) for k in range(3)])
        expected = -torch.cdist(model.backbone(images(4, 2)), protos).pow(2)
    torch.testing.assert_close(predict(images(4, 2)), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- MAML family fast weights


def linear_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 linear softmax model (no backbone) and a 3-way support set."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return model, x, LABELS


def ce_grads(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of mean cross-entropy of softmax(x Wᵀ + b) w.r.t. (W, b)."""
    x = x.flatten(1)
    d = (torch.softmax(x @ W.T + b, dim=1) - F.one_hot(y, W.shape[0]).to(x.dtype)) / len(y)
    return d.T @ x, d.sum(0)


def test_sgd_detached_is_plain_sgd_with_no_graph_even_under_no_grad() -> None:
    model, x, y = linear_task()
    theta = _inner.parameters_of(model)
    with torch.no_grad():
        fast = _inner.sgd_detached(theta, lambda p: _inner.loss_and_logits(model, p, x, y)[0], 3, 0.5)
    W, b = theta["1.weight"].detach(), theta["1.bias"].detach()
    for _ in range(3):
        gW, gb = ce_grads(W, b, x, y)
        W, b = W - 0.5 * gW, b - 0.5 * gb
    torch.testing.assert_close(fast["1.weight"], W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast["1.bias"], b, rtol=1e-12, atol=1e-14)
    assert all(t.grad_fn is None for t in fast.values())
    assert model[1].weight.grad is None  # θ untouched


def test_sgd_steps_moves_only_the_named_parameters_and_keeps_the_graph() -> None:
    model, x, y = linear_task()
    theta = _inner.parameters_of(model)
    fast = _inner.adapt_sgd(model, theta, x, y, steps=2, lr=0.5, create_graph=True, names={"1.bias"})
    assert fast["1.weight"] is theta["1.weight"]
    assert not torch.equal(fast["1.bias"], theta["1.bias"])
    # second order: the adapted bias is a function of the weight through the inner gradients
    (g,) = torch.autograd.grad(fast["1.bias"].sum(), [theta["1.weight"]])
    assert g.abs().max() > 0


def test_adapt_head_equals_adapt_sgd_on_the_head_of_a_fixed_feature_model() -> None:
    model, x, y = linear_task()
    theta = _inner.parameters_of(model)
    w, b = _inner.adapt_head(x.flatten(1), y, theta["1.weight"], theta["1.bias"], steps=3, lr=0.3,
                             create_graph=False)
    fast = _inner.adapt_sgd(model, theta, x, y, steps=3, lr=0.3, create_graph=False)
    torch.testing.assert_close(w, fast["1.weight"], rtol=0, atol=1e-15)
    torch.testing.assert_close(b, fast["1.bias"], rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", [1, 4])
def test_reptile_inner_adam_is_the_papers_beta1_zero_update(steps: int) -> None:
    # φ ← φ − lr·g/(√v̂ + ε), v ← β2·v + (1 − β2)·g², v̂ = v/(1 − β2^t), v0 = 0: the
    # hand-written update torch.optim.Adam(betas=(0, β2)) replaced.
    model, x, y = linear_task()
    theta = _inner.parameters_of(model)
    fast = inner_train(model, theta, x, y, steps, lr=0.01, optimizer="adam", batch=0)
    W, b = theta["1.weight"].detach(), theta["1.bias"].detach()
    vW, vb = torch.zeros_like(W), torch.zeros_like(b)
    for t in range(1, steps + 1):
        gW, gb = ce_grads(W, b, x, y)
        vW, vb = ADAM_BETA2 * vW + (1 - ADAM_BETA2) * gW**2, ADAM_BETA2 * vb + (1 - ADAM_BETA2) * gb**2
        c = 1 - ADAM_BETA2**t
        W = W - 0.01 * gW / ((vW / c).sqrt() + ADAM_EPS)
        b = b - 0.01 * gb / ((vb / c).sqrt() + ADAM_EPS)
    torch.testing.assert_close(fast["1.weight"], W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast["1.bias"], b, rtol=1e-12, atol=1e-14)
    assert model[1].weight.grad is None and all(t.grad_fn is None for t in fast.values())


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile"])
def test_gradient_learners_share_one_adapt_that_leaves_theta_alone(name: str) -> None:
    model = build_algorithm(name, SPEC, 3, {"eval_inner_steps": 2})
    assert type(model).adapt is _inner.GradientLearner.adapt
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        predict = model.adapt(images(8, 1), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4)
    assert predict(images(5, 2)).shape == (5, 4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
