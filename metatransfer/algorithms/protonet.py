"""Prototypical Networks.

Snell, Swersky & Zemel (2017), "Prototypical Networks for Few-shot Learning",
NeurIPS 2017, https://arxiv.org/abs/1703.05175.

Each class is represented by the mean embedding of its support examples (its
prototype); a query's logits are the negative squared Euclidean distances to
the prototypes, trained with cross-entropy on the query set.

BatchNorm keeps running statistics (`track_running_stats = True`): the
backbone is trained on batches that hold the support and query images of
every episode of the meta-batch (one forward), and evaluated in eval mode
with the running averages, as in the paper's reference code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from metatransfer.algorithms import _adapt, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult
from metatransfer.episodes import Episode


class ProtoNetHparams(Hparams):
    """ProtoNet has no hyper-parameters of its own (the paper's squared Euclidean metric)."""

    error_where: ClassVar[str] = "meta_train.hparams.protonet"


class ProtoNet(_adapt.MetricLearner):
    """Prototypical Network over any backbone from `build_backbone`.

    Attributes:
        backbone: the embedding network f_θ (images → (B, D)).
    """

    name: ClassVar[str] = "protonet"
    hparams_class: ClassVar[type[Hparams]] = ProtoNetHparams

    def logits(self, query_emb: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Negative squared Euclidean distances (Q, N) from query embeddings to prototypes."""
        return -_metric.squared_distances(query_emb, prototypes)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the mean query cross-entropy of the meta-batch (one backbone forward).

        Args:
            episodes: the meta-batch.

        Returns:
            Mean query loss and accuracy over the episodes.
        """
        embedded = self.embed_episodes(episodes)
        logits = [
            self.logits(q, _metric.class_means(s, ep.support_y.to(s.device), ep.n_way))
            for (s, q), ep in zip(embedded, episodes)
        ]
        return _metric.cross_entropy_step(logits, episodes)

    def support_scorer(self, support: _adapt.Support) -> Predictor:
        """Compute the prototypes once; score images by -||f(x) - c_k||² (ProtoNet is inductive).

        Args:
            support: the checked support set (`unlabeled_x` is not used).

        Returns:
            images (B, C, H, W) → logits (B, n_way) = -||f(x) - c_k||².
        """
        prototypes = _metric.class_means(self.backbone(support.x), support.y, support.n_way)
        return lambda images: self.logits(self.backbone(images), prototypes)
