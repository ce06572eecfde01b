"""Scratch: train a randomly initialised network on the support set alone.

The lower bound every transfer method must beat: no source data is used.
It is the "training from scratch" reference of the transfer-learning
literature (e.g. Yosinski, Clune, Bengio & Lipson (2014), "How transferable
are features in deep neural networks?", NeurIPS 2014,
https://arxiv.org/abs/1411.1792; Chen et al. (2019), "A Closer Look at
Few-shot Classification", ICLR 2019, https://arxiv.org/abs/1904.04232).

`adapt` builds a fresh backbone + linear head from `hparams.seed` (the same
initialisation for every task, independent of the global RNG), trains it
full-batch on the support set with Adam for `hparams.steps` steps
(BatchNorm on the support batch's statistics), then recomputes the
BatchNorm running statistics on the support set with the final weights, so
predictions in eval mode use the statistics the network was trained with
rather than a lagged running average.

Meta-training does nothing: `meta_learn` leaves every `.grad` as the
trainer set it (None after `zero_grad()`), so the outer optimizer step is a
no-op (torch optimizers skip parameters without a gradient), and reports
the query loss and accuracy of the untrained initialisation θ (in eval
mode, without gradients: about log N and 1/N), which is what Scratch
starts every task from. A trainer may skip meta-training it altogether.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _support_fit, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult, episode_accuracy
from metatransfer.config import Float, Int, bounded
from metatransfer.episodes import Episode
from metatransfer.errors import EpisodeError
from metatransfer.models import BackboneSpec, build_backbone


class ScratchHparams(Hparams):
    """Training from scratch on the support set.

    Attributes:
        steps: full-batch Adam steps on the support set.
        lr: Adam learning rate.
        weight_decay: Adam's L2 penalty.
        seed: seeds the initialisation (the same for every task).
    """

    error_where: ClassVar[str] = "meta_train.hparams.scratch"
    steps: Int = bounded(100, ge=0)
    lr: Float = bounded(1e-3, gt=0)
    weight_decay: Float = bounded(0.0, ge=0)
    seed: Int = 0


class Scratch(_adapt.SupportLearner):
    """A fresh network per task, trained on its support set only (see module docstring).

    Attributes:
        model: θ, the initialisation for `n_way` classes (never trained).
    """

    name: ClassVar[str] = "scratch"
    hparams_class: ClassVar[type[Hparams]] = ScratchHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        # θ exists so that the learner has parameters to save and an optimizer
        # to build; it equals initial_model(n_way) at construction.
        self.model = self.initial_model(n_way)

    def initial_model(self, n_way: int) -> _support_fit.FeatureClassifier:
        """The seeded initialisation (backbone + linear `n_way` head) every task starts from.

        Args:
            n_way: number of classes of the head.

        Returns:
            A new `FeatureClassifier` on CPU in eval mode; the backbone is the
            same for every `n_way` (it is built first from the same seed).
        """
        with _support_fit.seeded(self.hparams.seed):
            backbone = build_backbone(self.backbone_spec, track_running_stats=self.track_running_stats)
            head = nn.Linear(backbone.out_dim, n_way)
        return _support_fit.FeatureClassifier(backbone, head)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Report the untrained initialisation's query loss and accuracy; fill no gradient.

        Args:
            episodes: the meta-batch (each with `n_way` equal to the learner's).

        Returns:
            Mean query loss and accuracy of θ (eval mode) over the episodes.

        Raises:
            EpisodeError: an episode whose n_way differs from the head's.
        """
        device, dtype = _metric.module_device(self), _metric.module_dtype(self)
        losses, accs = [], []
        with _metric.eval_mode(self), torch.no_grad():
            for i, ep in enumerate(episodes):
                if ep.n_way != self.n_way:
                    raise EpisodeError(
                        f"scratch: episode {i} is {ep.n_way}-way but the learner was built for "
                        f"n_way={self.n_way}; meta-train with episodes of that size"
                    )
                y = ep.query_y.to(device)
                logits = self.model(ep.query_x.to(device=device, dtype=dtype))
                losses.append(float(F.cross_entropy(logits, y)))
                accs.append(episode_accuracy(logits, y))
        if not losses:
            raise EpisodeError("scratch: the meta-batch is empty; pass at least one Episode")
        return StepResult(loss=sum(losses) / len(losses), acc=sum(accs) / len(accs))

    def adapt_support(self, support: _adapt.Support) -> Predictor:
        """Train the seeded initialisation on the support set (full batch, Adam; inductive).

        Args:
            support: the checked support set (`unlabeled_x` is not used).

        Returns:
            A `FeatureClassifier` (eval mode, frozen); `fit_losses` holds the
            support loss of every step (the first one: the untrained model's).
        """
        hp = self.hparams
        model = self.initial_model(support.n_way).to(device=support.device, dtype=support.dtype)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        losses = _support_fit.fit(model, support.x, support.y, optimizer, hp.steps, 0, hp.seed)
        _support_fit.reestimate_batchnorm(model.backbone, support.x)
        model.fit_losses = losses
        return _support_fit.freeze(model)
