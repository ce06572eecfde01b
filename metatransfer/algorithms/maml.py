"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017).

θ is meta-learned so that a few gradient steps on a task's support set give
fast weights φ that do well on the task's query set:

    φ_t = θ − α ∇θ L_support_t(θ)          (inner loop, `inner_steps` times)
    θ  ← θ − β ∇θ mean_t L_query_t(φ_t)   (outer step, taken by the trainer)

The outer gradient differentiates through the inner steps (second order,
`create_graph=True`); `first_order=True` drops the second-order terms
(FOMAML, see `fomaml.py`). Defaults are the paper's Omniglot 5-way settings:
inner step size α = 0.4, one inner step in meta-training, three at test time.
BatchNorm uses per-batch statistics (see `_inner.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams, StepResult, episode_accuracy
from metatransfer.config import Bool, Float, Int
from metatransfer.episodes import Episode


class MAMLHparams(Hparams):
    """MAML's hyper-parameters (Finn et al. 2017, Omniglot 5-way defaults).

    Attributes:
        inner_lr: inner-loop SGD step size α.
        inner_steps: inner steps per task during meta-training.
        eval_inner_steps: inner steps in `adapt` (evaluation / target tasks).
        first_order: drop second-order terms (FOMAML).
    """

    error_where: ClassVar[str] = "meta_train.hparams.maml"
    inner_lr: Float = 0.4
    inner_steps: Int = 1
    eval_inner_steps: Int = 3
    first_order: Bool = False


class MAML(_inner.GradientLearner):
    """MAML with a Conv-4 (or other) backbone and a linear head.

    Args:
        backbone: backbone spec (built with per-batch BatchNorm statistics).
        n_way: head size for meta-training episodes.
        hparams: `MAMLHparams`.
        num_classes: unused (part of the common interface).
    """

    name = "maml"
    hparams_class = MAMLHparams
    hparams: MAMLHparams

    def _first_order(self) -> bool:
        return bool(self.hparams.first_order)

    def inner_step_size(self) -> _inner.StepSize:
        """The inner step size during meta-training (Meta-SGD: its learned α)."""
        return self.hparams.inner_lr

    def adapt_step_size(self, n_way: int) -> _inner.StepSize:
        """The step size of `adapted_weights` for an `n_way`-class support set (no graph to θ)."""
        return self.hparams.inner_lr

    def _task_fast_weights(
        self, params: _inner.FastWeights, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> _inner.FastWeights:
        """Fast weights φ for one task during meta-training (graph kept to θ)."""
        return _inner.adapt_sgd(
            self.model,
            params,
            support_x,
            support_y,
            steps=self.hparams.inner_steps,
            lr=self.inner_step_size(),
            create_graph=not self._first_order(),
        )

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Accumulate the meta-gradient of the mean post-adaptation query loss into `.grad`.

        Each task is adapted and back-propagated on its own (the loss divided by
        the number of tasks), so only one task's graph is alive at a time.

        Args:
            episodes: the meta-batch; every episode must be `self.n_way`-way.

        Returns:
            Mean query loss and accuracy of the adapted fast weights.
        """
        _inner.check_episodes(episodes, self.n_way, self.name)
        theta = _inner.parameters_of(self.model)
        n_tasks = len(episodes)
        total_loss = total_acc = 0.0
        for ep in episodes:
            sx, sy, qx, qy = _inner.episode_tensors(ep, self.device)
            fast = self._task_fast_weights(theta, sx, sy)
            loss, logits = _inner.loss_and_logits(self.model, fast, qx, qy)
            (loss / n_tasks).backward()
            total_loss += loss.item()
            total_acc += episode_accuracy(logits.detach(), qy)
        return StepResult(loss=total_loss / n_tasks, acc=total_acc / n_tasks)

    def adapted_weights(self, work: _inner.Classifier, x: torch.Tensor, y: torch.Tensor) -> _inner.FastWeights:
        """`eval_inner_steps` SGD steps of size `adapt_step_size` on the support loss, from `work`'s weights."""
        return _inner.sgd_detached(
            _inner.parameters_of(work),
            lambda fast: _inner.loss_and_logits(work, fast, x, y)[0],
            self.hparams.eval_inner_steps,
            self.adapt_step_size(work.head.out_features),
        )
