"""Numerical-fault recovery of the meta-training loop (`metatransfer.training.meta_train`).

A step whose loss, gradient or updated weight is not finite is skipped and the
learner and optimizer go back to their state after the last finite step;
`max_consecutive_faults` such steps in a row end the run with
`NumericalFaultError`. This module holds the two pieces the loop needs for
that: an exact finiteness check with one host sync, and the rollback state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from metatransfer.algorithms.base import MetaLearner
from metatransfer.errors import MetatransferError


class NumericalFaultError(MetatransferError):
    """Too many consecutive non-finite losses or gradients."""


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """True when no element of `tensors` (None entries skipped) is inf or NaN.

    Two fused kernels and one host sync for the whole list, not a sync per
    tensor. Exact by IEEE arithmetic alone: times 0, a finite element becomes
    0 and an inf or NaN becomes NaN, so the 1-norm of each product is 0 or
    NaN (a norm of the values themselves could overflow on finite ones).
    """
    present = [t.detach() for t in tensors if t is not None and t.numel() > 0]
    if not present:
        return True
    return bool(torch.stack(torch._foreach_norm(torch._foreach_mul(present, 0.0), 1)).isfinite().all())


class LastGood:
    """The learner's and optimizer's state after the last finite step, for the rollback after a fault.

    `save()` runs after every completed step; it refreshes tensors allocated
    once with one fused in-place copy (`torch._foreach_copy_`) instead of a
    deepcopy of both state_dicts (a new tensor and Python work per tensor per
    step). A copy cannot be avoided altogether: a step with finite gradients can
    still overflow a weight, and by the time that is seen the optimizer step has
    changed the weights and the optimizer's moments in place. The storage is
    reallocated only when the layout changes (Adam creates its moments in the
    first step). `restore()` (rare) goes through `load_state_dict` with fresh
    clones, so the optimizer never aliases the saved tensors.
    """

    def __init__(self, learner: MetaLearner, optimizer: torch.optim.Optimizer) -> None:
        self._learner, self._optimizer = learner, optimizer
        self._layout: tuple[tuple[Any, ...], ...] = ()
        self._saved: list[torch.Tensor] = []
        self._by_device: dict[torch.device, list[int]] = {}
        self._other: dict[tuple[str, Any], Any] = {}
        self._groups: list[dict[str, Any]] = []
        self.save()

    def _live(self) -> tuple[list[torch.Tensor], tuple[tuple[Any, ...], ...], dict[tuple[str, Any], Any], list[dict[str, Any]]]:
        """The live tensors (model state, then optimizer state), their layout, the non-tensor leaves, the param groups."""
        tensors: list[torch.Tensor] = []
        layout: list[tuple[Any, ...]] = []
        other: dict[tuple[str, Any], Any] = {}
        opt = self._optimizer.state_dict()
        leaves = [(("model", k), v) for k, v in self._learner.state_dict().items()]
        leaves += [(("optimizer", (pid, name)), v) for pid, entry in opt["state"].items() for name, v in entry.items()]
        for where, value in leaves:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                layout.append((where, value.shape, value.dtype, value.device))
            else:
                other[where] = copy.deepcopy(value)
        # state_dict() packs each group into a new dict: keeping it is a snapshot (lr is replaced, never mutated).
        return tensors, tuple(layout), other, opt["param_groups"]

    def save(self) -> None:
        """Record the current state (after a finite step)."""
        tensors, layout, self._other, self._groups = self._live()
        if layout != self._layout:
            self._layout = layout
            self._saved = [t.detach().clone() for t in tensors]
            self._by_device = {}
            for i, t in enumerate(tensors):
                self._by_device.setdefault(t.device, []).append(i)
            return
        with torch.no_grad():
            for idx in self._by_device.values():  # one fused copy per device (Adam's step counters live on the CPU)
                torch._foreach_copy_([self._saved[i] for i in idx], [tensors[i] for i in idx])

    def restore(self) -> None:
        """Put the learner and the optimizer back to the last `save()`."""
        model: dict[str, Any] = {}
        state: dict[Any, dict[str, Any]] = {}
        leaves = [(entry[0], t.clone()) for entry, t in zip(self._layout, self._saved)] + list(self._other.items())
        for (kind, key), value in leaves:
            if kind == "model":
                model[key] = value
            else:
                state.setdefault(key[0], {})[key[1]] = value if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        self._learner.load_state_dict(model)
        self._optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(self._groups)})
