"""The training sections of params.yaml: `model` (the backbone), `pretrain`, `meta_train` and
`finetune`, with the augmentation settings they share.

Frozen dataclasses that describe shape and types only; defaults live in
params.yaml. Loading and checks: metatransfer/config/build.py, checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
