"""First-order MAML (Finn, Abbeel & Levine, ICML 2017, section 5.2).

MAML with the inner-loop gradients treated as constants: the meta-gradient of
task t is the query-loss gradient evaluated at the adapted weights,

    g_t = ∇φ L_query_t(φ_t),   φ_t = θ − α ∇θ L_support_t(θ) (detached),

which skips back-propagation through the inner loop (no Hessian-vector
products). The paper reports nearly the same accuracy as second-order MAML on
Omniglot and MiniImagenet at about a third less compute.
"""

from __future__ import annotations

from typing import ClassVar

from metatransfer.algorithms.base import Hparams
from metatransfer.algorithms.maml import MAML
from metatransfer.config import Float, Int


class FOMAMLHparams(Hparams):
    """First-order MAML's hyper-parameters (the MAML paper's Omniglot 5-way defaults).

    Attributes:
        inner_lr: inner-loop SGD step size α.
        inner_steps: inner steps per task during meta-training.
        eval_inner_steps: inner steps in `adapt`.
    """

    error_where: ClassVar[str] = "meta_train.hparams.fomaml"
    inner_lr: Float = 0.4
    inner_steps: Int = 1
    eval_inner_steps: Int = 3


class FOMAML(MAML):
    """MAML without second-order terms; everything else as `MAML`."""

    name = "fomaml"
    hparams_class = FOMAMLHparams
    hparams: FOMAMLHparams  # type: ignore[assignment]

    def _first_order(self) -> bool:
        return True
