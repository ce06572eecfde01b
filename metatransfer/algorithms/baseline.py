"""Baseline: supervised pre-training on all source classes, then a new head per task.

Chen, Liu, Kira, Wang & Huang (2019), "A Closer Look at Few-shot
Classification", ICLR 2019, https://arxiv.org/abs/1904.04232 (reference code:
github.com/wyharveychen/CloserLookFewShot).

Meta-training is plain supervised learning: every image of a meta-batch (the
support and query sets of every episode) is classified among all
`num_classes` global source classes with a linear head and cross-entropy;
local episode labels are mapped to global ones through `Episode.classes`.

Adaptation follows the paper's fine-tuning stage: the backbone is frozen,
a new `n_way` head is trained on the support features with SGD (lr 0.01,
momentum 0.9, dampening 0.9, weight decay 0.001, mini-batches of 4, 100
passes over the support set, as `BaselineFinetune` in the reference code).
Because the backbone is frozen, its features are computed once. With
`finetune_backbone: true` the whole network (a copy) is fine-tuned instead,
with BatchNorm kept on its stored statistics (batches of 4 images are too
small to normalise with).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from metatransfer.algorithms import _adapt, _support_fit, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult, episode_accuracy
from metatransfer.config import Bool, Float, Int, bounded
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec, build_backbone


class PretrainHparams(Hparams):
    """Hyper-parameters of supervised pre-training (shared by Baseline, BNAdapt, TIM).

    Attributes:
        label_smoothing: cross-entropy label smoothing in [0, 1) (0 in Chen
            et al.; TIM's pre-training uses 0.1).
    """

    label_smoothing: Float = bounded(0.0, ge=0, lt=1)


class BaselineHparams(PretrainHparams):
    """Baseline's hyper-parameters; adaptation defaults are Chen et al.'s.

    Attributes:
        finetune_backbone: False: freeze the backbone and train only the new
            head (the paper); True: fine-tune a copy of the whole network.
        adapt_epochs: passes over the support set (the reference code's 100
            "epochs"; with 5-way 1-shot and batches of 4 that is 200 steps).
        adapt_batch_size: support images per SGD step (<= 0: full batch).
        adapt_lr, adapt_momentum, adapt_dampening, adapt_weight_decay: SGD settings.
        seed: seeds the new head's initialisation and the visiting order, so
            the same support set always gives the same predictor.
    """

    error_where: ClassVar[str] = "meta_train.hparams.baseline"
    finetune_backbone: Bool = False
    adapt_epochs: Int = bounded(100, ge=0)
    adapt_batch_size: Int = 4
    adapt_lr: Float = bounded(0.01, gt=0)
    adapt_momentum: Float = bounded(0.9, ge=0)
    adapt_dampening: Float = 0.9  # in [0, 1) unless adapt_momentum is 0 (below)
    adapt_weight_decay: Float = bounded(0.001, ge=0)
    seed: Int = 0

    @model_validator(mode="after")
    def _dampening_below_one(self) -> "BaselineHparams":
        if not (0 <= self.adapt_dampening < 1 or self.adapt_momentum == 0):
            raise ValueError(f"adapt_dampening: must be in [0, 1), found {self.adapt_dampening!r}")
        return self


def check_num_classes(num_classes: int, algorithm: str) -> None:
    """Refuse a missing or non-positive number of global source classes.

    Raises:
        ConfigError: `num_classes <= 0`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ConfigError(
            f"{algorithm}: supervised pre-training needs num_classes >= 1 (the number of global "
            f"classes in the meta-training split(s), x4 with rotation augmentation); found "
            f"{num_classes!r}. Build it with build_algorithm(..., num_classes=N)."
        )


def global_targets(episodes: Sequence[Episode], num_classes: int) -> torch.Tensor:
    """Global class ids of every image of a meta-batch, in support-then-query order per episode.

    Args:
        episodes: the meta-batch; each needs `classes` (its ways' global ids).
        num_classes: number of global classes (ids must lie in 0..num_classes-1).

    Returns:
        int64 (sum over episodes of S_i + Q_i,) = `classes[support_y]`, then
        `classes[query_y]`, episode after episode (the order of
        `_metric.embed_episodes`).

    Raises:
        ConfigError: an episode without `classes`, with the wrong number of
            them, or with an id outside 0..num_classes-1.
    """
    targets: list[torch.Tensor] = []
    for i, ep in enumerate(episodes):
        if ep.classes is None:
            raise ConfigError(
                f"episode {i}: `classes` is None, but supervised pre-training needs the global "
                "class id of every way; sample episodes with EpisodeSampler (it sets them)"
            )
        classes = torch.as_tensor(ep.classes, dtype=torch.int64).flatten()
        if classes.numel() != ep.n_way:
            raise ConfigError(
                f"episode {i}: `classes` has {classes.numel()} ids but n_way is {ep.n_way}; "
                "it needs one global id per way"
            )
        low, high = int(classes.min()), int(classes.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ConfigError(
                f"episode {i}: global class id {bad} is outside 0..{num_classes - 1} "
                f"(num_classes={num_classes}); num_classes must count every class of the "
                "meta-training split(s) (x4 with rotation augmentation)"
            )
        targets += [classes[ep.support_y.cpu()], classes[ep.query_y.cpu()]]
    return torch.cat(targets)


class Baseline(_adapt.SupportLearner):
    """Chen et al.'s Baseline: supervised pre-training, then a linear head per task.

    Attributes:
        backbone: the feature extractor θ (images → (B, D)).
        head: the `num_classes`-way pre-training head (unused by `adapt`).
    """

    name: ClassVar[str] = "baseline"
    hparams_class: ClassVar[type[Hparams]] = BaselineHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        check_num_classes(num_classes, self.name)
        self.backbone = build_backbone(backbone, track_running_stats=self.track_running_stats)
        self.head = self.make_head(self.backbone.out_dim, num_classes)

    def make_head(self, in_dim: int, out_dim: int) -> nn.Module:
        """A linear classifier head (in_dim → out_dim logits)."""
        return nn.Linear(in_dim, out_dim)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the cross-entropy over all global classes of every image of the batch.

        Args:
            episodes: the meta-batch; support and query images of every
                episode are all training images here, labelled with their
                global ids `classes[y]`.

        Returns:
            The back-propagated loss (with label smoothing when set) and the
            `num_classes`-way accuracy over every image of the batch (not a
            few-shot query accuracy: Baseline has no episodes to solve).

        Raises:
            ConfigError: episodes without valid global `classes`.
        """
        targets = global_targets(episodes, self.num_classes)
        device, dtype = _metric.module_device(self), _metric.module_dtype(self)
        embedded = _metric.embed_episodes(self.backbone, episodes, device, dtype)
        features = torch.cat([part for pair in embedded for part in pair])
        targets = targets.to(device)
        logits = self.head(features)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        loss.backward()
        return StepResult(loss=float(loss.detach()), acc=episode_accuracy(logits.detach(), targets))

    def adapt_support(self, support: _adapt.Support) -> Predictor:
        """Fit a new `n_way` head on the support set (on a copy of the backbone; inductive).

        Args:
            support: the checked support set (`unlabeled_x` is not used).

        Returns:
            A `FeatureClassifier` (eval mode, frozen): images → logits (B, n_way).
        """
        return self.fit_predictor(copy.deepcopy(self.backbone), support)

    def fit_predictor(self, backbone: nn.Module, support: _adapt.Support) -> _support_fit.FeatureClassifier:
        """Train a new head (and, with `finetune_backbone`, `backbone`) on the support set.

        Args:
            backbone: a copy owned by the caller (it is trained or frozen in place).
            support: the checked support set.

        Returns:
            The predictor, in eval mode with every parameter frozen; its
            `fit_losses` holds the loss of every SGD step.
        """
        hp = self.hparams
        x, y = support.x, support.y
        with _support_fit.seeded(hp.seed):
            head = self.make_head(self.backbone.out_dim, support.n_way)
        head = head.to(device=support.device, dtype=support.dtype)

        def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.SGD(
                params,
                lr=hp.adapt_lr,
                momentum=hp.adapt_momentum,
                dampening=hp.adapt_dampening if hp.adapt_momentum > 0 else 0.0,
                weight_decay=hp.adapt_weight_decay,
            )

        if hp.finetune_backbone:
            model = _support_fit.FeatureClassifier(backbone, head)
            for param in model.parameters():
                param.requires_grad_(True)
                param.grad = None
            model.train()
            _support_fit.set_batchnorm_eval(model)
            losses = _support_fit.fit(
                model, x, y, sgd(model.parameters()), hp.adapt_epochs, hp.adapt_batch_size, hp.seed
            )
        else:
            _support_fit.freeze(backbone)
            features = _support_fit.extract_features(backbone, x)
            head.train()
            losses = _support_fit.fit(
                head, features, y, sgd(head.parameters()), hp.adapt_epochs, hp.adapt_batch_size, hp.seed
            )
        return _support_fit.freeze(_support_fit.FeatureClassifier(backbone, head, losses))
