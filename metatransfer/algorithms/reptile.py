"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning
Algorithms").

For each task, train a copy φ_t of θ for a few steps on the support set, then
move θ towards the mean adapted weights:

    φ_t = inner optimiser run for k steps from θ on support_t
    θ  ← θ + ε (mean_t φ_t − θ)

No gradient flows through the inner loop. To fit the shared trainer (which
steps the outer optimiser itself), `meta_learn` sets every θ's
`.grad = θ − mean_t φ_t`: an outer *SGD* step with learning rate ε is then
exactly the update above. `outer_optimizer(lr)` (used by the trainer when an
algorithm has one) gives that SGD when `outer_step_size` ε > 0 (the paper uses
ε = 1 for batched Reptile, linearly annealed to 0, which is not done here);
with the default ε = 0 it gives Adam at the trainer's `meta_train.meta_lr`,
the common "Reptile gradient into Adam" variant, which works with the small
meta learning rate shared by the other algorithms.

Inner optimiser: the paper's code uses Adam with β1 = 0 (β2 = 0.999,
eps = 1e-8) at learning rate 1e-3, the default here (`inner_optimizer="adam"`,
`torch.optim.Adam(betas=(0.0, 0.999))` over the fast weights); its moment
estimate restarts at zero for every task (the reference code kept
it across tasks, a side effect of its variable handling). `"sgd"` gives
plain SGD, whose update is easy to check by hand. Each inner step uses a
mini-batch of `inner_batch` support examples drawn without replacement from a
reshuffled cycle (the paper's `inner batch`; 0, or a value >= the support
size, means full batch). Defaults are the paper's Omniglot settings (5 inner
steps of batch 10 in training, 50 steps at evaluation; the paper's evaluation
batch of 5 is not separate here: one `inner_batch` serves both).

`meta_learn` reports the query loss and accuracy of each adapted φ_t on its
query set (computed without gradient; Reptile does not use the queries).
BatchNorm uses per-batch statistics (see `_inner.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import field_validator

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams, StepResult, episode_accuracy
from metatransfer.config import Float, Int, bounded
from metatransfer.episodes import Episode
from metatransfer.models import BackboneSpec

INNER_OPTIMIZERS = ("adam", "sgd")
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8
# adapt() draws its mini-batches from its own generator so that the predictor
# is a function of (θ, support set) only, whatever the global RNG state.
ADAPT_SEED = 0


class ReptileHparams(Hparams):
    """Reptile's hyper-parameters (Nichol et al. 2018, Omniglot defaults).

    Attributes:
        inner_lr: inner optimiser learning rate.
        inner_optimizer: "adam" (β1 = 0, as the paper's code) or "sgd".
        inner_steps: inner steps per task during meta-training.
        eval_inner_steps: inner steps in `adapt`.
        inner_batch: support examples per inner step (0 = full batch).
        outer_step_size: ε of the outer SGD step θ ← θ + ε(φ̄ − θ); 0 uses Adam
            at `meta_train.meta_lr` instead (see `Reptile.outer_optimizer`).
    """

    error_where: ClassVar[str] = "meta_train.hparams.reptile"
    inner_lr: Float = 1e-3
    inner_optimizer: Literal[INNER_OPTIMIZERS] = "adam"  # type: ignore[valid-type]
    inner_steps: Int = 5
    eval_inner_steps: Int = 50
    inner_batch: Int = 10
    outer_step_size: Float = bounded(0.0, ge=0, hint="0 = Adam at meta_train.meta_lr")

    @field_validator("inner_batch")
    @classmethod
    def _batch_of_two(cls, value: int) -> int:
        if value == 1 or value < 0:  # per-batch BatchNorm needs two examples
            raise ValueError(f"must be 0 (full batch) or >= 2 (BatchNorm uses batch statistics), found {value}")
        return value


def _batches(
    n: int, batch: int, steps: int, generator: torch.Generator | None
) -> list[torch.Tensor]:
    """Index batches for `steps` inner steps: a reshuffled cycle over n items."""
    if batch <= 0 or batch >= n:
        return [torch.arange(n)] * steps
    out: list[torch.Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            # Top up with a fresh permutation; the leftovers go first so every
            # example is seen before any is repeated.
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def inner_optimizer(
    params: list[torch.Tensor], optimizer: str, lr: float
) -> torch.optim.Optimizer:
    """The inner optimiser over fast weights: "sgd", or "adam" with β1 = 0 (the paper's code).

    Adam with β1 = 0 keeps no first moment (m_t = g_t, bias correction 1), so
    a step is φ ← φ − lr·g/(√v̂ + ε) with v ← β2·v + (1 − β2)·g², v̂ = v/(1 − β2^t):
    the update of the paper's code. A new optimiser per call restarts v at zero.
    """
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, ADAM_BETA2), eps=ADAM_EPS)
    return torch.optim.SGD(params, lr=lr)


def inner_train(
    model: torch.nn.Module,
    start: _inner.FastWeights,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    optimizer: str,
    batch: int,
    generator: torch.Generator | None = None,
) -> _inner.FastWeights:
    """Train a copy of `start` on (x, y) and return the final weights (no graph to `start`).

    Args:
        model: module giving the structure (run functionally: its own
            parameters are neither used nor changed).
        start: starting weights by name (not modified).
        x, y: the support set.
        steps: optimiser steps.
        lr: learning rate.
        optimizer: "sgd" or "adam" (β1 = 0), see `inner_optimizer`.
        batch: examples per step (0 = full batch).
        generator: RNG for the mini-batch order (None = torch's global RNG).

    Returns:
        The adapted weights φ (detached tensors).
    """
    fast = _inner.detached(start)
    opt = inner_optimizer(list(fast.values()), optimizer, lr)
    with torch.enable_grad():
        for idx in _batches(len(y), batch, steps, generator):
            idx = idx.to(y.device)
            opt.zero_grad(set_to_none=True)
            loss, _ = _inner.loss_and_logits(model, fast, x[idx], y[idx])
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in fast.items()}


class Reptile(_inner.GradientLearner):
    """Reptile with a Conv-4 (or other) backbone and a linear head (arguments as `MetaLearner`)."""

    name = "reptile"
    hparams_class = ReptileHparams
    hparams: ReptileHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)

    def outer_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimiser the trainer steps with the `.grad = θ − φ̄` set by `meta_learn`.

        Args:
            lr: the trainer's `meta_train.meta_lr`.

        Returns:
            SGD with learning rate `outer_step_size` when that is > 0 (so a step
            is exactly θ ← θ + ε(φ̄ − θ)), else Adam with learning rate `lr`.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.outer_step_size > 0:
            return torch.optim.SGD(params, lr=self.hparams.outer_step_size)
        return torch.optim.Adam(params, lr=lr)

    def _train_task(
        self,
        start: _inner.FastWeights,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        generator: torch.Generator | None,
    ) -> _inner.FastWeights:
        hp = self.hparams
        return inner_train(
            self.model, start, x, y, steps,
            lr=hp.inner_lr, optimizer=hp.inner_optimizer, batch=hp.inner_batch, generator=generator,
        )

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Set `.grad = θ − mean_t φ_t` for every parameter (see the module docstring).

        Args:
            episodes: the meta-batch; every episode must be `self.n_way`-way.

        Returns:
            Mean query loss and accuracy of the adapted φ_t (no gradient from them).
        """
        _inner.check_episodes(episodes, self.n_way, self.name)
        theta = _inner.parameters_of(self.model)
        phi_sum = {k: torch.zeros_like(v) for k, v in theta.items()}
        n_tasks = len(episodes)
        total_loss = total_acc = 0.0
        for ep in episodes:
            sx, sy, qx, qy = _inner.episode_tensors(ep, self.device)
            phi = self._train_task(theta, sx, sy, self.hparams.inner_steps, None)
            with torch.no_grad():
                loss, logits = _inner.loss_and_logits(self.model, phi, qx, qy)
                for k, v in phi.items():
                    phi_sum[k] += v
            total_loss += loss.item()
            total_acc += episode_accuracy(logits, qy)
        with torch.no_grad():
            for k, p in theta.items():
                p.grad = p.detach() - phi_sum[k] / n_tasks
        return StepResult(loss=total_loss / n_tasks, acc=total_acc / n_tasks)

    def adapted_weights(self, work: _inner.Classifier, x: torch.Tensor, y: torch.Tensor) -> _inner.FastWeights:
        """`eval_inner_steps` inner-optimiser steps on the support set, from `work`'s weights.

        Mini-batches come from a fixed-seed generator, so the result does not
        depend on the global RNG.
        """
        generator = torch.Generator().manual_seed(ADAPT_SEED)
        return self._train_task(_inner.parameters_of(work), x, y, self.hparams.eval_inner_steps, generator)
