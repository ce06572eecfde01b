"""TADAM: task-dependent adaptive metric.

Oreshkin, Rodríguez López & Lacoste (2018), "TADAM: Task dependent adaptive
metric for improved few-shot learning", NeurIPS 2018,
https://arxiv.org/abs/1805.10123.

A prototypical classifier with three changes from Snell et al. (2017):

- Metric scaling (paper section 2.1): logits = -α ||f(x) - c_k||² with a
  learnable temperature α (`metric_scale_init`).
- Task conditioning (section 2.2): the task representation Δ is the mean of
  the class prototypes computed by the *unconditioned* extractor; a task
  embedding network (TEN) maps Δ to a FiLM scale and shift per conv block,
  γ_l = 1 + λ_γ,l · G_l(Δ), β_l = λ_β,l · B_l(Δ), applied to the block's
  BatchNorm output before the ReLU. The post-multipliers λ start at 0 (the
  network starts as a plain ProtoNet) and carry an L2 penalty (`film_l2`,
  0.01 in the paper) so conditioning departs from identity only when it pays.
  Here G_l and B_l are two-layer perceptrons D → C_l → C_l with a ReLU.
- The extractor is then re-run with that FiLM on support and query images
  and the prototypes/logits are computed from the conditioned features.

FiLM is implemented for the Conv-4 backbone (a block-wise forward over its
`encoder` of [conv, BN, ReLU, max-pool] blocks); other backbones raise
ConfigError. The paper's auxiliary 64-way co-training task is not included.

BatchNorm keeps running statistics (`track_running_stats = True`): during
meta-training the unconditioned pass sees the meta-batch's support images and
the conditioned pass all its support and query images; `adapt` runs in eval
mode with the running averages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult
from metatransfer.config import Bool, Float, bounded
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError, EpisodeError
from metatransfer.models import BackboneSpec, build_backbone
from metatransfer.models.conv4 import Conv4

Film = list[tuple[torch.Tensor, torch.Tensor]]
"""Per conv block, (γ, β) of shape (B or 1, C_l): one row per image, or one for all."""


class TADAMHparams(Hparams):
    """TADAM hyper-parameters (paper defaults).

    Attributes:
        metric_scale_init: initial value of the learnable metric scale α.
        learn_metric_scale: learn α (True) or keep it fixed at its initial value.
        film_l2: weight of the L2 penalty on the FiLM post-multipliers λ
            (added to the back-propagated loss, not to the reported loss).
    """

    error_where: ClassVar[str] = "meta_train.hparams.tadam"
    metric_scale_init: Float = bounded(1.0, gt=0)
    learn_metric_scale: Bool = True
    film_l2: Float = bounded(0.01, ge=0)


def film_batch_norm(
    norm: nn.BatchNorm2d, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """BatchNorm followed by FiLM, γ ⊙ BN(x) + β, in one pass over the activations.

    γ(x̂ w + b) + β = x̂ (γ w) + (γ b + β): folding FiLM into the BatchNorm
    affine saves two full passes (and their backward) over every feature map,
    which at 28x28 cost as much as the first convolution. With one (γ, β) row
    (a single task) the folded scale/shift go straight into `F.batch_norm`,
    so γ = 1, β = 0 gives bit-for-bit the plain `norm(x)`; with one row per
    image (a meta-batch of tasks) one `addcmul` applies them. The running
    statistics are updated exactly as `nn.BatchNorm2d.forward` does.

    Args:
        norm: the block's BatchNorm2d (its statistics, affine and momentum are used).
        x: (B, C, h, w) convolution output.
        gamma, beta: (1, C) or (B, C).

    Returns:
        (B, C, h, w) modulated, normalised activations.
    """
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep = not norm.training or norm.track_running_stats
    mean, var = (norm.running_mean, norm.running_var) if keep else (None, None)
    weight = norm.weight if norm.weight is not None else x.new_ones(x.shape[1])
    bias = norm.bias if norm.bias is not None else x.new_zeros(x.shape[1])
    scale, shift = gamma * weight, gamma * bias + beta
    if gamma.shape[0] == 1:
        return F.batch_norm(x, mean, var, scale[0], shift[0], use_batch_stats, factor, norm.eps)
    normalised = F.batch_norm(x, mean, var, None, None, use_batch_stats, factor, norm.eps)
    return torch.addcmul(shift[:, :, None, None], normalised, scale[:, :, None, None])


def meta_batch_film(films: Sequence[Film], episodes: Sequence[Episode], device: torch.device) -> Film:
    """One FiLM for a meta-batch embedded in one pass (`_metric.embed_episodes`).

    One task: its (1, C) rows, folded into BatchNorm's affine. Several: each task's
    FiLM repeated over its own support + query images, in the order embed_episodes
    concatenates them.
    """
    if len(films) == 1:
        return films[0]
    counts = torch.tensor([ep.support_x.shape[0] + ep.query_x.shape[0] for ep in episodes], device=device)
    return [
        (
            torch.cat([f[layer][0] for f in films]).repeat_interleave(counts, dim=0),
            torch.cat([f[layer][1] for f in films]).repeat_interleave(counts, dim=0),
        )
        for layer in range(len(films[0]))
    ]


def film_meta_learn(
    learner: Any,
    episodes: Sequence[Episode],
    task_film: Callable[[torch.Tensor, torch.Tensor, Episode], Film],
    extra_loss: Callable[[], torch.Tensor],
) -> StepResult:
    """TADAM's meta-batch step (also the conditional learner's): two extractor passes, one backward.

    One unconditioned pass over every support image gives each task's FiLM
    (`task_film(support features, support labels, episode)`); one
    FiLM-conditioned pass over every support and query image, each task's FiLM
    repeated over its images (`meta_batch_film`), gives the prototypes and the
    query logits. The mean query cross-entropy plus `extra_loss()` (built last,
    after the forward passes) is back-propagated.

    Args:
        learner: a FiLM metric learner: `features(images, film)` and `logits(query_emb, prototypes)`.
        episodes: the meta-batch.

    Returns:
        Mean query cross-entropy (`extra_loss` excluded) and accuracy.
    """
    if not episodes:
        raise EpisodeError("meta_learn: the meta-batch is empty; pass at least one Episode")
    device, dtype = _metric.module_device(learner), _metric.module_dtype(learner)
    for i, ep in enumerate(episodes):
        _metric.check_labels(ep.support_y, ep.n_way, f"episode {i} support_y")
    support = torch.cat([ep.support_x for ep in episodes]).to(device=device, dtype=dtype)
    support_emb = learner.features(support).split([ep.support_x.shape[0] for ep in episodes])
    films = [task_film(emb, ep.support_y.to(device), ep) for emb, ep in zip(support_emb, episodes)]
    film = meta_batch_film(films, episodes, device)
    embedded = _metric.embed_episodes(lambda x: learner.features(x, film), episodes, device, dtype)
    logits = [
        learner.logits(q, _metric.class_means(s, ep.support_y.to(device), ep.n_way))
        for (s, q), ep in zip(embedded, episodes)
    ]
    return _metric.cross_entropy_step(logits, episodes, extra_loss=extra_loss())


class FilmHeads(nn.Module):
    """FiLM heads shared by TADAM's TEN and the conditional learner's generator: task vector → (γ, β) per block.

    γ_l = 1 + λ_γ,l G_l(t), β_l = λ_β,l B_l(t), with G_l, B_l two-layer MLPs
    and post-multipliers λ. A subclass calls `build_heads` where its own
    layers' initialisation order wants them.
    """

    def build_heads(self, in_dim: int, channels: Sequence[int]) -> None:
        """Create G_l, B_l (in_dim → C_l) and the post-multipliers λ for every conv block."""

        def mlp(width: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))

        self.gamma_nets = nn.ModuleList(mlp(c) for c in channels)
        self.beta_nets = nn.ModuleList(mlp(c) for c in channels)
        # Post-multipliers λ (paper: initialised at 0, L2-penalised): FiLM starts as identity.
        self.gamma_scale = nn.Parameter(torch.zeros(len(channels)))
        self.beta_scale = nn.Parameter(torch.zeros(len(channels)))

    def film(self, task: torch.Tensor) -> Film:
        """[(γ_l, β_l)], each (E, C_l), of task vectors (E, in_dim)."""
        return [
            (1.0 + self.gamma_scale[i] * g(task), self.beta_scale[i] * b(task))
            for i, (g, b) in enumerate(zip(self.gamma_nets, self.beta_nets))
        ]

    def penalty(self) -> torch.Tensor:
        """Σ λ² over the post-multipliers (the paper's L2 term, before its weight)."""
        return self.gamma_scale.pow(2).sum() + self.beta_scale.pow(2).sum()


class TaskEmbeddingNetwork(FilmHeads):
    """TEN: task representation Δ (E, D) → FiLM (γ, β) per conv block.

    Args:
        task_dim: width D of Δ (the backbone's feature size).
        channels: channels C_l of each conv block.
    """

    def __init__(self, task_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.build_heads(task_dim, channels)

    def forward(self, task: torch.Tensor) -> Film:
        """Return [(γ_l, β_l)] with γ_l = 1 + λ_γ,l G_l(Δ), β_l = λ_β,l B_l(Δ), each (E, C_l)."""
        return self.film(task)


class FilmLearner(_adapt.MetricLearner):
    """A prototypical network on a FiLM-conditioned Conv-4 with a metric scale α (TADAM, the conditional learner).

    `make_backbone` refuses any backbone but conv4 and builds it (first, in
    `MetricLearner.__init__`); a subclass then builds its FiLM head and calls
    `init_metric_scale`, so the head's initialisation draws follow the backbone's.

    Attributes:
        backbone: the Conv-4 feature extractor.
        metric_scale: α (a Parameter when learnt, a buffer otherwise).
    """

    backbone: Conv4
    metric_scale: torch.Tensor

    def make_backbone(self, spec: BackboneSpec) -> Conv4:
        """The Conv-4 that FiLM conditions.

        Raises:
            ConfigError: `spec` is not conv4.
        """
        if spec.name != "conv4":
            raise ConfigError(
                f"{self.name}: FiLM conditioning is implemented for the conv4 backbone only; model.name is "
                f"{spec.name!r}. Set model.name: conv4 or drop {self.name!r} from meta_train.algorithms"
            )
        built = build_backbone(spec, track_running_stats=self.track_running_stats)
        assert isinstance(built, Conv4)
        return built

    def block_channels(self) -> list[int]:
        """Channels C_l of each conv block: the widths of the FiLM parameters."""
        return [block[0].out_channels for block in self.backbone.encoder]

    def init_metric_scale(self, init: float, learn: bool) -> None:
        """α = `init`, a Parameter when `learn`, else a fixed buffer."""
        scale = torch.tensor(float(init))
        if learn:
            self.metric_scale = nn.Parameter(scale)
        else:
            self.register_buffer("metric_scale", scale)

    def features(self, images: torch.Tensor, film: Film | None = None) -> torch.Tensor:
        """Flattened Conv-4 features, FiLM-modulated after each block's BatchNorm.

        Args:
            images: (B, C, H, W).
            film: per block (γ, β), each (B, C_l) or (1, C_l); None = unconditioned
                (the plain backbone forward).

        Returns:
            (B, D) features; with one row γ = 1, β = 0, bit-for-bit the unconditioned ones.
        """
        if film is None:
            return self.backbone(images)
        x = images
        for block, (gamma, beta) in zip(self.backbone.encoder, film):
            conv, norm, relu, pool = block
            x = pool(relu(film_batch_norm(norm, conv(x), gamma, beta)))
        return x.flatten(1)

    def logits(self, query_emb: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Scaled negative squared distances -α ||q - c_k||² (Q, N)."""
        return -self.metric_scale * _metric.squared_distances(query_emb, prototypes)


class TADAM(FilmLearner):
    """Task-conditioned prototypical network with metric scaling (Conv-4 backbone).

    Attributes:
        backbone: the Conv-4 feature extractor.
        ten: the `TaskEmbeddingNetwork`.
        metric_scale: α (a Parameter when learnt, a buffer otherwise).
    """

    name: ClassVar[str] = "tadam"
    hparams_class: ClassVar[type[Hparams]] = TADAMHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        assert isinstance(hparams, TADAMHparams)
        self.ten = TaskEmbeddingNetwork(self.backbone.out_dim, self.block_channels())
        self.init_metric_scale(hparams.metric_scale_init, hparams.learn_metric_scale)

    def task_film(self, support_emb: torch.Tensor, support_y: torch.Tensor, n_way: int) -> Film:
        """FiLM (γ, β) of one task from its unconditioned support features: Δ = mean of prototypes."""
        task = _metric.class_means(support_emb, support_y, n_way).mean(0, keepdim=True)
        return self.ten(task)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the mean query cross-entropy (+ the FiLM L2 penalty).

        Two extractor passes for the whole meta-batch: unconditioned over the
        support images (task representations), then FiLM-conditioned over
        every support and query image, each task's FiLM repeated over its images.

        Args:
            episodes: the meta-batch.

        Returns:
            Mean query cross-entropy (penalty excluded) and accuracy.
        """
        hp = self.hparams
        assert isinstance(hp, TADAMHparams)
        return film_meta_learn(self, episodes, lambda emb, y, ep: self.task_film(emb, y, ep.n_way),
                               lambda: hp.film_l2 * self.ten.penalty())

    def support_scorer(self, support: _adapt.Support) -> Predictor:
        """Condition on the support set and compute prototypes once (the queries are not used).

        Args:
            support: the checked support set (`unlabeled_x` is not used: TADAM
                conditions on the labelled support only).

        Returns:
            images (B, C, H, W) → logits (B, n_way) = -α ||f(x | Δ) - c_k||².
        """
        film = self.task_film(self.features(support.x), support.y, support.n_way)
        prototypes = _metric.class_means(self.features(support.x, film), support.y, support.n_way)
        return lambda images: self.logits(self.features(images, film), prototypes)
