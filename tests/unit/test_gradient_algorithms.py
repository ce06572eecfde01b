"""Invariants of the gradient-based meta-learners (MAML, FOMAML, Reptile, ANIL, Meta-SGD).

Meta-gradients are checked against finite differences and against closed-form
updates worked out by hand on a linear softmax model; adaptation, determinism
and a short meta-training run are checked on a tiny Conv-4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _inner, build_algorithm
from metatransfer.algorithms.anil import ANIL, ANILHparams
from metatransfer.algorithms.fomaml import FOMAML, FOMAMLHparams
from metatransfer.algorithms.maml import MAML, MAMLHparams
from metatransfer.algorithms.metasgd import MetaSGD, MetaSGDHparams, lr_key
from metatransfer.algorithms.reptile import Reptile, ReptileHparams
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError, EpisodeError
from metatransfer.models import BackboneSpec
from tests.devices import DEVICES

ALGORITHMS = ["maml", "fomaml", "reptile", "anil", "metasgd"]
TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These networks are tiny: with 2 intra-op threads on a busy 2-core machine
    # the thread hand-offs cost 10-100x the arithmetic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_episode(
    n_way: int, k_shot: int, n_query: int, gen: torch.Generator, dtype=torch.float32, size: int = 16
) -> Episode:
    """An episode of random images (labels arranged class by class)."""
    return Episode(
        support_x=torch.rand(n_way * k_shot, 1, size, size, generator=gen, dtype=dtype),
        support_y=torch.arange(n_way).repeat_interleave(k_shot),
        query_x=torch.rand(n_way * n_query, 1, size, size, generator=gen, dtype=dtype),
        query_y=torch.arange(n_way).repeat_interleave(n_query),
        n_way=n_way,
    )


# --- A linear softmax model going through the learners' own code paths ----------


class Flat(nn.Module):
    """A parameter-free backbone: (B, 1, 2, 2) images → 4 features."""

    out_dim = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def linear_learner(cls, hparams, n_way: int = 2):
    """A learner of class `cls` whose model is a linear softmax classifier (float64)."""
    learner = cls(TINY, n_way, hparams)
    torch.manual_seed(3)
    learner.model = _inner.Classifier(Flat(), n_way).double()
    return learner


def linear_episodes(n_tasks: int, seed: int = 11) -> list[Episode]:
    gen = torch.Generator().manual_seed(seed)
    return [random_episode(2, 3, 2, gen, torch.float64, size=2) for _ in range(n_tasks)]


def ce_grads(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    """Closed-form gradient of mean cross-entropy of softmax(X Wᵀ + b) w.r.t. (W, b)."""
    X = X.flatten(1)
    D = (torch.softmax(X @ W.T + b, dim=1) - F.one_hot(y, W.shape[0]).to(X.dtype)) / len(y)
    return D.T @ X, D.sum(0)


def test_fomaml_gradient_matches_closed_form_on_linear_model():
    alpha = 0.7
    learner = linear_learner(FOMAML, FOMAMLHparams(inner_lr=alpha, inner_steps=2))
    W0, b0 = (p.detach().clone() for p in (learner.model.head.weight, learner.model.head.bias))
    episodes = linear_episodes(3)
    learner.meta_learn(episodes)
    exp_W, exp_b = torch.zeros_like(W0), torch.zeros_like(b0)
    for ep in episodes:
        W, b = W0, b0
        for _ in range(2):
            gW, gb = ce_grads(W, b, ep.support_x, ep.support_y)
            W, b = W - alpha * gW, b - alpha * gb
        gW, gb = ce_grads(W, b, ep.query_x, ep.query_y)  # query gradient at φ
        exp_W += gW / 3
        exp_b += gb / 3
    torch.testing.assert_close(learner.model.head.weight.grad, exp_W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(learner.model.head.bias.grad, exp_b, rtol=1e-12, atol=1e-14)


def test_maml_second_order_differs_from_first_order_on_linear_model():
    # The Hessian term is non-zero for softmax regression: a MAML that silently
    # dropped it would equal FOMAML.
    episodes = linear_episodes(2)
    so = linear_learner(MAML, MAMLHparams(inner_lr=0.7, inner_steps=1))
    fo = linear_learner(FOMAML, FOMAMLHparams(inner_lr=0.7, inner_steps=1))
    so.meta_learn(episodes)
    fo.meta_learn(episodes)
    diff = (so.model.head.weight.grad - fo.model.head.weight.grad).abs().max().item()
    assert diff > 1e-4


@pytest.mark.parametrize("steps", [1, 3])
def test_reptile_sgd_gradient_matches_closed_form_on_linear_model(steps):
    lr = 0.5
    hp = ReptileHparams(
        inner_lr=lr, inner_optimizer="sgd", inner_steps=steps, inner_batch=0, outer_step_size=0.25
    )
    learner = linear_learner(Reptile, hp)
    W0, b0 = (p.detach().clone() for p in (learner.model.head.weight, learner.model.head.bias))
    episodes = linear_episodes(3)
    result = learner.meta_learn(episodes)
    mean_W, mean_b = torch.zeros_like(W0), torch.zeros_like(b0)
    query_loss = 0.0
    for ep in episodes:
        W, b = W0, b0
        for _ in range(steps):
            gW, gb = ce_grads(W, b, ep.support_x, ep.support_y)
            W, b = W - lr * gW, b - lr * gb
        mean_W += W / 3
        mean_b += b / 3
        query_loss += F.cross_entropy(ep.query_x.flatten(1) @ W.T + b, ep.query_y).item() / 3
    assert result.loss == pytest.approx(query_loss, rel=1e-12)  # the adapted φ's query loss
    # .grad = θ − mean φ, so an outer SGD step of size ε gives θ + ε(mean φ − θ).
    torch.testing.assert_close(learner.model.head.weight.grad, W0 - mean_W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(learner.model.head.bias.grad, b0 - mean_b, rtol=1e-12, atol=1e-14)
    assert torch.equal(learner.model.head.weight.detach(), W0)  # meta_learn does not step
    outer = learner.outer_optimizer(1e-3)  # outer_step_size, not meta_lr, is ε
    assert isinstance(outer, torch.optim.SGD)
    outer.step()
    torch.testing.assert_close(
        learner.model.head.weight.detach(), W0 + 0.25 * (mean_W - W0), rtol=1e-12, atol=1e-14
    )


def test_reptile_adam_inner_loop_matches_closed_form():
    lr, beta2, eps = 0.01, 0.999, 1e-8
    hp = ReptileHparams(inner_lr=lr, inner_optimizer="adam", inner_steps=2, inner_batch=0)
    learner = linear_learner(Reptile, hp)
    W0, b0 = (p.detach().clone() for p in (learner.model.head.weight, learner.model.head.bias))
    (ep,) = linear_episodes(1)
    learner.meta_learn([ep])
    W, b = W0, b0
    vW, vb = torch.zeros_like(W), torch.zeros_like(b)
    for t in (1, 2):
        gW, gb = ce_grads(W, b, ep.support_x, ep.support_y)
        vW, vb = beta2 * vW + (1 - beta2) * gW**2, beta2 * vb + (1 - beta2) * gb**2
        W = W - lr * gW / ((vW / (1 - beta2**t)).sqrt() + eps)
        b = b - lr * gb / ((vb / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(learner.model.head.weight.grad, W0 - W, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(learner.model.head.bias.grad, b0 - b, rtol=1e-10, atol=1e-14)


def test_metasgd_step_size_gradient_matches_closed_form_on_linear_model():
    # φ = θ − α∘g_s(θ)  ⇒  ∂L_q(φ)/∂α = −g_s(θ) ∘ ∇L_q(φ), exactly, for one step.
    learner = linear_learner(MetaSGD, MetaSGDHparams(inner_steps=1))
    gen = torch.Generator().manual_seed(5)
    learner.lrs = nn.ParameterDict(
        {
            lr_key(n): nn.Parameter(torch.rand(p.shape, generator=gen, dtype=p.dtype))
            for n, p in learner.model.named_parameters()
        }
    )
    aW, ab = learner.lrs[lr_key("head.weight")].detach(), learner.lrs[lr_key("head.bias")].detach()
    W0, b0 = (p.detach().clone() for p in (learner.model.head.weight, learner.model.head.bias))
    (ep,) = linear_episodes(1)
    learner.meta_learn([ep])
    sW, sb = ce_grads(W0, b0, ep.support_x, ep.support_y)
    qW, qb = ce_grads(W0 - aW * sW, b0 - ab * sb, ep.query_x, ep.query_y)
    torch.testing.assert_close(
        learner.lrs[lr_key("head.weight")].grad, -sW * qW, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        learner.lrs[lr_key("head.bias")].grad, -sb * qb, rtol=1e-12, atol=1e-14
    )


def test_anil_equals_maml_when_all_parameters_are_in_the_head():
    episodes = linear_episodes(2)
    maml = linear_learner(MAML, MAMLHparams(inner_lr=0.3, inner_steps=2))
    anil = linear_learner(ANIL, ANILHparams(inner_lr=0.3, inner_steps=2))
    r_maml, r_anil = maml.meta_learn(episodes), anil.meta_learn(episodes)
    assert r_maml.loss == pytest.approx(r_anil.loss, rel=1e-12)
    for a, b in zip(maml.parameters(), anil.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


# --- Second-order MAML against finite differences (Conv-4 with BatchNorm, float64) ---


def _post_adaptation_query_loss(model: nn.Module, episodes, lr: float, steps: int) -> float:
    """Mean query loss after in-place SGD on a deep copy (independent of the learner's code)."""
    total = 0.0
    for ep in episodes:
        m = copy.deepcopy(model)
        for _ in range(steps):
            loss = F.cross_entropy(m(ep.support_x), ep.support_y)
            grads = torch.autograd.grad(loss, list(m.parameters()))
            with torch.no_grad():
                for p, g in zip(m.parameters(), grads, strict=True):
                    p -= lr * g
        with torch.no_grad():
            total += F.cross_entropy(m(ep.query_x), ep.query_y).item()
    return total / len(episodes)


def test_maml_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    spec = BackboneSpec(in_channels=1, image_size=16, hidden=2)
    lr, steps = 0.3, 2
    learner = MAML(spec, 3, MAMLHparams(inner_lr=lr, inner_steps=steps)).double()
    gen = torch.Generator().manual_seed(1)
    episodes = [random_episode(3, 2, 2, gen, torch.float64) for _ in range(2)]
    result = learner.meta_learn(episodes)
    assert result.loss == pytest.approx(
        _post_adaptation_query_loss(learner.model, episodes, lr, steps), rel=1e-10
    )
    analytic, numeric = [], []
    h = 1e-6
    for p in learner.model.parameters():
        analytic.append(p.grad.flatten().clone())
        fd = torch.empty(p.numel(), dtype=torch.float64)
        flat = p.data.view(-1)
        for i in range(p.numel()):
            orig = flat[i].item()
            flat[i] = orig + h
            up = _post_adaptation_query_loss(learner.model, episodes, lr, steps)
            flat[i] = orig - h
            down = _post_adaptation_query_loss(learner.model, episodes, lr, steps)
            flat[i] = orig
            fd[i] = (up - down) / (2 * h)
        numeric.append(fd)
    a, n = torch.cat(analytic), torch.cat(numeric)
    assert n.norm() > 1e-3  # a non-trivial gradient
    assert ((a - n).norm() / n.norm()).item() < 1e-6


# --- Behaviour on a tiny Conv-4 --------------------------------------------------


def build(name: str, n_way: int = 3, **hparams) -> object:
    return build_algorithm(name, TINY, n_way, hparams)


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("n_way", [3, 4])
def test_adaptation_lowers_support_loss_and_keeps_theta(name, n_way):
    torch.manual_seed(0)
    learner = build(name, n_way=3)
    gen = torch.Generator().manual_seed(2)
    ep = random_episode(n_way, 2, 1, gen)
    before_state = {k: v.clone() for k, v in learner.state_dict().items()}
    with torch.no_grad():  # adapt must still adapt inside a caller's no_grad
        predictor = learner.adapt(ep.support_x, ep.support_y, n_way)
        logits = predictor(ep.support_x)
        after_loss = F.cross_entropy(logits, ep.support_y).item()
        if n_way == learner.n_way:
            before_loss = F.cross_entropy(learner.model(ep.support_x), ep.support_y).item()
        else:
            before_loss = math.log(n_way)  # a fresh zero head: uniform predictions
    assert logits.shape == (n_way * 2, n_way)
    assert after_loss < before_loss - 1e-4
    after_state = learner.state_dict()
    assert before_state.keys() == after_state.keys()
    for k, v in before_state.items():
        assert torch.equal(v, after_state[k]), k
    assert all(p.grad is None for p in learner.parameters())


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "metasgd", "reptile"])
def test_adapt_with_zero_steps_reproduces_theta(name):
    torch.manual_seed(0)
    learner = build(name, eval_inner_steps=0)
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    predictor = learner.adapt(x, torch.arange(3).repeat(2), 3)
    with torch.no_grad():
        assert torch.equal(predictor(x), learner.model(x))
    assert predictor is not learner.model
    assert not any(p.requires_grad for p in predictor.parameters())


def test_anil_adapt_changes_only_the_head_but_backbone_gets_outer_gradients():
    torch.manual_seed(0)
    learner = build("anil")
    gen = torch.Generator().manual_seed(2)
    ep = random_episode(3, 2, 2, gen)
    predictor = learner.adapt(ep.support_x, ep.support_y, 3)
    theta = dict(learner.model.named_parameters())
    for name, p in predictor.named_parameters():
        same = torch.equal(p, theta[name])
        assert same == (not name.startswith("head.")), name
    learner.meta_learn([ep])
    backbone_grads = [p.grad for p in learner.model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in backbone_grads)
    assert sum(g.abs().sum().item() for g in backbone_grads) > 0


def test_metasgd_step_sizes_receive_gradients():
    torch.manual_seed(0)
    learner = build("metasgd")
    gen = torch.Generator().manual_seed(2)
    learner.meta_learn([random_episode(3, 2, 2, gen) for _ in range(2)])
    assert len(learner.lrs) == len(list(learner.model.parameters()))
    for key, alpha in learner.lrs.items():
        assert alpha.grad is not None and torch.isfinite(alpha.grad).all(), key
        assert alpha.grad.abs().sum().item() > 0, key
    low, high = MetaSGDHparams().lr_init_low, MetaSGDHparams().lr_init_high
    assert all(((a >= low) & (a <= high)).all() for a in learner.lrs.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_same_seed_gives_same_weights_after_two_meta_steps(name, device):
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        learner = build(name).to(device)  # episodes stay on the CPU: the learner moves what it needs
        outer = torch.optim.Adam(learner.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(7)
        for _ in range(2):
            outer.zero_grad(set_to_none=True)
            learner.meta_learn([random_episode(3, 2, 2, gen) for _ in range(2)])
            outer.step()
        assert all(p.device.type == device for p in learner.parameters())
        return {k: v.cpu() for k, v in learner.state_dict().items()}

    first, second = run(), run()
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    torch.manual_seed(124)
    assert not all(torch.equal(v, build(name).state_dict()[k]) for k, v in first.items())


@pytest.mark.parametrize("name", ALGORITHMS)
def test_meta_learn_refuses_wrong_way_episodes(name):
    learner = build(name, n_way=3)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(EpisodeError, match=r"episode 1 is 4-way .* n_way=3"):
        learner.meta_learn([random_episode(3, 1, 1, gen), random_episode(4, 1, 1, gen)])
    with pytest.raises(EpisodeError, match="empty meta-batch"):
        learner.meta_learn([])


def test_registry_classes_declare_per_episode_batchnorm():
    classes = [MAML, FOMAML, Reptile, ANIL, MetaSGD]
    for name, cls in zip(ALGORITHMS, classes, strict=True):
        learner = build(name)
        assert type(learner) is cls and learner.name == name
        assert cls.track_running_stats is False
        bns = [m for m in learner.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.running_mean is None for m in bns)


def test_hparams_defaults_and_validation():
    assert MAMLHparams() == MAMLHparams(
        inner_lr=0.4, inner_steps=1, eval_inner_steps=3, first_order=False
    )
    assert ReptileHparams().inner_optimizer == "adam" and ReptileHparams().eval_inner_steps == 50
    with pytest.raises(ConfigError, match=r"reptile\.inner_optimizer: must be one of \['adam', 'sgd'\], found 'rmsprop'"):
        build("reptile", inner_optimizer="rmsprop")
    with pytest.raises(ConfigError, match=r"reptile\.inner_batch: must be 0 \(full batch\) or >= 2 .*, found 1"):
        build("reptile", inner_batch=1)
    with pytest.raises(ConfigError, match=r"reptile\.outer_step_size: must be >= 0 \(0 = Adam at meta_train\.meta_lr\), found -1\.0"):
        build("reptile", outer_step_size=-1.0)
    # A direct construction is refused the same way, naming the algorithm's params key.
    with pytest.raises(ConfigError, match=r"^meta_train\.hparams\.reptile\.inner_batch: must be 0"):
        ReptileHparams(inner_batch=-2)
    adam = build("reptile").outer_optimizer(3e-4)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 3e-4
    with pytest.raises(ConfigError, match=r"metasgd\.lr_init_low: must be <= lr_init_high \(0\.1\), found 0\.5"):
        build("metasgd", lr_init_low=0.5, lr_init_high=0.1)
    with pytest.raises(ConfigError, match="unknown key"):
        build("fomaml", first_order=False)


# --- A few meta-steps on a synthetic separable family of tasks ---------------------


def patch_images(positions: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """16x16 images: noise plus a bright 4x4 patch at one of 16 grid cells per image."""
    x = 0.3 * torch.rand(len(positions), 1, 16, 16, generator=gen)
    for i, cell in enumerate(positions.tolist()):
        r, c = divmod(cell, 4)
        x[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return x


def patch_episode(
    gen: torch.Generator, n_way: int = 3, k_shot: int = 1, n_query: int = 4
) -> Episode:
    """A task: n_way patch cells chosen at random, labelled in random order."""
    cells = torch.randperm(16, generator=gen)[:n_way]
    sy = torch.arange(n_way).repeat_interleave(k_shot)
    qy = torch.arange(n_way).repeat_interleave(n_query)
    return Episode(patch_images(cells[sy], gen), sy, patch_images(cells[qy], gen), qy, n_way)


def eval_accuracy(learner, episodes) -> float:
    accs = []
    for ep in episodes:
        predictor = learner.adapt(ep.support_x, ep.support_y, ep.n_way)
        with torch.no_grad():
            accs.append((predictor(ep.query_x).argmax(1) == ep.query_y).float().mean().item())
    return sum(accs) / len(accs)


FAST_HPARAMS = {
    "maml": {"inner_lr": 0.4, "eval_inner_steps": 1},
    "fomaml": {"inner_lr": 0.4, "eval_inner_steps": 1},
    "anil": {"inner_lr": 0.4, "eval_inner_steps": 1},
    "metasgd": {"lr_init_low": 0.3, "lr_init_high": 0.4},
    "reptile": {
        "inner_optimizer": "sgd",
        "inner_lr": 0.4,
        "inner_steps": 3,
        "eval_inner_steps": 3,
        "outer_step_size": 1.0,
    },
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_few_meta_steps_improve_query_accuracy(name):
    torch.manual_seed(0)
    learner = build(name, **FAST_HPARAMS[name])
    if name == "reptile":  # the paper's outer step: θ ← θ + ε(φ̄ − θ) with ε = 1
        outer = learner.outer_optimizer(0.02)
    else:
        outer = torch.optim.Adam(learner.parameters(), lr=0.02)
    eval_gen = torch.Generator().manual_seed(99)
    eval_eps = [patch_episode(eval_gen) for _ in range(20)]
    before = eval_accuracy(learner, eval_eps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        outer.zero_grad(set_to_none=True)
        learner.meta_learn([patch_episode(gen) for _ in range(4)])
        outer.step()
    after = eval_accuracy(learner, eval_eps)
    assert after >= before + 0.1, (before, after)
