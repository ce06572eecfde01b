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
from dataclasses import dataclass
from typing import ClassVar

import torch

from metatransfer.algorithms import _metric
from metatransfer.algorithms.base import Hparams, MetaLearner, Predictor, StepResult
from metatransfer.episodes import Episode
from metatransfer.models import BackboneSpec, build_backbone


@dataclass(frozen=True)
class ProtoNetHparams(Hparams):
    """ProtoNet has no hyper-parameters of its own (the paper's squared Euclidean metric)."""


class ProtoNet(MetaLearner):
    """Prototypical Network over any backbone from `build_backbone`.

    Attributes:
        backbone: the embedding network f_θ (images → (B, D)).
    """

    name: ClassVar[str] = "protonet"
    hparams_class: ClassVar[type[Hparams]] = ProtoNetHparams
    track_running_stats: ClassVar[bool] = True

    def __init__(
        self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0
    ) -> None:
        _metric.check_hparams(hparams, ProtoNetHparams, self.name)
        super().__init__(backbone, n_way, hparams, num_classes)
        self.backbone = build_backbone(backbone, track_running_stats=self.track_running_stats)

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
        embedded = _metric.embed_episodes(
            self.backbone, episodes, _metric.module_device(self), _metric.module_dtype(self)
        )
        logits = [
            self.logits(q, _metric.class_means(s, ep.support_y.to(s.device), ep.n_way))
            for (s, q), ep in zip(embedded, episodes)
        ]
        return _metric.cross_entropy_step(logits, episodes)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        unlabeled_x: torch.Tensor | None = None,
    ) -> Predictor:
        """Compute the prototypes once (eval mode, no grad) and return a nearest-prototype scorer.

        Args:
            support_x, support_y: the labelled support set (labels 0..n_way-1).
            n_way: number of classes.
            unlabeled_x: ignored (ProtoNet is inductive).

        Returns:
            images (B, C, H, W) → logits (B, n_way) = -||f(x) - c_k||².
        """
        _metric.check_labels(support_y, n_way, "adapt support_y")
        device, dtype = _metric.module_device(self), _metric.module_dtype(self)
        with _metric.eval_mode(self), torch.no_grad():
            emb = self.backbone(support_x.to(device=device, dtype=dtype))
            prototypes = _metric.class_means(emb, support_y.to(device), n_way)

        def predict(images: torch.Tensor) -> torch.Tensor:
            with _metric.eval_mode(self), torch.no_grad():
                return self.logits(self.backbone(images.to(device=device, dtype=dtype)), prototypes)

        return predict
