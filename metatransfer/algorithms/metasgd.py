"""Meta-SGD (Li, Zhou, Chen & Li, 2017, "Meta-SGD: Learning to Learn Quickly
for Few-Shot Learning").

MAML with a learned, element-wise inner step size α of the same shape as every
parameter: both the initialisation θ and α are meta-learned,

    φ_t = θ − α ∘ ∇θ L_support_t(θ)
    (θ, α) ← outer step on mean_t L_query_t(φ_t)

α may take any sign, so it also learns the update direction. The paper adapts
with a single inner step in training and at test time, and initialises α
uniformly at random in [0.005, 0.1] (its regression set-up); both are the
defaults here. BatchNorm uses per-batch statistics (see `_inner.py`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import model_validator
from torch import nn

from metatransfer.algorithms import _inner
from metatransfer.algorithms.base import Hparams
from metatransfer.algorithms.maml import MAML
from metatransfer.config import Bool, Float, Int
from metatransfer.models import BackboneSpec


class MetaSGDHparams(Hparams):
    """Meta-SGD's hyper-parameters (Li et al. 2017).

    Attributes:
        lr_init_low, lr_init_high: α starts uniform in [low, high], element-wise.
        inner_steps: inner steps per task during meta-training (all with α).
        eval_inner_steps: inner steps in `adapt`.
        first_order: treat inner gradients as constants (α still gets gradients).
    """

    error_where: ClassVar[str] = "meta_train.hparams.metasgd"
    lr_init_low: Float = 0.005
    lr_init_high: Float = 0.1
    inner_steps: Int = 1
    eval_inner_steps: Int = 1
    first_order: Bool = False

    @model_validator(mode="after")
    def _low_below_high(self) -> "MetaSGDHparams":
        if self.lr_init_low > self.lr_init_high:
            raise ValueError(f"lr_init_low: must be <= lr_init_high ({self.lr_init_high}), found "
                             f"{self.lr_init_low}; swap them")
        return self


def lr_key(name: str) -> str:
    """The `MetaSGD.lrs` key of the step size of parameter `name` of `MetaSGD.model`."""
    # ParameterDict keys may not contain "."; "__" never occurs in module names here.
    return name.replace(".", "__")


class MetaSGD(MAML):
    """MAML with meta-learned per-parameter inner step sizes in `self.lrs` (arguments as `MetaLearner`)."""

    name = "metasgd"
    hparams_class = MetaSGDHparams
    hparams: MetaSGDHparams  # type: ignore[assignment]

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        low, high = self.hparams.lr_init_low, self.hparams.lr_init_high
        self.lrs = nn.ParameterDict(
            {
                lr_key(name): nn.Parameter(torch.empty_like(p).uniform_(low, high))
                for name, p in self.model.named_parameters()
            }
        )

    def step_sizes(self) -> dict[str, torch.Tensor]:
        """The learned α by parameter name of `self.model` (live parameters)."""
        return {name: self.lrs[lr_key(name)] for name, _ in self.model.named_parameters()}

    def inner_step_size(self) -> _inner.StepSize:
        """The learned α (live parameters: the outer gradient reaches them)."""
        return self.step_sizes()

    def adapt_step_size(self, n_way: int) -> _inner.StepSize:
        """A detached copy of α; for another `n_way` than `self.n_way`, the head's is its mean.

        The head then starts at zero (see `_inner.working_copy`) and the
        learned tensors of θ's head weight (resp. bias) do not fit its shape,
        so it takes their mean. θ and α are not modified.
        """
        lrs = {k: v.detach().clone() for k, v in self.step_sizes().items()}
        if n_way != self.n_way:
            for name in ("head.weight", "head.bias"):
                lrs[name] = lrs[name].mean()
        return lrs
