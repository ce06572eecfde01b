"""Baseline++: Baseline with a cosine-similarity classifier.

Chen, Liu, Kira, Wang & Huang (2019), "A Closer Look at Few-shot
Classification", ICLR 2019, https://arxiv.org/abs/1904.04232, section 3.2.

Same two stages as `Baseline` (supervised pre-training on all source
classes, then a new head fitted on the frozen support features), but both
heads score a feature x against class weights w_c by cosine similarity,
logit_c = scale * cos(x, w_c), which the paper shows reduces intra-class
variation of the learnt features.

The scale: the reference code multiplies the cosine by a fixed 2 (heads of
<= 200 classes) or 10 (Omniglot's > 1000 classes) *and* gives every class a
learnable norm (WeightNorm on the weights), so its effective scale is
learnt. We keep the cosine pure, so every logit is bounded by `scale`
(|logit| <= scale), and use 10 by default for both heads: the reference
code's Omniglot value (our main source), large enough for a softmax over
thousands of classes to become confident without a learnable norm.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms.base import Hparams
from metatransfer.algorithms.baseline import Baseline, BaselineHparams
from metatransfer.config import Float, bounded


class BaselinePPHparams(BaselineHparams):
    """Baseline's hyper-parameters plus the cosine scale.

    Attributes:
        scale: multiplies the cosine similarity (logits lie in [-scale, scale]).
    """

    error_where: ClassVar[str] = "meta_train.hparams.baselinepp"
    scale: Float = bounded(10.0, gt=0)


class CosineHead(nn.Module):
    """Cosine-similarity classifier: logit_c = scale * <x/|x|, w_c/|w_c|>.

    Args:
        in_dim: feature size.
        out_dim: number of classes.
        scale: fixed multiplier of the cosine (the logits' bound).
    """

    def __init__(self, in_dim: int, out_dim: int, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        # nn.Linear's initialisation: only the directions matter here.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, out_dim) of features (B, in_dim); a zero feature scores 0 everywhere."""
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        """Shape and scale, for print(model)."""
        return f"in_dim={self.weight.shape[1]}, out_dim={self.weight.shape[0]}, scale={self.scale}"


class BaselinePP(Baseline):
    """Chen et al.'s Baseline++: Baseline with cosine-similarity heads (see module docstring)."""

    name: ClassVar[str] = "baselinepp"
    hparams_class: ClassVar[type[Hparams]] = BaselinePPHparams

    def make_head(self, in_dim: int, out_dim: int) -> nn.Module:
        """A cosine head with the configured scale."""
        return CosineHead(in_dim, out_dim, self.hparams.scale)
