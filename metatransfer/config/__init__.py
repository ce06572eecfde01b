"""Typed, frozen configuration loaded from params.yaml.

One frozen pydantic model per top-level section (one section per pipeline
stage, plus shared keys). Loading refuses unknown keys, wrong types, values
out of range and unknown choices, naming the key path, what was expected and
what was found. Defaults live in params.yaml; the models here describe shape,
types, ranges and choices.

The sections are in data.py (data, fetch, prepare, episodes), training.py
(model, pretrain, meta_train, finetune) and params.py (runtime, evaluate,
promote and the top-level Params); build.py holds the model base, the field
types and the one translator of validation errors (`config_error`), and
checks.py the checks across keys. This module loads params.yaml and
re-exports every public name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from metatransfer.config.build import Bool, ConfigModel, Float, Int, Str, bounded, config_error
from metatransfer.config.checks import _sections_of_type as _sections_of_type  # for tests/unit/test_augment.py
from metatransfer.config.checks import (
    NPZ_NAME,
    _check_ranges,
    check_augment,
    register_params_check,
)
from metatransfer.config.data import (
    IMAGE_FOLDER_LAYOUTS,
    DataParams,
    DatasetShapeParams,
    DescriptionParams,
    EpisodeSetParams,
    EpisodesParams,
    FetchParams,
    ImageFolderParams,
    NpzFileParams,
    PrepareParams,
)
from metatransfer.config.params import (
    DEVICES,
    PRECISIONS,
    EvaluateParams,
    Params,
    PromoteParams,
    RuntimeParams,
)
from metatransfer.config.training import (
    LR_SCHEDULES,
    META_TRAIN_INITS,
    PRETRAIN_HEADS,
    AugmentParams,
    FinetuneParams,
    MetaTrainParams,
    ModelParams,
    PretrainedParams,
    PretrainParams,
    SourceMixParams,
    UnlabeledParams,
)
from metatransfer.errors import ConfigError

__all__ = [
    "DEVICES",
    "IMAGE_FOLDER_LAYOUTS",
    "LR_SCHEDULES",
    "META_TRAIN_INITS",
    "NPZ_NAME",
    "PRECISIONS",
    "PRETRAIN_HEADS",
    "AugmentParams",
    "Bool",
    "ConfigError",
    "ConfigModel",
    "DataParams",
    "DatasetShapeParams",
    "DescriptionParams",
    "EpisodeSetParams",
    "EpisodesParams",
    "EvaluateParams",
    "FetchParams",
    "FinetuneParams",
    "Float",
    "ImageFolderParams",
    "Int",
    "MetaTrainParams",
    "ModelParams",
    "NpzFileParams",
    "Params",
    "PrepareParams",
    "PretrainParams",
    "PretrainedParams",
    "PromoteParams",
    "RuntimeParams",
    "SourceMixParams",
    "Str",
    "UnlabeledParams",
    "bounded",
    "check_augment",
    "config_error",
    "flatten",
    "load_params",
    "params_from_mapping",
    "register_params_check",
]


def params_from_mapping(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping and return the typed `Params`.

    Runs the checks of this module and those registered by other layers
    (`register_params_check`; `metatransfer.algorithms` registers the algorithm checks).

    Raises:
        ConfigError: naming the key path (prefixed by `source`), expected and found values.
    """
    try:
        params = Params.build(raw)
        _check_ranges(params)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}. Fix the key in {source} and re-run.") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return params_from_mapping(raw, str(path))


def flatten(params: Params) -> dict[str, Any]:
    """Flatten params to dotted keys (for MLflow's log_params), in field order."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}.{name}" if prefix else name, getattr(value, name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    walk("", params)
    return out
