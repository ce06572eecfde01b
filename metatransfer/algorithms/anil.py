"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

MAML where the inner loop adapts only the linear head; the backbone is shared
across tasks and learned by the outer loop alone:

    (W_t, b_t) = head − α ∇head L_support_t(head; f_θ(support))     (inner)
    θ, head   ← outer step on mean_t L_query_t(W_t, b_t; f_θ(query))

The paper shows this matches MAML's accuracy, since MAML's gains come from
feature reuse rather than rapid learning in the body. The outer gradient
reaches the backbone through the query features and, with second order,
through the support features that the adapted head depends on. The support
features are computed once per task, so the inner loop costs only head
steps. Hyper-parameter defaults follow MAML's Omniglot 5-way settings, as the
paper does. BatchNorm uses per-batch statistics (see `_inner.py`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams
from metatransfer.algorithms.maml import MAML
from metatransfer.config import Bool, Float, Int


class ANILHparams(Hparams):
    """ANIL's hyper-parameters (MAML's Omniglot 5-way defaults, as in Raghu et al.).

    Attributes:
        inner_lr: head SGD step size α.
        inner_steps: head steps per task during meta-training.
        eval_inner_steps: head steps in `adapt`.
        first_order: drop second-order terms of the head updates.
    """

    error_where: ClassVar[str] = "meta_train.hparams.anil"
    inner_lr: Float = 0.4
    inner_steps: Int = 1
    eval_inner_steps: Int = 3
    first_order: Bool = False


class ANIL(MAML):
    """MAML adapting only the head in the inner loop."""

    name = "anil"
    hparams_class = ANILHparams
    hparams: ANILHparams  # type: ignore[assignment]

    def _task_fast_weights(
        self, params: _inner.FastWeights, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> _inner.FastWeights:
        """θ with the head adapted on the support features (graph kept to θ, backbone included).

        The support features are computed once; MAML's `meta_learn` then runs
        the query set through θ's backbone and the adapted head.
        """
        weight, bias = _inner.adapt_head(
            self.model.backbone(support_x),
            support_y,
            params["head.weight"],
            params["head.bias"],
            steps=self.hparams.inner_steps,
            lr=self.hparams.inner_lr,
            create_graph=not self._first_order(),
        )
        return {**params, "head.weight": weight, "head.bias": bias}

    def adapted_weights(self, work: _inner.Classifier, x: torch.Tensor, y: torch.Tensor) -> _inner.FastWeights:
        """`eval_inner_steps` SGD steps on a copy of the head over fixed features; the backbone stays θ's.

        A different `n_way` than `self.n_way` starts from a zero head (see
        `_inner.working_copy`).
        """
        params = _inner.parameters_of(work)
        with torch.no_grad():
            features = work.backbone(x)
        head = _inner.sgd_detached(
            {"weight": params["head.weight"], "bias": params["head.bias"]},
            lambda fast: _inner.head_loss(features, y, fast),
            self.hparams.eval_inner_steps,
            self.hparams.inner_lr,
        )
        return {**params, "head.weight": head["weight"], "head.bias": head["bias"]}
