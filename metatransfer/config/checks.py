"""Value checks of a validated `Params` that the models' field types, ranges and choices cannot
express: agreement between keys and sections, list contents, names; plus the checks other
layers register (`register_params_check`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from metatransfer.config.data import PrepareParams
from metatransfer.config.params import DEVICES, PRECISIONS, Params
from metatransfer.config.training import AugmentParams
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
    """Every (key path, value) of type `cls` nested in models/dataclasses/dicts, so new sections are checked too."""
    if isinstance(obj, cls):
        return [(prefix, obj)]
    if isinstance(obj, BaseModel):
        items = [(name, getattr(obj, name)) for name in type(obj).model_fields]
    elif dataclasses.is_dataclass(obj):
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


def _prepared_datasets(p: Params) -> set[str]:
    """Every dataset the prepare stage builds: fetched, image folders and npz files."""
    return {*p.fetch.datasets, *p.prepare.image_folders, *p.prepare.npz_files}


def _require_prepared(p: Params, name: str, key: str) -> None:
    """Refuse a per-dataset entry `key` whose `name` is not a dataset prepare builds.

    Raises:
        ConfigError: naming `key`, the name and the datasets allowed.
    """
    prepared = _prepared_datasets(p)
    if name not in prepared:
        raise ConfigError(f"{key}: {name!r} is not a dataset prepare builds (fetch.datasets, "
                          f"prepare.image_folders, prepare.npz_files): {sorted(prepared)}; "
                          "fix the name or add the dataset")


def _check_descriptions(p: Params) -> None:
    """Each `prepare.descriptions` entry names a dataset prepare builds and holds at least one word.

    Raises:
        ConfigError: naming `prepare.descriptions.<name>`, the datasets allowed, or the empty description.
    """
    from metatransfer.descriptions import check_description

    for name, d in p.prepare.descriptions.items():
        key = f"prepare.descriptions.{name}"
        _require_prepared(p, name, key)
        check_description(d.model_dump(), key)


def _check_per_dataset(p: Params) -> None:
    """Each `prepare.per_dataset` entry names a prepared dataset that no source stage trains on, with a valid shape.

    Raises:
        ConfigError: naming `prepare.per_dataset.<name>[.key]`, what is allowed and what was found.
    """
    training = {s.dataset: "meta_train.sources" for s in (p.meta_train.sources if p.meta_train else ())}
    training.update({d: "pretrain.datasets" for d in (p.pretrain.datasets if p.pretrain else ())})
    for name, s in p.prepare.per_dataset.items():
        key = f"prepare.per_dataset.{name}"
        _require_prepared(p, name, key)
        if name in training:
            raise ConfigError(f"{key}: {name!r} is a training source ({training[name]}); sources train the backbone "
                              f"at prepare.channels x prepare.image_size ({p.prepare.channels} x "
                              f"{p.prepare.image_size}), only a target can keep its own shape; remove the entry")
        if s.channels is None and s.image_size is None:
            raise ConfigError(f"{key}: expected channels and/or image_size, found neither; set one or remove the entry")
        if s.channels is not None and s.channels not in (1, 3):
            raise ConfigError(f"{key}.channels: must be 1 or 3, found {s.channels}")


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
    prepared = _prepared_datasets(p)
    for name, u in f.unlabeled.items():
        key = f"finetune.unlabeled.{name}"
        if name not in f.targets and name not in prepared:
            raise ConfigError(f"{key}: {name!r} is not in finetune.targets {list(f.targets)} (nor a dataset "
                              "prepare builds); add it there (an unlabelled target is still a target) or remove "
                              "the entry")
        if u.select_k and u.k_max < 2:
            raise ConfigError(f"{key}.k_max: must be >= 2 with select_k (k is tried over 2..k_max), found {u.k_max}")
        if u.embedding and u.embedding not in f.methods:
            raise ConfigError(f"{key}.embedding: must be '' (the first of finetune.methods) or one of "
                              f"finetune.methods {list(f.methods)}, found {u.embedding!r}")


def _check_ranges(p: Params) -> None:
    """Value checks that field types, ranges and choices cannot express (run after validation)."""
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

    need(p.prepare.channels in (1, 3), "prepare.channels", f"must be 1 or 3, found {p.prepare.channels}")
    for name, f in p.prepare.image_folders.items():
        need(all(x >= 0 for x in f.split_fractions) and abs(sum(f.split_fractions) - 1) < 1e-6,
             f"prepare.image_folders.{name}.split_fractions",
             f"must be three non-negative numbers summing to 1, found {list(f.split_fractions)}")
    _check_npz_files(p.prepare)
    _check_descriptions(p)
    _check_per_dataset(p)
    if p.episodes is not None:
        for name, e in p.episodes.sets.items():
            need(len(e.shots) >= 1 and all(k >= 1 for k in e.shots), f"episodes.sets.{name}.shots",
                 f"must be a non-empty list of integers >= 1, found {list(e.shots)}")
    if p.pretrain is not None:
        need(len(p.pretrain.datasets) >= 1, "pretrain.datasets", "must name at least one source dataset")
    if p.meta_train is not None:
        m = p.meta_train
        need(m.precision in ("", *PRECISIONS), "meta_train.precision",
             f"(deprecated: use runtime.precision) must be one of {list(PRECISIONS)}, found {m.precision!r}")
        need(m.init != "pretrain" or p.pretrain is not None, "meta_train.init",
             "is 'pretrain' but params has no `pretrain` section; add one or use 'scratch'")
        need(m.init != "pretrained_file" or getattr(p.model, "pretrained", None) is not None, "meta_train.init",
             "is 'pretrained_file' but model.pretrained is not set; set {path, sha256} or use 'scratch'")
        need(len(m.sources) >= 1, "meta_train.sources", "must name at least one source dataset")
    # The other layers' checks (the algorithms': names in meta_train.algorithms) come before
    # finetune's, whose `methods` check relies on meta_train.algorithms naming real algorithms.
    for check in _PARAMS_CHECKS:
        check(p)
    if p.finetune is not None:
        f = p.finetune
        known = set(p.meta_train.algorithms if p.meta_train else ()) | {"scratch"} | ({"pretrain"} if p.pretrain else set())
        for name in f.methods:
            need(name in known, "finetune.methods", f"{name!r} is neither meta-trained (meta_train.algorithms), 'pretrain' (with a pretrain section) nor 'scratch'; allowed: {sorted(known)}")
        need(not f.force_method or f.force_method in f.methods, "finetune.force_method",
             f"must be '' or one of finetune.methods {list(f.methods)}, found {f.force_method!r}")
        _check_unlabeled(p)
    if p.promote is not None:
        g = p.promote
        if p.finetune is not None:
            need(g.baseline in p.finetune.methods, "promote.baseline",
                 f"must be one of finetune.methods {list(p.finetune.methods)} (its target model is what a first "
                 f"champion must beat), found {g.baseline!r}")
    r = p.runtime
    need(r.device in DEVICES or (r.device.startswith("cuda:") and r.device[5:].isdigit()), "runtime.device",
         f"must be one of {list(DEVICES)} or cuda:N, found {r.device!r}")
    need(not (r.precision == "fp16" and r.device == "cpu"), "runtime.precision",
         "'fp16' on the CPU is refused (slower than fp32 and less accurate); use 'bf16' or 'fp32', or a GPU device")
