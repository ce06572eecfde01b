"""Algorithm catalog: maps names used in params.yaml to implementations.

Each algorithm lives in its own file and registers itself here by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from metatransfer.algorithms.base import Hparams, MetaLearner, Predictor, StepResult
from metatransfer.config import Params, register_params_check
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec

# name -> "module:Class"; imported lazily so one broken file cannot break the rest.
CATALOG: dict[str, str] = {
    "maml": "metatransfer.algorithms.maml:MAML",
    "fomaml": "metatransfer.algorithms.fomaml:FOMAML",
    "reptile": "metatransfer.algorithms.reptile:Reptile",
    "anil": "metatransfer.algorithms.anil:ANIL",
    "metasgd": "metatransfer.algorithms.metasgd:MetaSGD",
    "protonet": "metatransfer.algorithms.protonet:ProtoNet",
    "matchingnet": "metatransfer.algorithms.matchingnet:MatchingNet",
    "relationnet": "metatransfer.algorithms.relationnet:RelationNet",
    "tadam": "metatransfer.algorithms.tadam:TADAM",
    "conditional": "metatransfer.algorithms.conditional:Conditional",
    "scratch": "metatransfer.algorithms.scratch:Scratch",
    "baseline": "metatransfer.algorithms.baseline:Baseline",
    "baselinepp": "metatransfer.algorithms.baselinepp:BaselinePP",
    "bn_adapt": "metatransfer.algorithms.bn_adapt:BNAdapt",
    "tim": "metatransfer.algorithms.tim:TIM",
}


def algorithm_class(name: str) -> type[MetaLearner]:
    """Return the class registered under `name`.

    Raises:
        ConfigError: unknown name; the message lists the valid names.
    """
    try:
        target = CATALOG[name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm {name!r}; valid: {', '.join(sorted(CATALOG))}"
        ) from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_algorithm(
    name: str,
    backbone: BackboneSpec,
    n_way: int,
    hparams: dict[str, Any] | None = None,
    num_classes: int = 0,
    where: str = "meta_train.hparams",
) -> MetaLearner:
    """Instantiate algorithm `name` with hyper-parameters validated from a mapping."""
    cls = algorithm_class(name)
    hp = cls.hparams_class.from_mapping(hparams, f"{where}.{name}")
    return cls(backbone=backbone, n_way=n_way, hparams=hp, num_classes=num_classes)


def check_params(params: Params) -> None:
    """The algorithm checks of params.yaml: every name in `meta_train.algorithms` and
    `meta_train.hparams` is registered, and each `hparams.<name>` mapping is valid for it.

    Registered with `metatransfer.config.register_params_check` when this package is
    imported, so `params_from_mapping` runs it (config cannot import the algorithms).

    Raises:
        ConfigError: naming the key, the unknown name and the valid ones, or the bad hyper-parameter.
    """
    m = params.meta_train
    if m is None:
        return
    for name in m.algorithms:
        if name not in CATALOG:
            raise ConfigError(f"meta_train.algorithms: unknown algorithm {name!r}; valid: {sorted(CATALOG)}")
    for name, hp in m.hparams.items():
        if name not in CATALOG:
            raise ConfigError(f"meta_train.hparams.{name}: unknown algorithm {name!r}; valid: {sorted(CATALOG)}")
        algorithm_class(name).hparams_class.from_mapping(hp, f"meta_train.hparams.{name}")


register_params_check(check_params)

__all__ = [
    "CATALOG",
    "Hparams",
    "MetaLearner",
    "Predictor",
    "StepResult",
    "algorithm_class",
    "build_algorithm",
    "check_params",
]
