"""Invariants and exact values of the metric learners: ProtoNet, MatchingNet, RelationNet, TADAM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import algorithm_class, build_algorithm
from metatransfer.algorithms.matchingnet import MatchingNetHparams
from metatransfer.algorithms.protonet import ProtoNet
from metatransfer.algorithms.relationnet import RelationNetHparams
from metatransfer.algorithms.tadam import TADAM, TADAMHparams, film_batch_norm
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError, EpisodeError
from metatransfer.models import BackboneSpec

torch.set_num_threads(2)

METRIC = ["protonet", "matchingnet", "relationnet", "tadam"]
TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=8)


def quadrant_images(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """16x16 grey images whose class k (0..3) is a bright quadrant k on uniform noise."""
    images = torch.rand(len(labels), 1, 16, 16, generator=gen) * 0.4
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 2)
        images[i, 0, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 0.6
    return images


def quadrant_episode(gen: torch.Generator, n_way: int = 4, k_shot: int = 2, n_query: int = 5) -> Episode:
    """An N-way episode over quadrant classes, local labels a random permutation of the quadrants."""
    quadrants = torch.randperm(4, generator=gen)[:n_way]
    support_y = torch.arange(n_way).repeat_interleave(k_shot)
    query_y = torch.arange(n_way).repeat_interleave(n_query)
    return Episode(
        support_x=quadrant_images(quadrants[support_y], gen),
        support_y=support_y,
        query_x=quadrant_images(quadrants[query_y], gen),
        query_y=query_y,
        n_way=n_way,
        classes=quadrants,
    )


def build(name: str, n_way: int = 4, spec: BackboneSpec = TINY, **hparams: object):
    return build_algorithm(name, spec, n_way, dict(hparams))


def train(algo, episodes: list[Episode], lr: float = 1e-2) -> list[float]:
    """Meta-train with Adam, one episode per step; return the reported losses."""
    opt = torch.optim.Adam(algo.parameters(), lr=lr)
    algo.train()
    losses = []
    for ep in episodes:
        opt.zero_grad()
        losses.append(algo.meta_learn([ep]).loss)
        opt.step()
    return losses


def linear_embedding(in_dim: int, out_dim: int) -> nn.Module:
    """A fixed float64 flatten+linear embedding with hand-known weights."""
    layer = nn.Linear(in_dim, out_dim).double()
    with torch.no_grad():
        layer.weight.copy_(torch.arange(out_dim * in_dim, dtype=torch.float64).view(out_dim, in_dim).sin())
        layer.bias.copy_(torch.linspace(-0.5, 0.5, out_dim, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), layer)


def small_episode(seed: int = 0) -> Episode:
    """3-way, 2-shot, 2-query episode of 1x2x2 float64 'images' (4-dim inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64),
        support_y=torch.tensor([0, 1, 2, 0, 1, 2]),
        query_x=torch.randn(6, 1, 2, 2, generator=gen, dtype=torch.float64),
        query_y=torch.tensor([2, 1, 0, 0, 1, 2]),
        n_way=3,
    )


# ---------------------------------------------------------------- registry and config


@pytest.mark.parametrize("name", METRIC)
def test_registry_resolves_each_metric_learner(name: str) -> None:
    cls = algorithm_class(name)
    assert cls.name == name
    assert cls.track_running_stats is True
    assert cls.transductive is False


@pytest.mark.parametrize(
    ("name", "hparams", "fragment"),
    [
        ("protonet", {"distance": "cosine"}, "unknown key(s) ['distance']"),
        ("matchingnet", {"fce": 1}, "matchingnet.fce: expected bool"),
        ("matchingnet", {"fce_steps": 0}, "meta_train.hparams.matchingnet.fce_steps: must be >= 1, found 0"),
        ("relationnet", {"class_pool": "max"}, "relationnet.class_pool: must be one of ['sum', 'mean'], found 'max'"),
        ("relationnet", {"unpooled_blocks": 5}, "unpooled_blocks: expected 0..4, found 5"),
        ("tadam", {"metric_scale_init": 0.0}, "meta_train.hparams.tadam.metric_scale_init: must be > 0, found 0.0"),
    ],
)
def test_bad_hparams_are_refused_with_the_key_named(name: str, hparams: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, **hparams)
    assert fragment in str(err.value)


def test_wrong_hparams_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="protonet: hparams must be ProtoNetHparams, found TADAMHparams"):
        ProtoNet(TINY, 4, TADAMHparams())


def test_tadam_refuses_non_conv4_backbones_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="conv4 backbone only; model.name is 'resnet12'"):
        TADAM(BackboneSpec(name="resnet12", image_size=28), 5, TADAMHparams())


def test_hparam_defaults_are_the_documented_ones() -> None:
    assert MatchingNetHparams() == MatchingNetHparams(fce=False, fce_steps=5)
    assert RelationNetHparams() == RelationNetHparams(unpooled_blocks=1, fc_hidden=8, class_pool="sum")
    assert TADAMHparams() == TADAMHparams(metric_scale_init=1.0, learn_metric_scale=True, film_l2=0.01)
    assert build("protonet").config()["hparams"] == {}


# ---------------------------------------------------------------- episode checks


@pytest.mark.parametrize("name", METRIC)
def test_a_class_without_support_example_is_an_episode_error(name: str) -> None:
    ep = quadrant_episode(torch.Generator().manual_seed(0), n_way=3, k_shot=1)
    bad = Episode(ep.support_x, torch.tensor([0, 0, 1]), ep.query_x, ep.query_y, 3)
    algo = build(name, n_way=3)
    with pytest.raises(EpisodeError, match=r"episode 0 support_y: class\(es\) \[2\] have no support example"):
        algo.meta_learn([bad])
    with pytest.raises(EpisodeError, match=r"labels must lie in 0..1, found range 0..2"):
        algo.adapt(ep.support_x, ep.support_y, n_way=2)


# ---------------------------------------------------------------- ProtoNet


def test_protonet_logits_are_negative_squared_distances_to_class_means() -> None:
    algo = build("protonet", n_way=3)
    algo.backbone = linear_embedding(4, 3)
    ep = small_episode()
    emb = ep.support_x.flatten(1) @ algo.backbone[1].weight.detach().t() + algo.backbone[1].bias.detach()
    prototypes = [
        [sum(emb[i, d].item() for i in range(6) if ep.support_y[i] == k) / 2 for d in range(3)]
        for k in range(3)
    ]
    q_emb = ep.query_x.flatten(1) @ algo.backbone[1].weight.detach().t() + algo.backbone[1].bias.detach()
    expected = torch.tensor(
        [
            [-sum((q_emb[j, d].item() - prototypes[k][d]) ** 2 for d in range(3)) for k in range(3)]
            for j in range(6)
        ],
        dtype=torch.float64,
    )
    logits = algo.adapt(ep.support_x, ep.support_y, n_way=3)(ep.query_x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    # meta_learn reports the cross-entropy of exactly these logits and fills the gradients.
    result = algo.meta_learn([ep])
    ce = -sum(expected[j].log_softmax(0)[ep.query_y[j]].item() for j in range(6)) / 6
    assert result.loss == pytest.approx(ce, abs=1e-12)
    assert result.acc == pytest.approx((expected.argmax(1) == ep.query_y).double().mean().item())
    assert algo.backbone[1].weight.grad is not None and algo.backbone[1].weight.grad.abs().sum() > 0


def test_protonet_reaches_full_accuracy_on_a_separable_toy_problem() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    algo = build("protonet")
    train(algo, [quadrant_episode(gen) for _ in range(30)])
    # A new episode, evaluated with running BatchNorm statistics; also 3-way (other n_way than training).
    for n_way in (4, 3):
        test = quadrant_episode(torch.Generator().manual_seed(99), n_way=n_way, k_shot=1, n_query=10)
        logits = algo.adapt(test.support_x, test.support_y, n_way=n_way)(test.query_x)
        assert logits.shape == (n_way * 10, n_way)
        assert (logits.argmax(1) == test.query_y).all()


# ---------------------------------------------------------------- MatchingNet


def hand_attention(ep: Episode, embed: nn.Module) -> torch.Tensor:
    """p(y=k|x) = Σ_i softmax_i(cos(f(x), g(x_i))) [y_i = k], by explicit loops."""
    with torch.no_grad():
        s, q = embed(ep.support_x), embed(ep.query_x)
    rows = []
    for j in range(len(q)):
        cos = [
            (q[j] @ s[i]).item() / (q[j].norm().item() * s[i].norm().item()) for i in range(len(s))
        ]
        z = sum(math.exp(c) for c in cos)
        rows.append(
            [
                sum(math.exp(cos[i]) / z for i in range(len(s)) if ep.support_y[i] == k)
                for k in range(ep.n_way)
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)


def test_matchingnet_attention_is_softmax_of_cosines_summed_per_class() -> None:
    algo = build("matchingnet", n_way=3)
    algo.backbone = linear_embedding(4, 3)
    ep = small_episode()
    expected = hand_attention(ep, algo.backbone)
    log_p = algo.adapt(ep.support_x, ep.support_y, n_way=3)(ep.query_x)
    torch.testing.assert_close(log_p.exp(), expected, rtol=0, atol=1e-12)
    result = algo.meta_learn([ep])
    nll = -sum(math.log(expected[j, ep.query_y[j]].item()) for j in range(6)) / 6
    assert result.loss == pytest.approx(nll, abs=1e-12)


def test_matchingnet_fce_with_zero_lstm_weights_reduces_to_plain_cosine_attention() -> None:
    # With all LSTM weights 0: every gate is 1/2 and the cell input tanh(0) = 0, so c = h = 0
    # and both skip connections leave g(x_i) = g'(x_i), f(x̂) = f'(x̂).
    plain = build("matchingnet", n_way=3)
    fce = build("matchingnet", n_way=3, fce=True, fce_steps=3)
    plain.backbone = linear_embedding(4, 3)
    fce.backbone = linear_embedding(4, 3)
    fce.fce = type(fce.fce)(3, 3).double()
    with torch.no_grad():
        for p in fce.fce.parameters():
            p.zero_()
    ep = small_episode(seed=3)
    a = plain.adapt(ep.support_x, ep.support_y, 3)(ep.query_x)
    b = fce.adapt(ep.support_x, ep.support_y, 3)(ep.query_x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # With its initial (random) weights the context changes the embeddings and probabilities still sum to 1.
    fce.fce = type(fce.fce)(3, 3).double()
    c = fce.adapt(ep.support_x, ep.support_y, 3)(ep.query_x)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(c.exp().sum(1), torch.ones(6, dtype=torch.float64))


def test_matchingnet_fce_support_embedding_depends_on_the_rest_of_the_support_set() -> None:
    torch.manual_seed(0)
    algo = build("matchingnet", fce=True)
    s = torch.randn(4, TINY.hidden)
    other = s.clone()
    other[3] += 1.0
    g1, g2 = algo.fce.embed_support(s), algo.fce.embed_support(other)
    # the first item's full-context embedding changes although the item itself did not.
    assert not torch.allclose(g1[0], g2[0])


# ---------------------------------------------------------------- RelationNet


@pytest.mark.parametrize(("unpooled", "shape"), [(0, (8, 1, 1)), (1, (8, 2, 2)), (2, (8, 4, 4))])
def test_relationnet_embedding_skips_the_last_pools(unpooled: int, shape: tuple[int, int, int]) -> None:
    algo = build("relationnet", unpooled_blocks=unpooled)
    assert algo.embedding_shape == shape
    assert algo.embed(torch.rand(3, 1, 16, 16)).shape == (3, *shape)
    # the same parameter names as a Conv-4 backbone: weights transfer both ways
    assert {k for k in algo.state_dict() if k.startswith("backbone.")} == {
        "backbone." + k for k in build("protonet").backbone.state_dict()
    }


def test_relationnet_scores_are_probabilities_of_shape_queries_by_ways() -> None:
    torch.manual_seed(0)
    algo = build("relationnet", n_way=3, spec=BackboneSpec(image_size=28, hidden=16), unpooled_blocks=2)
    ep = quadrant_episode(torch.Generator().manual_seed(0), n_way=3, k_shot=2, n_query=4)
    images = F.interpolate(ep.query_x, size=28)
    scores = algo.adapt(F.interpolate(ep.support_x, size=28), ep.support_y, 3)(images)
    assert scores.shape == (12, 3)
    assert ((scores > 0) & (scores < 1)).all()


@pytest.mark.parametrize("train_mode", [True, False])
def test_relation_split_convolution_equals_concatenate_then_convolve(train_mode: bool) -> None:
    torch.manual_seed(0)
    algo = build("relationnet", unpooled_blocks=2).double()
    algo.relation.train(train_mode)
    class_maps = torch.randn(5, 8, 4, 4, dtype=torch.float64)
    query_maps = torch.randn(7, 8, 4, 4, dtype=torch.float64)
    fast = algo.relation(class_maps, query_maps)
    slow = algo.relation.forward_concat(class_maps, query_maps)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_relationnet_k_shot_class_maps_sum_or_average_the_support_maps(pool: str) -> None:
    algo = build("relationnet", class_pool=pool)
    maps = torch.arange(6 * 2, dtype=torch.float32).view(6, 2, 1, 1)
    labels = torch.tensor([1, 0, 1, 2, 0, 2])
    out = algo.class_maps(maps, labels, 3)
    by_class = [maps[labels == k] for k in range(3)]
    expected = torch.stack([m.sum(0) if pool == "sum" else m.mean(0) for m in by_class])
    assert torch.equal(out, expected)


def test_relationnet_loss_is_mse_of_scores_to_one_hot() -> None:
    torch.manual_seed(0)
    algo = build("relationnet").double()
    ep = quadrant_episode(torch.Generator().manual_seed(0))
    ep = Episode(ep.support_x.double(), ep.support_y, ep.query_x.double(), ep.query_y, ep.n_way)
    algo.eval()  # fixed BatchNorm statistics, so the scores can be recomputed identically
    result = algo.meta_learn([ep])
    with torch.no_grad():
        scores = algo.scores(algo.embed(ep.support_x), ep.support_y, 4, algo.embed(ep.query_x))
    onehot = F.one_hot(ep.query_y, 4).double()
    assert result.loss == pytest.approx(((scores - onehot) ** 2).mean().item(), abs=1e-12)
    assert algo.relation.fc2.weight.grad is not None


# ---------------------------------------------------------------- TADAM


@pytest.mark.parametrize("train_mode", [True, False])
def test_tadam_identity_film_reproduces_unconditioned_features_exactly(train_mode: bool) -> None:
    torch.manual_seed(0)
    algo = build("tadam")
    algo.train(train_mode)
    x = torch.rand(6, 1, 16, 16)
    identity = [(torch.ones(1, 8), torch.zeros(1, 8)) for _ in range(4)]
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    plain = algo.features(x)
    after_plain = {k: v.clone() for k, v in algo.state_dict().items()}
    algo.load_state_dict(before)
    filmed = algo.features(x, identity)
    assert torch.equal(plain, filmed)
    # and the running statistics move exactly as the plain BatchNorm moves them
    for key, value in algo.state_dict().items():
        assert torch.equal(value, after_plain[key]), key
    # per-image FiLM rows (the meta-batch path) give the same features up to rounding
    per_image = [(torch.ones(6, 8), torch.zeros(6, 8)) for _ in range(4)]
    algo.load_state_dict(before)
    torch.testing.assert_close(algo.features(x, per_image), plain, rtol=1e-5, atol=1e-6)


def test_film_batch_norm_equals_gamma_times_batch_norm_plus_beta() -> None:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    norm.eval()
    for gamma, beta in [(torch.randn(1, 3), torch.randn(1, 3)), (torch.randn(4, 3), torch.randn(4, 3))]:
        gamma, beta = gamma.double(), beta.double()
        expected = norm(x) * gamma[:, :, None, None] + beta[:, :, None, None]
        torch.testing.assert_close(film_batch_norm(norm, x, gamma, beta), expected, rtol=0, atol=1e-12)


def test_tadam_conditioning_changes_features_for_different_tasks() -> None:
    torch.manual_seed(0)
    algo = build("tadam").eval()
    gen = torch.Generator().manual_seed(0)
    a, b = quadrant_episode(gen), quadrant_episode(gen, k_shot=1)
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        film_a = algo.task_film(algo.features(a.support_x), a.support_y, 4)
        film_b = algo.task_film(algo.features(b.support_x), b.support_y, 4)
        # λ = 0 at initialisation: FiLM is the identity, as the paper's initialisation intends.
        for gamma, beta in film_a:
            assert torch.equal(gamma, torch.ones_like(gamma))
            assert torch.equal(beta, torch.zeros_like(beta))
        algo.ten.gamma_scale.fill_(1.0)
        algo.ten.beta_scale.fill_(1.0)
        film_a = algo.task_film(algo.features(a.support_x), a.support_y, 4)
        film_b = algo.task_film(algo.features(b.support_x), b.support_y, 4)
        fa, fb = algo.features(x, film_a), algo.features(x, film_b)
    assert not torch.allclose(fa, fb)
    assert not torch.allclose(fa, algo.features(x))


def test_tadam_task_representation_is_the_mean_of_the_class_prototypes() -> None:
    torch.manual_seed(0)
    algo = build("tadam", n_way=2).double()
    with torch.no_grad():
        algo.ten.gamma_scale.fill_(1.0)
        algo.ten.beta_scale.fill_(1.0)
    emb = torch.randn(4, 8, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])  # unbalanced: the prototype mean is not the embedding mean
    task = ((emb[:3].sum(0) / 3 + emb[3]) / 2).unsqueeze(0)
    with torch.no_grad():
        got, expected = algo.task_film(emb, labels, 2), algo.ten(task)
    for (g1, b1), (g2, b2) in zip(got, expected):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
        torch.testing.assert_close(b1, b2, rtol=0, atol=1e-12)


def test_tadam_at_initialisation_is_a_protonet_scaled_by_alpha() -> None:
    torch.manual_seed(0)
    tadam = build("tadam", metric_scale_init=2.5)
    proto = build("protonet")
    proto.backbone.load_state_dict(tadam.backbone.state_dict())
    ep = quadrant_episode(torch.Generator().manual_seed(0))
    a = tadam.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)
    b = proto.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)
    torch.testing.assert_close(a, 2.5 * b, rtol=1e-6, atol=1e-6)


def test_tadam_l2_penalty_pulls_the_film_multipliers_but_is_not_reported() -> None:
    torch.manual_seed(0)
    algo = build("tadam", film_l2=0.5).eval()
    with torch.no_grad():
        algo.ten.gamma_scale.fill_(0.2)
        for net in algo.ten.gamma_nets:  # G_l(Δ) = 0: the loss no longer depends on λ_γ
            net[2].weight.zero_()
            net[2].bias.zero_()
    ep = quadrant_episode(torch.Generator().manual_seed(0))
    result = algo.meta_learn([ep])
    torch.testing.assert_close(algo.ten.gamma_scale.grad, torch.full((4,), 2 * 0.5 * 0.2))
    logits = algo.adapt(ep.support_x, ep.support_y, 4)(ep.query_x)
    assert result.loss == pytest.approx(F.cross_entropy(logits, ep.query_y).item(), abs=1e-5)


# ---------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", METRIC)
def test_meta_batch_loss_is_the_mean_of_the_episode_losses(name: str) -> None:
    # eval mode: BatchNorm uses running statistics, so one forward over two episodes must
    # give each episode exactly what it gets alone.
    torch.manual_seed(0)
    algo = build(name).double().eval()
    if name == "tadam":
        with torch.no_grad():
            algo.ten.gamma_scale.fill_(0.5)
            algo.ten.beta_scale.fill_(0.5)
    gen = torch.Generator().manual_seed(0)
    eps = [quadrant_episode(gen, k_shot=k) for k in (1, 3)]
    eps = [Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y, e.n_way) for e in eps]
    single = [algo.meta_learn([e]) for e in eps]
    both = algo.meta_learn(eps)
    assert both.loss == pytest.approx((single[0].loss + single[1].loss) / 2, rel=1e-9)
    assert both.acc == pytest.approx((single[0].acc + single[1].acc) / 2)


@pytest.mark.parametrize("name", METRIC)
@pytest.mark.parametrize("start_training", [True, False])
def test_adapt_leaves_weights_and_train_eval_modes_unchanged(name: str, start_training: bool) -> None:
    torch.manual_seed(0)
    algo = build(name)
    train(algo, [quadrant_episode(torch.Generator().manual_seed(0))])  # non-trivial running stats
    algo.train(start_training)
    frozen = algo.backbone.encoder[0]
    frozen.eval()  # a sub-module deliberately in eval mode must stay so
    modes = {n: m.training for n, m in algo.named_modules()}
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    ep = quadrant_episode(torch.Generator().manual_seed(1))
    predict = algo.adapt(ep.support_x, ep.support_y, 4, unlabeled_x=ep.query_x)
    first = predict(ep.query_x)
    second = predict(ep.query_x[:3])  # a different batch (size) must not change the scores
    assert torch.allclose(first[:3], second, atol=1e-5)
    for key, value in algo.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert {n: m.training for n, m in algo.named_modules()} == modes
    assert not first.requires_grad


@pytest.mark.parametrize("name", METRIC)
def test_same_seed_gives_the_same_weights_and_steps(name: str) -> None:
    def run() -> tuple[dict[str, torch.Tensor], list[float]]:
        torch.manual_seed(7)
        algo = build(name)
        losses = train(algo, [quadrant_episode(torch.Generator().manual_seed(s)) for s in range(2)])
        return algo.state_dict(), losses

    (w1, l1), (w2, l2) = run(), run()
    assert l1 == l2
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    torch.manual_seed(8)
    other = build(name).state_dict()
    torch.manual_seed(7)
    key = "backbone.encoder.0.0.weight"
    assert not torch.equal(build(name).state_dict()[key], other[key])


@pytest.mark.parametrize(("name", "hparams"), [(n, {}) for n in METRIC] + [("matchingnet", {"fce": True})])
def test_loss_decreases_on_a_toy_task(name: str, hparams: dict) -> None:
    torch.manual_seed(0)
    algo = build(name, **hparams)
    ep = quadrant_episode(torch.Generator().manual_seed(0), k_shot=2, n_query=4)
    losses = train(algo, [ep] * 15)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
