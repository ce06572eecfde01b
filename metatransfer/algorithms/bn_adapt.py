"""BNAdapt: Baseline with BatchNorm statistics re-estimated on the target images.

Li, Wang, Shi, Liu & Hou (2016), "Revisiting Batch Normalization For
Practical Domain Adaptation" (AdaBN), https://arxiv.org/abs/1603.04779;
the transductive few-shot use follows Chen et al. (2019), "A Closer Look at
Few-shot Classification", ICLR 2019, https://arxiv.org/abs/1904.04232, for
the pre-training and the head.

Meta-training is Baseline's supervised pre-training. At `adapt` time a copy
of the backbone gets its BatchNorm running statistics reset and re-estimated
as a cumulative average (`momentum=None`) over the unlabelled target images
(the queries at evaluation) plus the support images, so that features of the
target domain are normalised with the target's own statistics instead of the
source's (the domain shift AdaBN corrects). The head is then fitted exactly
as Baseline does, on the features of the re-estimated copy. The learnt
weights θ are never changed.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from metatransfer.algorithms import _adapt, _support_fit
from metatransfer.algorithms.base import Hparams, Predictor
from metatransfer.algorithms.baseline import Baseline, BaselineHparams
from metatransfer.config import Bool


class BNAdaptHparams(BaselineHparams):
    """Baseline's hyper-parameters plus which images give the statistics.

    Attributes:
        include_support: also use the support images (not only `unlabeled_x`)
            for the statistics; without `unlabeled_x` the support alone is used.
    """

    error_where: ClassVar[str] = "meta_train.hparams.bn_adapt"
    include_support: Bool = True


class BNAdapt(Baseline):
    """Baseline whose adapted copy re-estimates BatchNorm statistics on target images."""

    name: ClassVar[str] = "bn_adapt"
    hparams_class: ClassVar[type[Hparams]] = BNAdaptHparams
    transductive: ClassVar[bool] = True

    def statistics_images(self, support: _adapt.Support) -> torch.Tensor:
        """The target images whose statistics the adapted copy takes (see BNAdaptHparams)."""
        parts = []
        if self.hparams.include_support or support.unlabeled_x is None:
            parts.append(support.x)
        if support.unlabeled_x is not None:
            parts.append(support.unlabeled_x)
        return torch.cat(parts)

    def adapt_support(self, support: _adapt.Support) -> Predictor:
        """Re-estimate BatchNorm statistics on the target images, then fit Baseline's head.

        Args:
            support: the checked support set; its `unlabeled_x` (the queries)
                give the statistics, the support images alone when it is None.

        Returns:
            A `FeatureClassifier` (eval mode, frozen) whose backbone carries
            the target statistics.
        """
        backbone = copy.deepcopy(self.backbone)
        _support_fit.reestimate_batchnorm(backbone, self.statistics_images(support))
        return self.fit_predictor(backbone, support)
