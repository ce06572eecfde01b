"""Typed, frozen configuration loaded from params.yaml.

One dataclass per top-level section (one section per pipeline stage, plus
shared keys). Loading refuses unknown keys and wrong types, naming the key
path, what was expected and what was found. Defaults live in params.yaml; the
dataclasses here only describe shape and types.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
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
    # "auto" (train|training|val|valid|validation|test|testing top-level folders
    # mean "split/class", else by file depth), "class", "split/class" or
    # "domain/class". With "split/class" the given split is kept and
    # split_fractions is not used (validation is carved by prepare.val_fraction).
    layout: str = "auto"


IMAGE_FOLDER_LAYOUTS = ("auto", "class", "split/class", "domain/class")


@dataclass(frozen=True)
class NpzFileParams:
    """A user's own MedMNIST-format .npz file, pinned by its SHA-256 (docs/guide.md, "Your own npz file").

    path: the file; relative paths are relative to the project root.
    sha256: the file's SHA-256 (64 hex digits, `sha256sum FILE`); prepare
        refuses a file with another checksum, and without it prints the digest
        to paste. It is the dataset's data version.
    role: "target" (the file's train/test (and val) splits are kept; without
        val arrays, prepare.val_fraction of each class's train images becomes
        val) or "source" (all images pooled; classes cut into
        meta_train/meta_val/meta_test by split_fractions).
    split_fractions: role source only: shares of the classes, in the order
        meta_train, meta_val, meta_test.
    class_names: names of labels 0, 1, ... (empty: "00", "01", ... like MedMNIST).
    """

    path: str
    sha256: str = ""
    role: str = "target"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchParams:
    """Which registered datasets to fetch into data/raw (names from the dataset registry)."""

    datasets: tuple[str, ...]


@dataclass(frozen=True)
class DescriptionParams:
    """A dataset's task description (`prepare.descriptions.<dataset>`; metatransfer/descriptions.py).

    Each key is optional; at least one must hold a word. The conditional
    meta-learner reads its tokens; no other stage uses it.
    """

    modality: str = ""
    anatomy: str = ""
    domain: str = ""
    text: str = ""


@dataclass(frozen=True)
class DatasetShapeParams:
    """One dataset's own stored shape (`prepare.per_dataset.<dataset>`; heterogeneous transfer).

    A key left out (None) takes the `prepare` value. A target stored at its own
    channels or size is fed to the backbone through an input adapter during
    fine-tuning (metatransfer/models/adapter.py); source datasets, which train
    the backbone, keep `prepare.channels` x `prepare.image_size`.
    """

    channels: int | None = None
    image_size: int | None = None


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
    # The user's own MedMNIST-format npz files, each pinned by its sha256.
    npz_files: dict[str, NpzFileParams] = field(default_factory=dict)
    # Share of each class's training images carved (stratified, seeded) into
    # `val` for datasets that come with a train/test split but no validation
    # split (brain_tumor_mri, ham10000_mel_nv, split/class image folders).
    val_fraction: float = 0.1
    # Optional task descriptions, by prepared dataset name: written beside its
    # images as description.json (only for a described dataset).
    descriptions: dict[str, DescriptionParams] = field(default_factory=dict)
    # Datasets stored at their own channels and/or size instead of channels x
    # image_size (targets only; docs/guide.md, "Different channels or sizes").
    per_dataset: dict[str, DatasetShapeParams] = field(default_factory=dict)

    def shape_of(self, dataset: str) -> tuple[int, int]:
        """(channels, image_size) that `dataset` is stored at: its `per_dataset` entry, else the defaults."""
        own = self.per_dataset.get(dataset) or DatasetShapeParams()
        return (self.channels if own.channels is None else own.channels,
                self.image_size if own.image_size is None else own.image_size)


@dataclass(frozen=True)
class PretrainedParams:
    """External backbone weights (docs/models.md): a safetensors file and its SHA-256.

    path: relative paths are relative to the project root (the folder of
        params.yaml). Nothing is downloaded at run time.
    sha256: 64 hex digits; a file with another checksum is refused.
    """

    path: str
    sha256: str


@dataclass(frozen=True)
class ModelParams:
    """The backbone (see metatransfer.models.BackboneSpec).

    stem: resnet18 only: "imagenet" (7x7 stride 2 + max-pool), "small"
        (same 7x7 conv at stride 1, no max-pool) or "auto" (small below 64 px).
    pretrained: initial backbone weights from a file (None: random init).
    """

    name: str
    hidden: int
    stem: str = "auto"
    pretrained: PretrainedParams | None = None


@dataclass(frozen=True)
class AugmentParams:
    """Training-time augmentation of image batches (metatransfer/augment.py).

    Used under `finetune.augment` and `pretrain.augment`. Each enabled step
    draws its randomness per image from a seeded torch.Generator.

    enabled: False returns batches unchanged (every other key is then unused).
    crop_scale: (min, max) share of the image area a random resized crop keeps,
        0 < min <= max <= 1; (1, 1) with crop_ratio (1, 1) disables cropping.
    crop_ratio: (min, max) aspect ratio (width / height) of the crop,
        0 < min <= max.
    hflip: flip each image left-right with probability 1/2.
    color_jitter: strength s in [0, 1): brightness, contrast and saturation
        factors drawn uniformly from [1 - s, 1 + s] (saturation: 3 channels
        only); 0 disables it.
    """

    enabled: bool = False
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    color_jitter: float = 0.2


@dataclass(frozen=True)
class EpisodeSetParams:
    """One fixed evaluation episode set."""

    dataset: str
    split: str
    n_way: int
    shots: tuple[int, ...]
    n_query: int
    n_episodes: int
    # Classes of the split with fewer images are left out of the set's episodes
    # (a WARNING lists them; the episode file records them); 0 keeps every class.
    min_images_per_class: int = 0


@dataclass(frozen=True)
class EpisodesParams:
    """Fixed evaluation episode files, keyed by set name."""

    sets: dict[str, EpisodeSetParams]


@dataclass(frozen=True)
class SourceMixParams:
    """A source dataset and its sampling weight for meta-training episodes.

    k_shot / n_query: this source's episode shape (None: meta_train.k_shot /
        meta_train.n_query); n_way is shared by every source.
    min_images_per_class: classes of this source's meta_train split with fewer
        images are never drawn (a WARNING lists them); 0 keeps every class.
    """

    dataset: str
    weight: float
    k_shot: int | None = None
    n_query: int | None = None
    min_images_per_class: int = 0


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
    # Deprecated: moved to runtime.precision ("" = use runtime.precision; a value
    # from an older params file still wins, with a warning).
    precision: str = ""
    channels_last: bool = False
    # Where θ's backbone starts: "scratch" (random), "pretrain" (the
    # `pretrain` stage's backbone, models/pretrain) or "pretrained_file"
    # (model.pretrained only).
    init: str = "scratch"
    # Optional wall-clock guard per algorithm (seconds of training, validation
    # excluded); 0 = off. Steps are the budget: a run this guard ends is not
    # reproducible and is marked (MLflow tag budget_hit=time, a WARNING line,
    # `budget_hit` in metrics/meta_train.json and the report).
    time_budget_s: float = 0.0


@dataclass(frozen=True)
class PretrainParams:
    """Supervised pre-training of the backbone on every source class (the `pretrain` stage).

    datasets: source datasets whose meta_train split is pre-trained on (all
        their classes, one softmax over the union).
    head: "cosine" (Baseline++'s cosine classifier; the saved learner adapts
        like `baselinepp`) or "linear" (Baseline).
    steps: optimizer steps (the budget). 0 saves the initial backbone.
    val_every / val_episodes / n_way / k_shot / n_query: the nearest-centroid
        validation curve on fixed meta-val episodes of datasets[0].
    """

    datasets: tuple[str, ...]
    head: str
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    label_smoothing: float = 0.0
    val_every: int = 100
    val_episodes: int = 100
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    checkpoint_every: int = 100
    augment: AugmentParams = field(default_factory=lambda: AugmentParams())
    channels_last: bool = False  # train in channels-last layout (faster CPU kernels)


PRETRAIN_HEADS = ("cosine", "linear")
META_TRAIN_INITS = ("scratch", "pretrain", "pretrained_file")


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 only on CUDA/MPS (metatransfer/runtime.py refuses it on the CPU)
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class RuntimeParams:
    """Where and how every stage runs (metatransfer/runtime.py, docs/reproducibility.md).

    device: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" (or "cuda:N") or "mps".
    threads: intra-op CPU threads (torch.set_num_threads, OMP/MKL_NUM_THREADS
        for child processes); 0 = the machine's cores.
    precision: "fp32", "bf16" or "fp16" autocast of training steps (fp16 is
        refused on the CPU).
    deterministic: torch.use_deterministic_algorithms(True) (+ the cuBLAS
        workspace setting on CUDA): an op without a deterministic kernel raises.
    """

    device: str = "auto"
    threads: int = 0
    precision: str = "fp32"
    deterministic: bool = True


@dataclass(frozen=True)
class UnlabeledParams:
    """A target fitted without labels (`finetune.unlabeled.<target>`; docs/guide.md, "Targets without labels").

    k: clusters (>= 2); the model's classes are `cluster_0` .. `cluster_<k-1>`.
    select_k: choose k by the silhouette of the train embedding over 2..k_max
        (then `k` is not used).
    k_max: the largest k tried with select_k.
    embedding: the finetune method whose backbone embeds the images and is
        shipped ("" = the first of finetune.methods); every other method is
        clustered too, for comparison.
    temperature: soft k-means temperature, relative to the embedding's total
        variance (smaller: harder assignments).
    self_training_steps: Adam steps on the confident pseudo-labels (0: none).
    confidence: the soft-assignment probability an image needs to be a
        pseudo-label for self-training.
    """

    k: int = 2
    select_k: bool = False
    k_max: int = 8
    embedding: str = ""
    temperature: float = 0.1
    self_training_steps: int = 0
    confidence: float = 0.9


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
    # Refuse (an error naming the classes) a target whose train split has a class
    # with fewer labelled images; 0 = no minimum. Classes are never dropped:
    # the head, evaluation and serving cover every class of the target.
    min_images_per_class: int = 0
    # Batch augmentation of the labelled target images (metatransfer/augment.py).
    augment: AugmentParams = field(default_factory=lambda: AugmentParams())
    # Targets of `targets` that have no labels: clustered, not fine-tuned
    # (metatransfer/training/unsupervised.py); {} = every target is labelled.
    unlabeled: dict[str, UnlabeledParams] = field(default_factory=dict)


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
    # The quality gate before registration (docs/reproducibility.md): a target
    # model whose validation accuracy is not significantly above chance, or a
    # learner whose validation-episode CI does not exceed 1/n_way, is not
    # registered as a challenger. Tested at `confidence`.
    quality_gate: bool = True


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    seed: int
    data: DataParams
    fetch: FetchParams
    prepare: PrepareParams
    model: ModelParams
    episodes: EpisodesParams | None = None
    pretrain: PretrainParams | None = None
    meta_train: MetaTrainParams | None = None
    finetune: FinetuneParams | None = None
    evaluate: EvaluateParams | None = None
    promote: PromoteParams | None = None
    # Device, threads, precision, determinism of every stage (defaults: old params files load).
    runtime: RuntimeParams = field(default_factory=lambda: RuntimeParams())


# --------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def finite_float(value: int | float, where: str) -> float:
    """`value` as a float, refusing inf, nan and integers beyond float range.

    YAML reads `.inf` and `.nan` as floats; no setting means anything by them,
    and a range check such as `lr > 0` lets inf through.

    Args:
        value: a number (bools are refused by the caller).
        where: the key path, for the message.

    Raises:
        ConfigError: naming the key and the value found.
    """
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number, found {value!r}")
    return out


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
        return finite_float(value, where)
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


def check_augment(a: AugmentParams, key: str) -> None:
    """Range checks of one augmentation section; `key` is its path (e.g. "finetune.augment").

    Raises:
        ConfigError: naming the key, the allowed range and the value found.
    """
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{key}.crop_scale: must be [min, max] with 0 < min <= max <= 1, found {list(a.crop_scale)}")
    lo, hi = a.crop_ratio
    if not 0 < lo <= hi:
        raise ConfigError(f"{key}.crop_ratio: must be [min, max] with 0 < min <= max, found {list(a.crop_ratio)}")
    if not 0 <= a.color_jitter < 1:
        raise ConfigError(f"{key}.color_jitter: must be in [0, 1) (0: off), found {a.color_jitter}")


def _sections_of_type(obj: Any, cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (key path, value) of type `cls` nested in dataclasses/dicts, so new sections are checked too."""
    if isinstance(obj, cls):
        return [(prefix, obj)]
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        return []
    out = []
    for name, value in items:
        out += _sections_of_type(value, cls, f"{prefix}.{name}" if prefix else str(name))
    return out


NPZ_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_npz_files(prep: PrepareParams) -> None:
    """Checks of every prepare.npz_files entry (the file itself is read by prepare, not here).

    Raises:
        ConfigError: naming the key, the allowed values and the value found.
    """
    from metatransfer.data.sources import DATASETS

    for name, f in prep.npz_files.items():
        key = f"prepare.npz_files.{name}"
        if not NPZ_NAME.match(name):
            raise ConfigError(f"{key}: the entry name is the dataset name and its folder data/prepared/<name>: use "
                              f"letters, digits, '_', '.', '-' (starting with a letter or digit), found {name!r}")
        if name in prep.image_folders or name in DATASETS:
            where = "prepare.image_folders" if name in prep.image_folders else "the dataset registry (fetch.datasets)"
            raise ConfigError(f"{key}: the name {name!r} is already a dataset of {where}; give the file another name")
        if not f.path.strip():
            raise ConfigError(f"{key}.path: must name a .npz file, found an empty string")
        if f.sha256 and not (len(f.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in f.sha256)):
            raise ConfigError(f"{key}.sha256: must be 64 hex digits (sha256sum FILE), found {f.sha256!r}")
        if f.role not in ("source", "target"):
            raise ConfigError(f"{key}.role: must be 'source' or 'target', found {f.role!r}")
        if not (all(x >= 0 for x in f.split_fractions) and abs(sum(f.split_fractions) - 1) < 1e-6):
            raise ConfigError(f"{key}.split_fractions: must be three non-negative numbers summing to 1 "
                              f"(meta_train, meta_val, meta_test), found {list(f.split_fractions)}")
        bad = [c for c in f.class_names if not c.strip() or "/" in c]
        if bad:
            raise ConfigError(f"{key}.class_names: every name must be non-empty and without '/', found {bad}")
        dup = sorted({c for c in f.class_names if f.class_names.count(c) > 1})
        if dup:
            raise ConfigError(f"{key}.class_names: names must be distinct, found {dup} more than once")


# Checks that need a higher layer (e.g. the algorithm names and hyper-parameters of
# meta_train, which only `metatransfer.algorithms` knows): that layer registers them
# on import (`register_params_check`), so this module never imports it.
_PARAMS_CHECKS: list[Callable[[Params], None]] = []


def register_params_check(check: Callable[[Params], None]) -> None:
    """Add a check that `params_from_mapping` runs (once per function), after the meta_train checks.

    Args:
        check: raises ConfigError naming the key ("<key>: <what is wrong>") for bad params.
    """
    if check not in _PARAMS_CHECKS:
        _PARAMS_CHECKS.append(check)


def _check_descriptions(p: Params) -> None:
    """Each `prepare.descriptions` entry names a dataset prepare builds and holds at least one word.

    Raises:
        ConfigError: naming `prepare.descriptions.<name>`, the datasets allowed, or the empty description.
    """
    from metatransfer.descriptions import check_description

    prepared = [*p.fetch.datasets, *p.prepare.image_folders, *p.prepare.npz_files]
    for name, d in p.prepare.descriptions.items():
        key = f"prepare.descriptions.{name}"
        if name not in prepared:
            raise ConfigError(f"{key}: {name!r} is not a dataset prepare builds (fetch.datasets, "
                              f"prepare.image_folders, prepare.npz_files): {sorted(set(prepared))}; "
                              "fix the name or add the dataset")
        check_description(dataclasses.asdict(d), key)


def _check_per_dataset(p: Params) -> None:
    """Each `prepare.per_dataset` entry names a prepared dataset that no source stage trains on, with a valid shape.

    Raises:
        ConfigError: naming `prepare.per_dataset.<name>[.key]`, what is allowed and what was found.
    """
    prepared = [*p.fetch.datasets, *p.prepare.image_folders, *p.prepare.npz_files]
    training = {s.dataset: "meta_train.sources" for s in (p.meta_train.sources if p.meta_train else ())}
    training.update({d: "pretrain.datasets" for d in (p.pretrain.datasets if p.pretrain else ())})
    for name, s in p.prepare.per_dataset.items():
        key = f"prepare.per_dataset.{name}"
        if name not in prepared:
            raise ConfigError(f"{key}: {name!r} is not a dataset prepare builds (fetch.datasets, "
                              f"prepare.image_folders, prepare.npz_files): {sorted(set(prepared))}; "
                              "fix the name or add the dataset")
        if name in training:
            raise ConfigError(f"{key}: {name!r} is a training source ({training[name]}); sources train the backbone "
                              f"at prepare.channels x prepare.image_size ({p.prepare.channels} x "
                              f"{p.prepare.image_size}), only a target can keep its own shape; remove the entry")
        if s.channels is None and s.image_size is None:
            raise ConfigError(f"{key}: expected channels and/or image_size, found neither; set one or remove the entry")
        if s.channels is not None and s.channels not in (1, 3):
            raise ConfigError(f"{key}.channels: must be 1 or 3, found {s.channels}")
        if s.image_size is not None and s.image_size < 16:
            raise ConfigError(f"{key}.image_size: must be >= 16, found {s.image_size}")


def _check_unlabeled(p: Params) -> None:
    """Checks of every finetune.unlabeled entry (docs/guide.md, "Targets without labels").

    An entry must name a target or at least a dataset prepare builds: a fan-out piece of `finetune`
    (metatransfer/dvc_stages.py) keeps the section but cuts finetune.targets to one target, and an
    entry for a dataset that is not a target is not used.

    Raises:
        ConfigError: naming the key, the allowed values and the value found.
    """
    f = p.finetune
    assert f is not None
    prepared = {*p.fetch.datasets, *p.prepare.image_folders, *p.prepare.npz_files}
    for name, u in f.unlabeled.items():
        key = f"finetune.unlabeled.{name}"
        if name not in f.targets and name not in prepared:
            raise ConfigError(f"{key}: {name!r} is not in finetune.targets {list(f.targets)} (nor a dataset "
                              "prepare builds); add it there (an unlabelled target is still a target) or remove "
                              "the entry")
        if u.k < 2:
            raise ConfigError(f"{key}.k: must be >= 2 (clusters), found {u.k}")
        if u.select_k and u.k_max < 2:
            raise ConfigError(f"{key}.k_max: must be >= 2 with select_k (k is tried over 2..k_max), found {u.k_max}")
        if u.embedding and u.embedding not in f.methods:
            raise ConfigError(f"{key}.embedding: must be '' (the first of finetune.methods) or one of "
                              f"finetune.methods {list(f.methods)}, found {u.embedding!r}")
        if not u.temperature > 0:
            raise ConfigError(f"{key}.temperature: must be > 0, found {u.temperature}")
        if u.self_training_steps < 0:
            raise ConfigError(f"{key}.self_training_steps: must be >= 0 (0: no self-training), found "
                              f"{u.self_training_steps}")
        if not 0 < u.confidence < 1:
            raise ConfigError(f"{key}.confidence: must be in (0, 1), found {u.confidence}")


def _check_ranges(p: Params) -> None:
    """Value checks that types alone cannot express."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    from metatransfer.models.resnet18 import STEMS

    need(p.model.stem in STEMS, "model.stem", f"must be one of {list(STEMS)}, found {p.model.stem!r}")
    if p.model.pretrained is not None:
        w = p.model.pretrained
        need(bool(w.path.strip()), "model.pretrained.path", "must name a safetensors file, found an empty string")
        need(len(w.sha256) == 64 and all(c in "0123456789abcdefABCDEF" for c in w.sha256),
             "model.pretrained.sha256", f"must be 64 hex digits (sha256sum FILE), found {w.sha256!r}")
    # Wherever an augmentation section sits (finetune.augment, pretrain.augment, ...).
    for key, a in _sections_of_type(p, AugmentParams):
        check_augment(a, key)

    need(p.prepare.image_size >= 16, "prepare.image_size", f"must be >= 16, found {p.prepare.image_size}")
    need(p.prepare.channels in (1, 3), "prepare.channels", f"must be 1 or 3, found {p.prepare.channels}")
    need(
        p.prepare.omniglot_protocol in ("background_evaluation", "vinyals"),
        "prepare.omniglot_protocol",
        f"must be one of ['background_evaluation', 'vinyals'], found {p.prepare.omniglot_protocol!r}",
    )
    need(p.prepare.meta_val_classes >= 0, "prepare.meta_val_classes", f"must be >= 0, found {p.prepare.meta_val_classes}")
    need(0 <= p.prepare.val_fraction < 1, "prepare.val_fraction",
         f"must be in [0, 1) (share of training images per class moved to val), found {p.prepare.val_fraction}")
    for name, f in p.prepare.image_folders.items():
        key = f"prepare.image_folders.{name}"
        need(f.role in ("source", "target"), f"{key}.role", f"must be 'source' or 'target', found {f.role!r}")
        need(all(x >= 0 for x in f.split_fractions) and abs(sum(f.split_fractions) - 1) < 1e-6,
             f"{key}.split_fractions", f"must be three non-negative numbers summing to 1, found {list(f.split_fractions)}")
        need(f.layout in IMAGE_FOLDER_LAYOUTS, f"{key}.layout",
             f"must be one of {list(IMAGE_FOLDER_LAYOUTS)}, found {f.layout!r}")
    _check_npz_files(p.prepare)
    _check_descriptions(p)
    _check_per_dataset(p)
    if p.episodes is not None:
        for name, e in p.episodes.sets.items():
            key = f"episodes.sets.{name}"
            need(e.n_way >= 2, f"{key}.n_way", f"must be >= 2, found {e.n_way}")
            need(len(e.shots) >= 1 and all(k >= 1 for k in e.shots), f"{key}.shots", f"must be a non-empty list of integers >= 1, found {list(e.shots)}")
            need(e.n_query >= 1, f"{key}.n_query", f"must be >= 1, found {e.n_query}")
            need(e.n_episodes >= 2, f"{key}.n_episodes", f"must be >= 2 (a confidence interval needs two), found {e.n_episodes}")
            need(e.min_images_per_class >= 0, f"{key}.min_images_per_class",
                 f"must be >= 0 (0: keep every class), found {e.min_images_per_class}")
    if p.pretrain is not None:
        t = p.pretrain
        need(len(t.datasets) >= 1, "pretrain.datasets", "must name at least one source dataset")
        need(t.head in PRETRAIN_HEADS, "pretrain.head", f"must be one of {list(PRETRAIN_HEADS)}, found {t.head!r}")
        need(t.steps >= 0, "pretrain.steps", f"must be >= 0, found {t.steps}")
        need(t.lr > 0 and t.lr < float("inf"), "pretrain.lr", f"must be a finite number > 0, found {t.lr}")
        need(t.weight_decay >= 0, "pretrain.weight_decay", f"must be >= 0, found {t.weight_decay}")
        need(0 <= t.label_smoothing < 1, "pretrain.label_smoothing", f"must be in [0, 1), found {t.label_smoothing}")
        need(t.optimizer in ("adam", "sgd"), "pretrain.optimizer", f"must be 'adam' or 'sgd', found {t.optimizer!r}")
        need(t.lr_schedule in LR_SCHEDULES, "pretrain.lr_schedule", f"must be one of {list(LR_SCHEDULES)}, found {t.lr_schedule!r}")
        for key in ("batch_size", "val_every", "val_episodes", "k_shot", "n_query"):
            need(getattr(t, key) >= 1, f"pretrain.{key}", f"must be >= 1, found {getattr(t, key)}")
        need(t.n_way >= 2, "pretrain.n_way", f"must be >= 2, found {t.n_way}")
        need(t.checkpoint_every >= 0, "pretrain.checkpoint_every", f"must be >= 0 (0: only at the end), found {t.checkpoint_every}")
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
        need(m.precision in ("", *PRECISIONS), "meta_train.precision",
             f"(deprecated: use runtime.precision) must be one of {list(PRECISIONS)}, found {m.precision!r}")
        need(m.time_budget_s >= 0, "meta_train.time_budget_s",
             f"must be >= 0 (0: no wall-clock guard; steps are the budget), found {m.time_budget_s}")
        need(m.n_way >= 2, "meta_train.n_way", f"must be >= 2, found {m.n_way}")
        need(m.init in META_TRAIN_INITS, "meta_train.init", f"must be one of {list(META_TRAIN_INITS)}, found {m.init!r}")
        need(m.init != "pretrain" or p.pretrain is not None, "meta_train.init",
             "is 'pretrain' but params has no `pretrain` section; add one or use 'scratch'")
        need(m.init != "pretrained_file" or getattr(p.model, "pretrained", None) is not None, "meta_train.init",
             "is 'pretrained_file' but model.pretrained is not set; set {path, sha256} or use 'scratch'")
        need(len(m.sources) >= 1, "meta_train.sources", "must name at least one source dataset")
        need(all(s.weight > 0 for s in m.sources), "meta_train.sources", "every weight must be > 0")
        for i, s in enumerate(m.sources):
            for key in ("k_shot", "n_query"):
                value = getattr(s, key)
                need(value is None or value >= 1, f"meta_train.sources[{i}].{key}",
                     f"must be >= 1 (or absent: meta_train.{key}), found {value}")
            need(s.min_images_per_class >= 0, f"meta_train.sources[{i}].min_images_per_class",
                 f"must be >= 0 (0: keep every class), found {s.min_images_per_class}")
    # The other layers' checks (the algorithms': names in meta_train.algorithms) come before
    # finetune's, whose `methods` check relies on meta_train.algorithms naming real algorithms.
    for check in _PARAMS_CHECKS:
        check(p)
    if p.finetune is not None:
        f = p.finetune
        need(f.train_layers in ("all", "head"), "finetune.train_layers", f"must be 'all' or 'head', found {f.train_layers!r}")
        for key in ("shots_per_class", "batch_size", "eval_every"):
            need(getattr(f, key) >= 1, f"finetune.{key}", f"must be >= 1, found {getattr(f, key)}")
        for key in ("steps", "patience", "val_per_class", "checkpoint_every", "min_images_per_class"):
            need(getattr(f, key) >= 0, f"finetune.{key}", f"must be >= 0, found {getattr(f, key)}")
        need(f.lr > 0, "finetune.lr", f"must be > 0, found {f.lr}")
        known = set(p.meta_train.algorithms if p.meta_train else ()) | {"scratch"} | ({"pretrain"} if p.pretrain else set())
        for name in f.methods:
            need(name in known, "finetune.methods", f"{name!r} is neither meta-trained (meta_train.algorithms), 'pretrain' (with a pretrain section) nor 'scratch'; allowed: {sorted(known)}")
        need(not f.force_method or f.force_method in f.methods, "finetune.force_method",
             f"must be '' or one of finetune.methods {list(f.methods)}, found {f.force_method!r}")
        _check_unlabeled(p)
    if p.promote is not None:
        g = p.promote
        need(g.margin >= 0, "promote.margin", f"must be >= 0 (a minimum gain), found {g.margin}")
        need(0 < g.confidence < 1, "promote.confidence", f"must be in (0, 1), found {g.confidence}")
        need(g.n_episodes >= 2, "promote.n_episodes", f"must be >= 2, found {g.n_episodes}")
        if p.finetune is not None:
            need(g.baseline in p.finetune.methods, "promote.baseline",
                 f"must be one of finetune.methods {list(p.finetune.methods)} (its target model is what a first "
                 f"champion must beat), found {g.baseline!r}")
    r = p.runtime
    need(r.device in DEVICES or (r.device.startswith("cuda:") and r.device[5:].isdigit()), "runtime.device",
         f"must be one of {list(DEVICES)} or cuda:N, found {r.device!r}")
    need(r.threads >= 0, "runtime.threads", f"must be >= 0 (0: the machine's cores), found {r.threads}")
    need(r.precision in PRECISIONS, "runtime.precision", f"must be one of {list(PRECISIONS)}, found {r.precision!r}")
    need(not (r.precision == "fp16" and r.device == "cpu"), "runtime.precision",
         "'fp16' on the CPU is refused (slower than fp32 and less accurate); use 'bf16' or 'fp32', or a GPU device")
    if p.evaluate is not None:
        need(0 < p.evaluate.confidence < 1, "evaluate.confidence", f"must be in (0, 1), found {p.evaluate.confidence}")


def params_from_mapping(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping and return the typed `Params`.

    Runs the checks of this module and those registered by other layers
    (`register_params_check`; `metatransfer.algorithms` registers the algorithm checks).

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
