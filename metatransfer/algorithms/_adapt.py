"""The one `adapt` of the metric and fine-tuning learners.

ProtoNet, MatchingNet, RelationNet, TADAM (metric) and Scratch, Baseline,
Baseline++, BNAdapt, TIM (fine-tuning) all start `adapt` the same way: check
the support labels, move the support set (and any unlabelled target images)
to the learner's device and dtype, and only then do their own work. The
metric learners also end it the same way: the support set is embedded once
in eval mode without gradients, and the predictor runs the learner in eval
mode without gradients on images cast to the learner's device and dtype.

`SupportLearner.adapt` does the common start and hands a `Support` to the
learner's `adapt_support`; `MetricLearner.adapt_support` does the common end
around the learner's `support_scorer`. Construction is shared too:
`SupportLearner.__init__` refuses hyper-parameters of another class, and
`MetricLearner.__init__` builds the embedding network (`make_backbone`). A
learner keeps only what differs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metatransfer.algorithms import _metric
from metatransfer.algorithms.base import Hparams, MetaLearner, Predictor
from metatransfer.episodes import Episode
from metatransfer.models import BackboneSpec, build_backbone


@dataclass(frozen=True)
class Support:
    """A checked support set on the learner's device and in its dtype.

    Attributes:
        x: support images (S, C, H, W), on `device` in `dtype`.
        y: int64 support labels (S,) in 0..n_way-1, every class present, on `device`.
        n_way: number of classes.
        unlabeled_x: unlabelled target images (U, C, H, W) on `device` in
            `dtype`; None when the caller gave none or an empty tensor.
        device, dtype: where and in which precision the learner runs.
    """

    x: torch.Tensor
    y: torch.Tensor
    n_way: int
    unlabeled_x: torch.Tensor | None
    device: torch.device
    dtype: torch.dtype

    def cast(self, images: torch.Tensor) -> torch.Tensor:
        """`images` moved to the learner's device and dtype (the tensor itself when already there)."""
        return images.to(device=self.device, dtype=self.dtype)


def support_set(
    learner: MetaLearner,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    n_way: int,
    unlabeled_x: torch.Tensor | None = None,
) -> Support:
    """Check the support labels and move the support set to `learner`'s device and dtype.

    Args:
        learner: gives the device and dtype (of its first parameter) and its
            name, for messages.
        support_x, support_y: the labelled support set.
        n_way: number of classes.
        unlabeled_x: unlabelled target images, or None.

    Returns:
        The `Support`.

    Raises:
        EpisodeError: labels that are not int64 0..n_way-1 with every class
            present (the message starts "<algorithm> adapt support_y").
    """
    _metric.check_labels(support_y, n_way, f"{learner.name} adapt support_y")
    device, dtype = _metric.module_device(learner), _metric.module_dtype(learner)
    unlabeled = None
    if unlabeled_x is not None and unlabeled_x.shape[0] > 0:
        unlabeled = unlabeled_x.to(device=device, dtype=dtype)
    return Support(
        x=support_x.to(device=device, dtype=dtype),
        y=support_y.to(device),
        n_way=n_way,
        unlabeled_x=unlabeled,
        device=device,
        dtype=dtype,
    )


class SupportLearner(MetaLearner):
    """A learner whose `adapt` checks and moves the support set, then calls `adapt_support`.

    `__init__` refuses hyper-parameters that are not the learner's `hparams_class`.
    """

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        _metric.check_hparams(hparams, self.hparams_class, self.name)
        super().__init__(backbone, n_way, hparams, num_classes)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, unlabeled_x: torch.Tensor | None = None
    ) -> Predictor:
        """`MetaLearner.adapt` by `adapt_support` on the checked, moved support set.

        Returns:
            What `adapt_support` returns.

        Raises:
            EpisodeError: bad support labels (see `support_set`).
        """
        return self.adapt_support(support_set(self, support_x, support_y, n_way, unlabeled_x))

    @abstractmethod
    def adapt_support(self, support: Support) -> Predictor:
        """The learner's own adaptation to a checked support set; must not change θ."""


class MetricLearner(SupportLearner):
    """A learner that embeds the support set once and scores images against it.

    Both the embedding of the support set and every prediction run with the
    whole learner in eval mode (BatchNorm on its running statistics; every
    sub-module's own flag restored afterwards) and without gradients.

    Attributes:
        backbone: the embedding network f_θ (images → (B, D)), from `make_backbone`;
            built first, so a learner's own modules draw their initialisation after it.
    """

    backbone: nn.Module

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        self.backbone = self.make_backbone(backbone)

    def make_backbone(self, spec: BackboneSpec) -> nn.Module:
        """The embedding network for `spec`, BatchNorm per `track_running_stats`; a learner that
        needs a particular backbone overrides this (and refuses other specs there)."""
        return build_backbone(spec, track_running_stats=self.track_running_stats)

    def embed_episodes(
        self, episodes: Sequence[Episode], embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`_metric.embed_episodes` on the learner's device and dtype: one (support, query)
        embedding pair per episode, by `embed` (default: the backbone)."""
        return _metric.embed_episodes(
            self.backbone if embed is None else embed, episodes, _metric.module_device(self), _metric.module_dtype(self)
        )

    def adapt_support(self, support: Support) -> Predictor:
        """Build the scorer once, return a predictor that casts images and calls it.

        Args:
            support: the checked support set.

        Returns:
            images (B, C, H, W) → logits (B, n_way).
        """
        with _metric.eval_mode(self), torch.no_grad():
            score = self.support_scorer(support)

        def predict(images: torch.Tensor) -> torch.Tensor:
            with _metric.eval_mode(self), torch.no_grad():
                return score(support.cast(images))

        return predict

    @abstractmethod
    def support_scorer(self, support: Support) -> Predictor:
        """Embed `support` and return a scorer of images already on the device, in the dtype.

        Called in eval mode without gradients; so is the scorer.
        """
