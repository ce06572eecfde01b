"""The one interface every meta-learning algorithm and baseline implements.

The meta-learner M(x, D; θ) → φ: an algorithm holds meta-parameters θ (an
`nn.Module`), improves them on batches of source episodes (`meta_learn`), and,
given a support set D, returns an adapted predictor (`adapt`), either a
fine-tuned copy of θ (gradient-based) or a metric classifier (metric-based).

Contract for `meta_learn` (the trainer relies on it):
- it is called with the module in train mode after the trainer has zeroed
  every `.grad` of `self.parameters()`;
- it fills `.grad` of the meta-parameters (by `loss.backward()` or by setting
  them, as Reptile does) and does NOT step an optimizer: the trainer checks the
  gradients are finite, clips, and steps the outer optimizer;
- it returns the meta-batch's mean query loss and accuracy as plain floats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from metatransfer.config import ConfigModel
from metatransfer.episodes import Episode
from metatransfer.models import BackboneSpec

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps images (B, C, H, W) to logits (B, n_way)."""


@dataclass(frozen=True)
class StepResult:
    """What one meta-training step reports (query loss/accuracy over the meta-batch)."""

    loss: float
    acc: float


class Hparams(ConfigModel):
    """Base of every algorithm's hyper-parameters: a frozen pydantic model (metatransfer/config/build.py).

    Subclasses add fields with defaults, typed `Int`/`Float`/`Bool`/`Str`, with `bounded`
    ranges and `Literal` choices, and set `error_where` to their params key
    ("meta_train.hparams.<name>"), which errors of a direct construction name.
    """

    error_where: ClassVar[str] = "meta_train.hparams"

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None, where: str) -> "Hparams":
        """Build from a params.yaml mapping, refusing unknown keys, wrong types and values out of range.

        Args:
            values: the mapping (None means all defaults).
            where: the params key path, for messages (e.g. "meta_train.hparams.maml").

        Raises:
            ConfigError: naming `<where>.<key>`, what was expected and what was found.
        """
        return cls.build(values or {}, where)

    @classmethod
    def step_size_keys(cls) -> list[str]:
        """This algorithm's own step-size hyper-parameters (field names), for hints.

        Read off the model's fields, so a hint can only name keys that exist:
        float fields called `lr`, `*_lr`, `lr_*` or `*step_size*`.
        """
        return [name for name, f in cls.model_fields.items()
                if f.annotation is float
                and (name == "lr" or name.endswith("_lr") or name.startswith("lr_") or "step_size" in name)]


def learning_rate_keys(algorithm: str, hparams_class: type[Hparams]) -> list[str]:
    """The params keys that set an algorithm's learning rates: the outer
    `meta_train.meta_lr` and its own step sizes under `meta_train.hparams.<algorithm>`.

    Args:
        algorithm: catalog name.
        hparams_class: its `Hparams` subclass.

    Returns:
        Dotted keys, e.g. ["meta_train.meta_lr", "meta_train.hparams.anil.inner_lr"];
        just the first for an algorithm without an inner step size (protonet).
    """
    return ["meta_train.meta_lr", *(f"meta_train.hparams.{algorithm}.{k}" for k in hparams_class.step_size_keys())]


class MetaLearner(nn.Module, ABC):
    """Base class of all algorithms: one file each under `metatransfer/algorithms/`.

    Args:
        backbone: the backbone spec; the algorithm builds its own backbone(s).
        n_way: number of classes of the training episodes (fixes head sizes
            for algorithms with a linear head).
        hparams: the algorithm's own `Hparams` subclass instance.
        num_classes: number of global classes in the meta-training split(s)
            (ids in `Episode.classes` are below it); only supervised
            pre-training baselines use it.
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type[Hparams]]
    # Which BatchNorm mode the backbone uses: False = per-episode batch statistics.
    track_running_stats: ClassVar[bool] = True
    # True: `adapt` uses unlabelled target images (`unlabeled_x`), e.g. the queries.
    transductive: ClassVar[bool] = False

    def __init__(
        self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0
    ) -> None:
        super().__init__()
        self.backbone_spec = backbone
        self.n_way = n_way
        self.hparams = hparams
        self.num_classes = num_classes

    @abstractmethod
    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Compute meta-gradients for one meta-batch (see the module docstring)."""

    @abstractmethod
    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, unlabeled_x: torch.Tensor | None = None
    ) -> Predictor:
        """Adapt to a support set (labels 0..n_way-1) and return a predictor of logits.

        Args:
            support_x, support_y: the labelled support set.
            n_way: number of classes (may differ from the training `n_way`).
            unlabeled_x: unlabelled target images (the queries at evaluation);
                only transductive algorithms use them, others ignore them.

        Must not change the meta-parameters θ of `self` (work on a copy).
        """

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this learner (stored beside the weights)."""
        from dataclasses import asdict

        return {
            "algorithm": self.name,
            "n_way": self.n_way,
            "num_classes": self.num_classes,
            "backbone": asdict(self.backbone_spec),
            "hparams": self.hparams.model_dump(),
        }


def episode_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return (logits.argmax(dim=1) == labels).float().mean().item()
