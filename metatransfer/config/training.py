"""The training sections of params.yaml: `model` (the backbone), `pretrain`, `meta_train` and
`finetune`, with the augmentation settings they share.

Frozen pydantic models (metatransfer/config/build.py) that describe shape, types, ranges and
choices; defaults live in params.yaml. Checks across keys: metatransfer/config/checks.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from metatransfer.config.build import Bool, ConfigModel, Float, Int, Str, bounded

PRETRAIN_HEADS = ("cosine", "linear")


META_TRAIN_INITS = ("scratch", "pretrain", "pretrained_file")


LR_SCHEDULES = ("constant", "cosine")


class PretrainedParams(ConfigModel):
    """External backbone weights (docs/models.md): a safetensors file and its SHA-256.

    path: relative paths are relative to the project root (the folder of
        params.yaml). Nothing is downloaded at run time.
    sha256: 64 hex digits; a file with another checksum is refused.
    """

    path: Str
    sha256: Str


class ModelParams(ConfigModel):
    """The backbone (see metatransfer.models.BackboneSpec).

    stem: resnet18 only: "imagenet" (7x7 stride 2 + max-pool), "small"
        (same 7x7 conv at stride 1, no max-pool) or "auto" (small below 64 px).
    pretrained: initial backbone weights from a file (None: random init).
    """

    name: Str
    hidden: Int
    stem: Str = "auto"  # one of metatransfer.models.resnet18.STEMS (checks.py: config does not import models)
    pretrained: PretrainedParams | None = None


class AugmentParams(ConfigModel):
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

    # The ranges are checked by checks.check_augment, not here: an AugmentParams out of range
    # may be built (tests build them to check the checker).
    enabled: Bool = False
    crop_scale: tuple[Float, Float] = (0.5, 1.0)
    crop_ratio: tuple[Float, Float] = (3 / 4, 4 / 3)
    hflip: Bool = True
    color_jitter: Float = 0.2


class SourceMixParams(ConfigModel):
    """A source dataset and its sampling weight for meta-training episodes.

    k_shot / n_query: this source's episode shape (None: meta_train.k_shot /
        meta_train.n_query); n_way is shared by every source.
    min_images_per_class: classes of this source's meta_train split with fewer
        images are never drawn (a WARNING lists them); 0 keeps every class.
    """

    dataset: Str
    weight: Float = bounded(gt=0)
    k_shot: Int | None = bounded(None, ge=1, hint="or absent: meta_train.k_shot")
    n_query: Int | None = bounded(None, ge=1, hint="or absent: meta_train.n_query")
    min_images_per_class: Int = bounded(0, ge=0, hint="0: keep every class")


class MetaTrainParams(ConfigModel):
    """Meta-training of every configured algorithm."""

    algorithms: tuple[Str, ...]
    sources: tuple[SourceMixParams, ...]
    n_way: Int = bounded(ge=2)
    k_shot: Int = bounded(ge=1)
    n_query: Int = bounded(ge=1)
    meta_batch_size: Int = bounded(ge=1)
    steps: Int = bounded(ge=0)
    meta_lr: Float = bounded(gt=0)
    val_every: Int = bounded(ge=1)
    val_episodes: Int = bounded(ge=1)
    rotation_augment: Bool
    # Checked by the algorithms layer (each algorithm's Hparams model), which config cannot import.
    hparams: dict[Str, dict[Str, Any]] = Field(default_factory=dict)
    # Crash safety (defaults for params files written before these keys existed):
    # checkpoint every N steps (0: only at the end) and stop after K consecutive
    # non-finite steps.
    checkpoint_every: Int = bounded(50, ge=0, hint="0: only at the end")
    max_consecutive_faults: Int = bounded(5, ge=1)
    # Speed/accuracy levers (see metatransfer.training.meta_train.TrainSettings):
    # "constant" or "cosine" outer learning rate over the budget, "fp32" or
    # "bf16" autocast for the training step, channels-last 4-D weights.
    lr_schedule: Literal[LR_SCHEDULES] = "constant"  # type: ignore[valid-type]
    # Deprecated: moved to runtime.precision ("" = use runtime.precision; a value
    # from an older params file still wins, with a warning). Checked in checks.py,
    # whose message says it is deprecated.
    precision: Str = ""
    channels_last: Bool = False
    # Where θ's backbone starts: "scratch" (random), "pretrain" (the
    # `pretrain` stage's backbone, models/pretrain) or "pretrained_file"
    # (model.pretrained only).
    init: Literal[META_TRAIN_INITS] = "scratch"  # type: ignore[valid-type]
    # Optional wall-clock guard per algorithm (seconds of training, validation
    # excluded); 0 = off. Steps are the budget: a run this guard ends is not
    # reproducible and is marked (MLflow tag budget_hit=time, a WARNING line,
    # `budget_hit` in metrics/meta_train.json and the report).
    time_budget_s: Float = bounded(0.0, ge=0, hint="0: no wall-clock guard; steps are the budget")


class PretrainParams(ConfigModel):
    """Supervised pre-training of the backbone on every source class (the `pretrain` stage).

    datasets: source datasets whose meta_train split is pre-trained on (all
        their classes, one softmax over the union).
    head: "cosine" (Baseline++'s cosine classifier; the saved learner adapts
        like `baselinepp`) or "linear" (Baseline).
    steps: optimizer steps (the budget). 0 saves the initial backbone.
    val_every / val_episodes / n_way / k_shot / n_query: the nearest-centroid
        validation curve on fixed meta-val episodes of datasets[0].
    """

    datasets: tuple[Str, ...]  # at least one (checks.py)
    head: Literal[PRETRAIN_HEADS]  # type: ignore[valid-type]
    steps: Int = bounded(ge=0)
    batch_size: Int = bounded(ge=1)
    lr: Float = bounded(gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: Float = bounded(0.0, ge=0)
    lr_schedule: Literal[LR_SCHEDULES] = "cosine"  # type: ignore[valid-type]
    label_smoothing: Float = bounded(0.0, ge=0, lt=1)
    val_every: Int = bounded(100, ge=1)
    val_episodes: Int = bounded(100, ge=1)
    n_way: Int = bounded(5, ge=2)
    k_shot: Int = bounded(1, ge=1)
    n_query: Int = bounded(15, ge=1)
    checkpoint_every: Int = bounded(100, ge=0, hint="0: only at the end")
    augment: AugmentParams = Field(default_factory=AugmentParams)
    channels_last: Bool = False  # train in channels-last layout (faster CPU kernels)


class UnlabeledParams(ConfigModel):
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

    k: Int = bounded(2, ge=2, hint="clusters")
    select_k: Bool = False
    k_max: Int = 8  # >= 2 with select_k (checks.py)
    embedding: Str = ""
    temperature: Float = bounded(0.1, gt=0)
    self_training_steps: Int = bounded(0, ge=0, hint="0: no self-training")
    confidence: Float = bounded(0.9, gt=0, lt=1)


class FinetuneParams(ConfigModel):
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

    targets: tuple[Str, ...]
    methods: tuple[Str, ...]
    shots_per_class: Int = bounded(ge=1)
    val_per_class: Int = bounded(ge=0)
    steps: Int = bounded(ge=0)
    lr: Float = bounded(gt=0)
    batch_size: Int = bounded(ge=1)
    train_layers: Literal["all", "head"]
    eval_every: Int = bounded(ge=1)
    patience: Int = bounded(ge=0)
    force_method: Str
    checkpoint_every: Int = bounded(50, ge=0)  # steps between checkpoints (0: only at the end)
    # Refuse (an error naming the classes) a target whose train split has a class
    # with fewer labelled images; 0 = no minimum. Classes are never dropped:
    # the head, evaluation and serving cover every class of the target.
    min_images_per_class: Int = bounded(0, ge=0)
    # Batch augmentation of the labelled target images (metatransfer/augment.py).
    augment: AugmentParams = Field(default_factory=AugmentParams)
    # Targets of `targets` that have no labels: clustered, not fine-tuned
    # (metatransfer/training/unsupervised.py); {} = every target is labelled.
    unlabeled: dict[Str, UnlabeledParams] = Field(default_factory=dict)
