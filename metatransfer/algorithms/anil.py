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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams, Predictor, StepResult, episode_accuracy
from metatransfer.algorithms.maml import MAML
from metatransfer.episodes import Episode


@dataclass(frozen=True)
class ANILHparams(Hparams):
    """ANIL's hyper-parameters (MAML's Omniglot 5-way defaults, as in Raghu et al.).

    Attributes:
        inner_lr: head SGD step size α.
        inner_steps: head steps per task during meta-training.
        eval_inner_steps: head steps in `adapt`.
        first_order: drop second-order terms of the head updates.
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False


class ANIL(MAML):
    """MAML adapting only the head in the inner loop."""

    name = "anil"
    hparams_class = ANILHparams
    hparams: ANILHparams  # type: ignore[assignment]

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Accumulate the meta-gradient (backbone and head) of the mean query loss.

        Args:
            episodes: the meta-batch; every episode must be `self.n_way`-way.

        Returns:
            Mean query loss and accuracy with the adapted heads.
        """
        _inner.check_episodes(episodes, self.n_way, self.name)
        head = self.model.head
        n_tasks = len(episodes)
        total_loss = total_acc = 0.0
        for ep in episodes:
            sx, sy, qx, qy = _inner.episode_tensors(ep, self.device)
            weight, bias = _inner.adapt_head(
                self.model.backbone(sx),
                sy,
                head.weight,
                head.bias,
                steps=self.hparams.inner_steps,
                lr=self.hparams.inner_lr,
                create_graph=not self.hparams.first_order,
            )
            logits = F.linear(self.model.backbone(qx), weight, bias)
            loss = F.cross_entropy(logits, qy)
            (loss / n_tasks).backward()
            total_loss += loss.item()
            total_acc += episode_accuracy(logits.detach(), qy)
        return StepResult(loss=total_loss / n_tasks, acc=total_acc / n_tasks)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        unlabeled_x: torch.Tensor | None = None,
    ) -> Predictor:
        """Fit a copy of the head by `eval_inner_steps` SGD steps; the backbone stays θ's.

        A different `n_way` than `self.n_way` starts from a zero head (see
        `_inner.working_copy`). θ is not modified.

        Args:
            support_x, support_y: the labelled support set (labels 0..n_way-1).
            n_way: number of classes.
            unlabeled_x: ignored.

        Returns:
            A frozen classifier (images → logits): θ's backbone and the adapted head.
        """
        work = _inner.working_copy(self.model, n_way)
        params = _inner.detached(_inner.parameters_of(work))
        with torch.no_grad():
            features = work.backbone(support_x.to(self.device))
        with torch.enable_grad():
            weight, bias = params["head.weight"], params["head.bias"]
            for _ in range(self.hparams.eval_inner_steps):
                weight, bias = _inner.adapt_head(
                    features,
                    support_y.to(self.device),
                    weight,
                    bias,
                    steps=1,
                    lr=self.hparams.inner_lr,
                    create_graph=False,
                )
                weight = weight.detach().requires_grad_(True)
                bias = bias.detach().requires_grad_(True)
        params["head.weight"], params["head.bias"] = weight, bias
        return _inner.freeze_with(work, params)
