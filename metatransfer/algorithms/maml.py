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
from dataclasses import dataclass

import torch

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams, Predictor, StepResult, episode_accuracy
from metatransfer.episodes import Episode


@dataclass(frozen=True)
class MAMLHparams(Hparams):
    """MAML's hyper-parameters (Finn et al. 2017, Omniglot 5-way defaults).

    Attributes:
        inner_lr: inner-loop SGD step size α.
        inner_steps: inner steps per task during meta-training.
        eval_inner_steps: inner steps in `adapt` (evaluation / target tasks).
        first_order: drop second-order terms (FOMAML).
    """

    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False


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

    def _task_fast_weights(
        self, params: _inner.Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> _inner.Params:
        """Fast weights φ for one task during meta-training (graph kept to θ)."""
        return _inner.adapt_sgd(
            self.model,
            params,
            support_x,
            support_y,
            steps=self.hparams.inner_steps,
            lr=self.hparams.inner_lr,
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

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        unlabeled_x: torch.Tensor | None = None,
    ) -> Predictor:
        """Fine-tune a copy of θ with `eval_inner_steps` SGD steps on the support set.

        A support set with a different number of ways than `self.n_way` gets a
        fresh zero-initialised head (see `_inner.working_copy`). Runs with
        gradients enabled even inside `torch.no_grad()`; θ is not modified.

        Args:
            support_x, support_y: the labelled support set (labels 0..n_way-1).
            n_way: number of classes.
            unlabeled_x: ignored (not transductive beyond BatchNorm statistics).

        Returns:
            A frozen classifier (images → logits) holding the adapted weights.
        """
        work = _inner.working_copy(self.model, n_way)
        with torch.enable_grad():
            fast = _inner.detached(_inner.parameters_of(work))
            x, y = support_x.to(self.device), support_y.to(self.device)
            for _ in range(self.hparams.eval_inner_steps):
                fast = _inner.detached(
                    _inner.adapt_sgd(
                        work, fast, x, y, steps=1, lr=self.hparams.inner_lr, create_graph=False
                    )
                )
        return _inner.freeze_with(work, fast)
