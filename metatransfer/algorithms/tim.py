"""TIM: Transductive Information Maximization (TIM-GD).

Boudiaf, Ziko, Rony, Dolz, Piantanida & Ben Ayed (2020), "Information
Maximization for Few-Shot Learning", NeurIPS 2020,
https://arxiv.org/abs/2008.11297 (reference code: github.com/mboudiaf/TIM).

Pre-training is Baseline's supervised cross-entropy over all source classes,
with label smoothing 0.1 as in the paper. At `adapt` time, on the frozen
backbone's L2-normalised features z (the paper's "L2N"):

- class weights W start at the support class means;
- logits are -temperature/2 * ||z - w_k||^2 (the reference code's "l2"
  classifier, temperature 15);
- W minimises  λ_CE · CE(support)  -  (λ_H · H(Y_Q)  -  λ_C · H(Y_Q | X_Q)),
  i.e. support cross-entropy minus the mutual information between the
  unlabelled queries and their predicted labels: the marginal entropy H(Y_Q)
  keeps predictions balanced over the classes, the conditional entropy
  H(Y_Q|X_Q) makes each query's prediction confident (the boundary moves out
  of dense query regions);
- TIM-GD: Adam on W, lr 1e-4, 1000 iterations; λ = (0.1, 1, 0.1) for
  (CE, H(Y), H(Y|X)) as in the paper's TIM-GD experiments.

Without unlabelled images the objective reduces to λ_CE · CE on the support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _support_fit, _metric
from metatransfer.algorithms.base import Hparams, Predictor
from metatransfer.algorithms.baseline import Baseline, PretrainHparams
from metatransfer.config import Float, Int, bounded


class TIMHparams(PretrainHparams):
    """TIM's hyper-parameters (defaults: the paper's TIM-GD values).

    Attributes:
        label_smoothing: pre-training label smoothing (0.1 in the paper).
        temperature: multiplies the logits (15).
        iters: Adam iterations on the weights per task (1000).
        lr: Adam learning rate (1e-4).
        ce_weight: λ of the support cross-entropy (0.1).
        marginal_weight: weight of the marginal entropy H(Y_Q) (1.0).
        conditional_weight: weight of the conditional entropy H(Y_Q|X_Q) (0.1).
    """

    error_where: ClassVar[str] = "meta_train.hparams.tim"
    label_smoothing: Float = bounded(0.1, ge=0, lt=1)
    temperature: Float = bounded(15.0, gt=0)
    iters: Int = bounded(1000, ge=0)
    lr: Float = bounded(1e-4, gt=0)
    ce_weight: Float = bounded(0.1, ge=0)
    marginal_weight: Float = bounded(1.0, ge=0)
    conditional_weight: Float = bounded(0.1, ge=0)


def tim_logits(features: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """TIM's logits -temperature/2 * ||z - w_k||^2 between features (B, D) and weights (N, D)."""
    return -0.5 * temperature * _metric.squared_distances(features, weights)


@dataclass(frozen=True)
class TIMObjective:
    """TIM's objective for one set of weights, with its parts (scalar tensors).

    Attributes:
        loss: the minimised objective λ_CE·CE - (λ_H·H(Y) - λ_C·H(Y|X))
            (differentiable in the weights).
        ce: support cross-entropy.
        marginal_entropy: H(Y_Q) of the mean query prediction (nats; 0 without queries).
        conditional_entropy: mean entropy of the query predictions (nats; 0 without queries).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    marginal_entropy: torch.Tensor
    conditional_entropy: torch.Tensor


def tim_objective(
    weights: torch.Tensor,
    support_z: torch.Tensor,
    support_y: torch.Tensor,
    query_z: torch.Tensor | None,
    hp: TIMHparams,
) -> TIMObjective:
    """TIM's objective for class weights `weights`.

    Args:
        weights: (N, D) class weights.
        support_z: (S, D) normalised support features; support_y (S,) labels.
        query_z: (Q, D) normalised unlabelled features, or None.
        hp: the weights of the three terms and the temperature.

    Returns:
        The objective and its parts.
    """
    ce = F.cross_entropy(tim_logits(support_z, weights, hp.temperature), support_y)
    if query_z is None or query_z.shape[0] == 0:
        marginal = conditional = ce.new_zeros(())
    else:
        log_p = F.log_softmax(tim_logits(query_z, weights, hp.temperature), dim=1)
        p = log_p.exp()
        conditional = -(p * log_p).sum(dim=1).mean()
        mean_p = p.mean(dim=0)
        # The reference code's epsilon-free log is NaN-prone when a class
        # gets no mass; 1e-12 changes nothing otherwise.
        marginal = -(mean_p * torch.log(mean_p + 1e-12)).sum()
    loss = hp.ce_weight * ce - (hp.marginal_weight * marginal - hp.conditional_weight * conditional)
    return TIMObjective(loss=loss, ce=ce, marginal_entropy=marginal, conditional_entropy=conditional)


def fit_tim(
    support_z: torch.Tensor,
    support_y: torch.Tensor,
    query_z: torch.Tensor | None,
    n_way: int,
    hp: TIMHparams,
) -> tuple[torch.Tensor, list[float]]:
    """TIM-GD on fixed, L2-normalised features: weights from support means, then Adam.

    Deterministic: no random initialisation and full-batch steps.

    Args:
        support_z: (S, D) normalised support features; support_y (S,) labels 0..n_way-1.
        query_z: (Q, D) normalised unlabelled features, or None.
        n_way: number of classes.
        hp: TIM's hyper-parameters.

    Returns:
        (the final (n_way, D) weights, detached; the objective before each of
        the `hp.iters` steps followed by the final value, hp.iters + 1 floats).
    """
    weights = _metric.class_means(support_z, support_y, n_way).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=hp.lr)
    # Kept as tensors and converted once at the end: no device sync per step.
    history: list[torch.Tensor] = []
    with torch.enable_grad():
        for _ in range(hp.iters):
            optimizer.zero_grad(set_to_none=True)
            loss = tim_objective(weights, support_z, support_y, query_z, hp).loss
            loss.backward()
            optimizer.step()
            history.append(loss.detach())
    with torch.no_grad():
        history.append(tim_objective(weights, support_z, support_y, query_z, hp).loss)
    return weights.detach(), torch.stack(history).tolist()


class TIMHead(nn.Module):
    """TIM's classifier on backbone features: L2-normalise, then -T/2 * ||z - w_k||^2.

    Args:
        weights: (n_way, D) class weights (stored as a frozen parameter).
        temperature: the logits' multiplier.
    """

    def __init__(self, weights: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weights.detach().clone(), requires_grad=False)
        self.temperature = float(temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_way) of raw backbone features (B, D)."""
        return tim_logits(F.normalize(features, dim=1), self.weight, self.temperature)


class TIM(Baseline):
    """TIM-GD over Baseline's supervised pre-training (see the module docstring)."""

    name: ClassVar[str] = "tim"
    hparams_class: ClassVar[type[Hparams]] = TIMHparams
    transductive: ClassVar[bool] = True

    def adapt_support(self, support: _adapt.Support) -> Predictor:
        """Run TIM-GD on the frozen features of the support and unlabelled images.

        Args:
            support: the checked support set; its `unlabeled_x` (the queries)
                give the mutual-information terms; None leaves only the
                support cross-entropy.

        Returns:
            A `FeatureClassifier` (eval mode, frozen) with a `TIMHead`; its
            `fit_losses` holds the objective along the iterations.
        """
        backbone = _support_fit.frozen_copy(self.backbone)
        support_z = F.normalize(_support_fit.extract_features(backbone, support.x), dim=1)
        query_z = None
        if support.unlabeled_x is not None:
            query_z = F.normalize(_support_fit.extract_features(backbone, support.unlabeled_x), dim=1)
        weights, losses = fit_tim(support_z, support.y, query_z, support.n_way, self.hparams)
        head = TIMHead(weights, self.hparams.temperature)
        return _support_fit.freeze(_support_fit.FeatureClassifier(backbone, head, losses))
