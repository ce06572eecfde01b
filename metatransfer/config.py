"""Typed, frozen configuration loaded from params.yaml.

One dataclass per top-level section (one section per pipeline stage, plus
shared keys). Loading refuses unknown keys and wrong types, naming the key
path, what was expected and what was found. Defaults live in params.yaml; the
dataclasses here only describe shape and types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from metatransfer.errors import ConfigError


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataParams:
    """Shared data settings.

    mirror: a local folder holding the official files (relative paths are
        relative to the project root). Empty means: download from the
        official URLs. The environment variable METATRANSFER_MIRROR overrides it.
    """

    mirror: str
    raw_dir: str
    prepared_dir: str


@dataclass(frozen=True)
class ImageFolderParams:
    """A user's own ImageFolder tree (`class/img.*` or `domain/class/img.*`)."""

    path: str
    role: str  # "source" (class-disjoint meta splits) or "target" (image splits)
    split_fractions: tuple[float, float, float]  # meta_train/meta_val/meta_test or train/val/test


@dataclass(frozen=True)
class FetchParams:
    """Which registered datasets to fetch into data/raw (names from the dataset registry)."""

    datasets: tuple[str, ...]


@dataclass(frozen=True)
class PrepareParams:
    """How raw files become the prepared store.

    omniglot_protocol: "background_evaluation" (background alphabets train,
        evaluation alphabets test) or "vinyals" (1200 characters meta-train,
        the remaining 423 meta-test).
    meta_val_classes: classes moved from meta_train to meta_val (source sets).
    """

    image_size: int
    channels: int
    omniglot_protocol: str
    meta_val_classes: int
    image_folders: dict[str, ImageFolderParams] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelParams:
    """The backbone (see metatransfer.models.BackboneSpec)."""

    name: str
    hidden: int


@dataclass(frozen=True)
class EpisodeSetParams:
    """One fixed evaluation episode set."""

    dataset: str
    split: str
    n_way: int
    shots: tuple[int, ...]
    n_query: int
    n_episodes: int


@dataclass(frozen=True)
class EpisodesParams:
    """Fixed evaluation episode files, keyed by set name."""

    sets: dict[str, EpisodeSetParams]


@dataclass(frozen=True)
class SourceMixParams:
    """A source dataset and its sampling weight for meta-training episodes."""

    dataset: str
    weight: float


@dataclass(frozen=True)
class MetaTrainParams:
    """Meta-training of every configured algorithm."""

    algorithms: tuple[str, ...]
    sources: tuple[SourceMixParams, ...]
    n_way: int
    k_shot: int
    n_query: int
    meta_batch_size: int
    steps: int
    time_budget_s: float
    meta_lr: float
    val_every: int
    val_episodes: int
    rotation_augment: bool
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Crash safety (defaults for params files written before these keys existed):
    # checkpoint every N steps (0: only at the end) and stop after K consecutive
    # non-finite steps.
    checkpoint_every: int = 50
    max_consecutive_faults: int = 5
    # Speed/accuracy levers (see metatransfer.training.meta_train.TrainSettings):
    # "constant" or "cosine" outer learning rate over the budget, "fp32" or
    # "bf16" autocast for the training step, channels-last 4-D weights.
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    precision: str = "fp32"  # one of PRECISIONS
    channels_last: bool = False


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class FinetuneParams:
    """Target adaptation starting from the meta-learned φ.

    targets: target datasets (prepared, with train/val/test splits).
    methods: learners whose φ initialises a target model: names from
        meta_train.algorithms, or "scratch" (random initialisation).
    shots_per_class: labelled target images per class used for fine-tuning
        (the data-scarce setting); drawn from the target's train split.
    val_per_class: validation images per class for early stopping and method
        selection (0 = the whole official val split).
    force_method: "" chooses by target validation accuracy; a name forces it.
    """

    targets: tuple[str, ...]
    methods: tuple[str, ...]
    shots_per_class: int
    val_per_class: int
    steps: int
    lr: float
    batch_size: int
    train_layers: str  # "all" or "head"
    eval_every: int
    patience: int
    force_method: str
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)


@dataclass(frozen=True)
class EvaluateParams:
    """Evaluation of every method on the fixed episode sets."""

    methods: tuple[str, ...]
    reference: str  # the fine-tuning baseline paired differences are taken against
    confidence: float


@dataclass(frozen=True)
class PromoteParams:
    """The promotion gate (metatransfer/registry.py, docs/registry.md).

    margin: minimum mean per-episode accuracy gain of the challenger over the reference.
    confidence: level of the paired interval of the per-episode difference.
    n_episodes: disjoint held-out episodes cut from each target's test split.
    baseline: finetune method whose target model a first champion must beat.
    """

    margin: float
    confidence: float
    n_episodes: int
    baseline: str


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    seed: int
    data: DataParams
    fetch: FetchParams
    prepare: PrepareParams
    model: ModelParams
    episodes: EpisodesParams | None = None
    meta_train: MetaTrainParams | None = None
    finetune: FinetuneParams | None = None
    evaluate: EvaluateParams | None = None
    promote: PromoteParams | None = None


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp` and convert containers; raise ConfigError naming `where`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {' / '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, found {type(value).__name__} ({value!r})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, found {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__} ({value!r})")
        return {
            _convert(k, key_tp, where): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, found {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, found {type(value).__name__} ({value!r})")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, found {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # a bug in this module, not the user's


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(raw).__name__} ({raw!r})")
    hints = get_type_hints(cls)
    flds = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(flds))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys: {sorted(flds)}"
        )
    kwargs = {}
    for name, f in flds.items():
        path = f"{where}.{name}" if where else name
        if name not in raw:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            if has_default:
                continue
            raise ConfigError(f"{path}: missing required key (expected {_type_name(hints[name])})")
        kwargs[name] = _convert(raw[name], hints[name], path)
    return cls(**kwargs)


def _check_ranges(p: Params) -> None:
    """Value checks that types alone cannot express."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(p.prepare.image_size >= 16, "prepare.image_size", f"must be >= 16, found {p.prepare.image_size}")
    need(p.prepare.channels in (1, 3), "prepare.channels", f"must be 1 or 3, found {p.prepare.channels}")
    need(
        p.prepare.omniglot_protocol in ("background_evaluation", "vinyals"),
        "prepare.omniglot_protocol",
        f"must be one of ['background_evaluation', 'vinyals'], found {p.prepare.omniglot_protocol!r}",
    )
    need(p.prepare.meta_val_classes >= 0, "prepare.meta_val_classes", f"must be >= 0, found {p.prepare.meta_val_classes}")
    for name, f in p.prepare.image_folders.items():
        key = f"prepare.image_folders.{name}"
        need(f.role in ("source", "target"), f"{key}.role", f"must be 'source' or 'target', found {f.role!r}")
        need(all(x >= 0 for x in f.split_fractions) and abs(sum(f.split_fractions) - 1) < 1e-6,
             f"{key}.split_fractions", f"must be three non-negative numbers summing to 1, found {list(f.split_fractions)}")
    if p.episodes is not None:
        for name, e in p.episodes.sets.items():
            key = f"episodes.sets.{name}"
            need(e.n_way >= 2, f"{key}.n_way", f"must be >= 2, found {e.n_way}")
            need(len(e.shots) >= 1 and all(k >= 1 for k in e.shots), f"{key}.shots", f"must be a non-empty list of integers >= 1, found {list(e.shots)}")
            need(e.n_query >= 1, f"{key}.n_query", f"must be >= 1, found {e.n_query}")
            need(e.n_episodes >= 2, f"{key}.n_episodes", f"must be >= 2 (a confidence interval needs two), found {e.n_episodes}")
    if p.meta_train is not None:
        m = p.meta_train
        for key in ("n_way", "k_shot", "n_query", "meta_batch_size", "val_every", "val_episodes"):
            need(getattr(m, key) >= 1, f"meta_train.{key}", f"must be >= 1, found {getattr(m, key)}")
        need(m.steps >= 0, "meta_train.steps", f"must be >= 0, found {m.steps}")
        need(m.checkpoint_every >= 0, "meta_train.checkpoint_every", f"must be >= 0 (0: only at the end), found {m.checkpoint_every}")
        need(m.max_consecutive_faults >= 1, "meta_train.max_consecutive_faults", f"must be >= 1, found {m.max_consecutive_faults}")
        need(m.meta_lr > 0, "meta_train.meta_lr", f"must be > 0, found {m.meta_lr}")
        need(m.lr_schedule in LR_SCHEDULES, "meta_train.lr_schedule",
             f"must be one of {list(LR_SCHEDULES)}, found {m.lr_schedule!r}")
        need(m.precision in PRECISIONS, "meta_train.precision",
             f"must be one of {list(PRECISIONS)}, found {m.precision!r}")
        need(m.n_way >= 2, "meta_train.n_way", f"must be >= 2, found {m.n_way}")
        need(len(m.sources) >= 1, "meta_train.sources", "must name at least one source dataset")
        need(all(s.weight > 0 for s in m.sources), "meta_train.sources", "every weight must be > 0")
        from metatransfer.algorithms import REGISTRY, algorithm_class

        for name in m.algorithms:
            need(name in REGISTRY, "meta_train.algorithms", f"unknown algorithm {name!r}; valid: {sorted(REGISTRY)}")
        for name, hp in m.hparams.items():
            need(name in REGISTRY, f"meta_train.hparams.{name}", f"unknown algorithm {name!r}; valid: {sorted(REGISTRY)}")
            algorithm_class(name).hparams_class.from_mapping(hp, f"meta_train.hparams.{name}")
    if p.finetune is not None:
        f = p.finetune
        need(f.train_layers in ("all", "head"), "finetune.train_layers", f"must be 'all' or 'head', found {f.train_layers!r}")
        for key in ("shots_per_class", "batch_size", "eval_every"):
            need(getattr(f, key) >= 1, f"finetune.{key}", f"must be >= 1, found {getattr(f, key)}")
        for key in ("steps", "patience", "val_per_class", "checkpoint_every"):
            need(getattr(f, key) >= 0, f"finetune.{key}", f"must be >= 0, found {getattr(f, key)}")
        need(f.lr > 0, "finetune.lr", f"must be > 0, found {f.lr}")
        known = set(p.meta_train.algorithms if p.meta_train else ()) | {"scratch"}
        for name in f.methods:
            need(name in known, "finetune.methods", f"{name!r} is neither meta-trained (meta_train.algorithms) nor 'scratch'; allowed: {sorted(known)}")
        need(not f.force_method or f.force_method in f.methods, "finetune.force_method",
             f"must be '' or one of finetune.methods {list(f.methods)}, found {f.force_method!r}")
    if p.promote is not None:
        g = p.promote
        need(g.margin >= 0, "promote.margin", f"must be >= 0 (a minimum gain), found {g.margin}")
        need(0 < g.confidence < 1, "promote.confidence", f"must be in (0, 1), found {g.confidence}")
        need(g.n_episodes >= 2, "promote.n_episodes", f"must be >= 2, found {g.n_episodes}")
        if p.finetune is not None:
            need(g.baseline in p.finetune.methods, "promote.baseline",
                 f"must be one of finetune.methods {list(p.finetune.methods)} (its target model is what a first "
                 f"champion must beat), found {g.baseline!r}")
    if p.evaluate is not None:
        need(0 < p.evaluate.confidence < 1, "evaluate.confidence", f"must be in (0, 1), found {p.evaluate.confidence}")


def params_from_mapping(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping and return the typed `Params`.

    Raises:
        ConfigError: naming the key path (prefixed by `source`), expected and found values.
    """
    try:
        params = _build(Params, raw, "")
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
    """Flatten params to dotted keys (for MLflow's log_params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}.{f.name}" if prefix else f.name, getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    walk("", params)
    return out


_ = typing  # typing is imported for get_type_hints on postponed annotations
