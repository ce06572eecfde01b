"""Building and loading the learners the stages exchange (one place for stages and registry).

A *method* is a name the `finetune`, `evaluate` and `promote` steps accept:
an algorithm meta-trained by `meta_train` (its learner in `models/meta/<name>/`),
`pretrain` (the `pretrain` stage's learner in `models/pretrain/`, which adapts
like Baseline/Baseline++: a new head on the frozen pre-trained features), or
`scratch` (a fresh seeded learner: training from scratch on the target).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from metatransfer.algorithms import build_algorithm
from metatransfer.algorithms.base import MetaLearner
from metatransfer.artifacts import load_learner
from metatransfer.config import Params
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec, load_pretrained

META_DIR = Path("models") / "meta"
PRETRAIN_DIR = Path("models") / "pretrain"
PRETRAIN_METHOD = "pretrain"
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def backbone_spec(params: Params) -> BackboneSpec:
    """The backbone every stage builds, from the `model` and `prepare` sections."""
    return BackboneSpec(
        name=params.model.name,
        in_channels=params.prepare.channels,
        image_size=params.prepare.image_size,
        hidden=params.model.hidden,
        stem=params.model.stem,
    )


def method_folder(method: str, root: Path) -> Path:
    """Where the learner of `method` is saved (`scratch` has none)."""
    return Path(root) / (PRETRAIN_DIR if method == PRETRAIN_METHOD else META_DIR / method)


def load_method(method: str, params: Params, root: Path) -> MetaLearner:
    """The learner of `method`: saved by `pretrain`/`meta_train`, or a fresh seeded one for "scratch"."""
    if method == "scratch":
        torch.manual_seed(params.seed)
        m = params.meta_train
        return build_algorithm("scratch", backbone_spec(params), m.n_way if m else 5,
                               (m.hparams.get("scratch") if m else None))
    return load_learner(method_folder(method, root))


def describe(learner: MetaLearner, dataset_folder: Path) -> None:
    """Condition a description-reading learner (`conditional`) on a prepared dataset's description.

    The dataset's `description.json` (prepare.descriptions), or the learner's "no description"
    token when it has none. Other learners are left alone.
    """
    set_description = getattr(learner, "set_description", None)
    if callable(set_description):
        from metatransfer.descriptions import read_description

        set_description(read_description(dataset_folder))


def copy_backbone(source: nn.Module, target: nn.Module, where: str) -> None:
    """Load `source`'s backbone weights into `target`.

    BatchNorm running statistics are copied where `target` keeps them and
    dropped where it does not (MAML-family learners normalise with batch
    statistics); every other key must match exactly.

    Raises:
        ConfigError: a weight is missing, unexpected, or of another shape (names `where` and the keys).
    """
    state = source.state_dict()
    own = target.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith(_BN_BUFFERS)}
    missing = [k for k in own if k not in state and not k.endswith(_BN_BUFFERS)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{where}: the pre-trained backbone does not fit this learner's backbone (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}); pretrain and meta_train must use the "
            "same model and prepare settings: re-run the pretrain stage")
    target.load_state_dict(state, strict=False)


def init_from_pretrain(learner: MetaLearner, root: Path) -> None:
    """Start `learner`'s backbone θ from the `pretrain` stage's backbone (meta_train.init: pretrain).

    Raises:
        ArtifactError: models/pretrain is missing or altered.
        ConfigError: the backbones do not fit.
    """
    folder = method_folder(PRETRAIN_METHOD, root)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: meta_train.init is 'pretrain' but the pretrain stage has not written its "
                          "model; run `dvc repro pretrain` (or set meta_train.init: scratch)")
    pre = load_learner(folder)
    copy_backbone(pre.backbone, learner.backbone, f"{folder} -> {learner.name}")


def init_from_file(backbone: nn.Module, params: Params, root: Path) -> None:
    """Load `model.pretrained` (external weights, e.g. ImageNet) into `backbone`.

    Raises:
        ConfigError: model.pretrained is not set; PretrainedWeightsError: missing file,
            wrong checksum, or keys/shapes that do not fit (named).
    """
    w = params.model.pretrained
    if w is None:
        raise ConfigError("model.pretrained: not set, but meta_train.init is 'pretrained_file'; "
                          "set {path, sha256} (see docs/models.md) or use meta_train.init: scratch")
    load_pretrained(backbone, w.path, w.sha256, root=root)


def init_backbone(learner: MetaLearner, params: Params, root: Path) -> None:
    """Start a meta-learner's θ as `meta_train.init` says: scratch, the pretrain stage, or model.pretrained."""
    init = params.meta_train.init if params.meta_train else "scratch"
    if init == "pretrain":
        init_from_pretrain(learner, root)
    elif init == "pretrained_file":
        init_from_file(learner.backbone, params, root)
