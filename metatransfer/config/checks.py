"""Value checks of a built `Params` that types alone cannot express: ranges, choices, and
agreement between sections; plus the checks other layers register (`register_params_check`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from metatransfer.config.data import IMAGE_FOLDER_LAYOUTS, PrepareParams
from metatransfer.config.params import DEVICES, PRECISIONS, Params
from metatransfer.config.training import LR_SCHEDULES, META_TRAIN_INITS, PRETRAIN_HEADS, AugmentParams
from metatransfer.errors import ConfigError


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
            where = "prepare.image_folders" if name in prep.image_folders else "the source table (fetch.datasets)"
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
