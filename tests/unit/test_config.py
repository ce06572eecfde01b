"""params.yaml validation: unknown keys, wrong types and out-of-range values are
errors that name the key, what was expected and what was found."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import metatransfer.algorithms  # noqa: F401  (registers the algorithm checks params_from_mapping runs)
from metatransfer.config import Params, flatten, load_params, params_from_mapping
from metatransfer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_typed(raw: dict) -> None:
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    # The default scenario: natural images -> medical targets, RGB, pre-train -> meta-train -> fine-tune.
    assert p.prepare.image_size == 32 and p.prepare.channels == 3
    assert isinstance(p.fetch.datasets, tuple) and p.fetch.datasets[0] == "mini_imagenet"
    assert p.pretrain is not None and p.pretrain.datasets == ("mini_imagenet",)
    assert p.meta_train.init == "pretrain" and p.meta_train.sources[0].dataset == "mini_imagenet"
    assert set(p.finetune.targets) == {"brain_tumor_mri", "ham10000_mel_nv", "breastmnist", "retinamnist"}
    assert {"pretrain", "scratch"} <= set(p.finetune.methods)
    # Steps, not seconds, are the budget in the defaults.
    assert p.meta_train.time_budget_s == 0 and "time_budget_s" not in raw["meta_train"]


def test_characters_scenario_loads_typed() -> None:
    p = load_params(ROOT / "scenarios" / "characters.yaml")
    assert p.prepare.image_size == 28 and p.prepare.channels == 1
    assert "omniglot" in p.fetch.datasets and p.meta_train.sources[0].dataset == "omniglot"


def test_pretrain_and_init_errors_name_the_key(raw: dict) -> None:
    bad = dict(raw, pretrain=dict(raw["pretrain"], head="softmax"))
    with pytest.raises(ConfigError, match=r"pretrain\.head: must be one of \['cosine', 'linear'\], found 'softmax'"):
        params_from_mapping(bad)
    bad = dict(raw, meta_train=dict(raw["meta_train"], init="imagenet"))
    with pytest.raises(ConfigError, match=r"meta_train\.init: must be one of \['scratch', 'pretrain', 'pretrained_file'\]"):
        params_from_mapping(bad)
    no_pre = {k: v for k, v in raw.items() if k != "pretrain"}
    no_pre["finetune"] = dict(raw["finetune"], methods=["protonet", "scratch"])
    no_pre["evaluate"] = dict(raw["evaluate"], methods=["protonet"], reference="protonet")
    with pytest.raises(ConfigError, match=r"meta_train\.init: is 'pretrain' but params has no `pretrain` section"):
        params_from_mapping(no_pre)
    bad = dict(raw, meta_train=dict(raw["meta_train"], init="pretrained_file"))
    with pytest.raises(ConfigError, match=r"meta_train\.init: is 'pretrained_file' but model\.pretrained is not set"):
        params_from_mapping(bad)


def test_unknown_top_level_key_is_named(raw: dict) -> None:
    raw["trian"] = {}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trian'\]; valid keys: \[.*'prepare'"):
        params_from_mapping(raw)


def test_unknown_nested_key_names_its_path(raw: dict) -> None:
    raw["prepare"]["imgsize"] = 28
    with pytest.raises(ConfigError, match=r"prepare: unknown key\(s\) \['imgsize'\]"):
        params_from_mapping(raw)


def test_renamed_key_names_its_new_name(raw: dict) -> None:
    # promote.n_episodes (disjoint test folds, not N-way K-shot episodes) is now promote.n_folds.
    raw["promote"]["n_episodes"] = raw["promote"].pop("n_folds")
    with pytest.raises(ConfigError, match=r"^params\.yaml: promote: unknown key\(s\) \['n_episodes'\]; valid keys: "
                                          r"\[.*'n_folds'.*\]; promote\.n_episodes was renamed to promote\.n_folds\. "):
        params_from_mapping(raw)
    # The gate's own settings (CLI overrides, code) say the same, as the registry's error.
    from metatransfer.registry import GateSettings, RegistryError
    with pytest.raises(RegistryError, match=r"promote\.n_episodes was renamed to promote\.n_folds$"):
        GateSettings(n_episodes=20)
    # The real episode sets keep their n_episodes.
    assert all("n_episodes" in s for s in raw["episodes"]["sets"].values())


def test_wrong_type_names_key_expected_and_found(raw: dict) -> None:
    raw["prepare"]["image_size"] = "28"
    with pytest.raises(ConfigError) as err:
        params_from_mapping(raw)
    msg = str(err.value)
    assert "prepare.image_size" in msg and "expected an integer" in msg and "'28'" in msg


def test_bool_is_not_an_int(raw: dict) -> None:
    raw["seed"] = True
    with pytest.raises(ConfigError, match=r"seed: expected an integer, found bool"):
        params_from_mapping(raw)


def test_missing_key_is_named(raw: dict) -> None:
    del raw["prepare"]["channels"]
    with pytest.raises(ConfigError, match=r"prepare.channels: missing required key"):
        params_from_mapping(raw)


def test_out_of_range_value(raw: dict) -> None:
    raw["prepare"]["channels"] = 2
    with pytest.raises(ConfigError, match=r"prepare.channels: must be 1 or 3, found 2"):
        params_from_mapping(raw)


def test_bad_protocol_lists_allowed(raw: dict) -> None:
    raw["prepare"]["omniglot_protocol"] = "lake"
    with pytest.raises(ConfigError, match=r"background_evaluation.*vinyals.*'lake'"):
        params_from_mapping(raw)


def test_list_type_checked_per_item(raw: dict) -> None:
    raw["fetch"]["datasets"] = ["omniglot", 3]
    with pytest.raises(ConfigError, match=r"fetch.datasets\[1\]: expected str"):
        params_from_mapping(raw)


def test_image_folder_fractions_validated(raw: dict) -> None:
    raw["prepare"]["image_folders"] = {
        "mine": {"path": "x", "role": "target", "split_fractions": [0.5, 0.5, 0.5]}
    }
    with pytest.raises(ConfigError, match=r"image_folders.mine.split_fractions: must be three"):
        params_from_mapping(raw)


def test_error_message_names_the_file(tmp_path: Path, raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["prepare"]["channels"] = "grey"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=rf"^{path}: prepare.channels"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "p.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "p.yaml")


def test_params_are_frozen(raw: dict) -> None:
    p = params_from_mapping(raw)
    with pytest.raises(ValueError, match="frozen"):  # pydantic's frozen models refuse assignment
        p.seed = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        p.meta_train.n_way = 3  # type: ignore[misc,union-attr]


def test_flatten_gives_dotted_keys(raw: dict) -> None:
    flat = flatten(params_from_mapping(raw))
    assert flat["prepare.image_size"] == 32
    assert flat["pretrain.augment.crop_scale"] == (0.5, 1.0)
    assert flat["data.prepared_dir"] == "data/prepared"
    # MLflow logs str(value): a list of sections reads as it did with dataclasses.
    assert str(flat["meta_train.sources"]) == (
        "(SourceMixParams(dataset='mini_imagenet', weight=1.0, k_shot=None, n_query=None, min_images_per_class=0),)")


def test_unknown_algorithm_lists_valid_names(raw: dict) -> None:
    raw["meta_train"]["algorithms"] = ["protonet", "mamll"]
    with pytest.raises(ConfigError, match=r"meta_train.algorithms: unknown algorithm 'mamll'; valid: \[.*'maml'.*\]"):
        params_from_mapping(raw)


def test_algorithm_hparams_validated_by_the_algorithm(raw: dict) -> None:
    raw["meta_train"]["hparams"] = {"fomaml": {"inner_lr": "fast"}}
    with pytest.raises(ConfigError, match=r"meta_train\.hparams\.fomaml\.inner_lr: expected a number, found str \('fast'\)"):
        params_from_mapping(raw)
    raw["meta_train"]["hparams"] = {"fomaml": {"inner_lrr": 0.1}}
    with pytest.raises(ConfigError, match=r"meta_train.hparams.fomaml: unknown key\(s\) \['inner_lrr'\]"):
        params_from_mapping(raw)


def test_finetune_methods_must_be_trained_or_scratch(raw: dict) -> None:
    raw["finetune"]["methods"] = ["protonet", "maml"]
    with pytest.raises(ConfigError, match=r"finetune.methods: 'maml' is neither meta-trained"):
        params_from_mapping(raw)


def test_episode_set_ranges(raw: dict) -> None:
    name = next(iter(raw["episodes"]["sets"]))
    raw["episodes"]["sets"][name]["shots"] = [0, 5]
    with pytest.raises(ConfigError, match=rf"episodes.sets.{name}.shots: must be a non-empty list"):
        params_from_mapping(raw)


def test_training_levers_default_off_and_are_validated(raw: dict) -> None:
    p = params_from_mapping(copy.deepcopy(raw))
    assert (p.meta_train.lr_schedule, p.meta_train.precision) == ("constant", "")
    # The default scenario turns the CPU levers on (2.7x per Conv-4 step at 32 px, benchmarks/RESULTS.md);
    # precision moved to runtime, meta_train.precision is deprecated.
    assert p.meta_train.channels_last and p.pretrain.channels_last and p.runtime.precision == "bf16"
    raw["meta_train"]["precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"meta_train.precision.*must be one of \['fp32', 'bf16', 'fp16'\], found 'fp8'"):
        params_from_mapping(copy.deepcopy(raw))
    raw["meta_train"]["precision"] = "bf16"
    raw["meta_train"]["lr_schedule"] = "linear"
    with pytest.raises(ConfigError, match=r"meta_train.lr_schedule.*found 'linear'"):
        params_from_mapping(raw)


@pytest.mark.parametrize("section, key, value", [
    ("meta_train", "meta_lr", float("inf")),
    ("meta_train", "meta_lr", float("nan")),
    ("meta_train", "time_budget_s", float("inf")),
    ("pretrain", "lr", float("-inf")),
    ("finetune", "lr", float("inf")),
    ("promote", "margin", float("inf")),
    ("prepare", "val_fraction", float("nan")),
    ("meta_train", "meta_lr", 10 ** 400),  # an integer beyond float range
])
def test_every_float_key_must_be_finite(raw: dict, section: str, key: str, value: float) -> None:
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected a finite number, found"):
        params_from_mapping(raw)


def test_non_finite_floats_refused_inside_lists_and_nested_sections(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["finetune"]["augment"]["crop_scale"] = [float("nan"), 1.0]
    with pytest.raises(ConfigError, match=r"finetune\.augment\.crop_scale\[0\]: expected a finite number, found nan"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["meta_train"]["sources"][0]["weight"] = float("inf")
    with pytest.raises(ConfigError, match=r"meta_train\.sources\[0\]\.weight: expected a finite number"):
        params_from_mapping(bad)


def test_algorithm_hparams_must_be_finite(raw: dict) -> None:
    raw["meta_train"]["hparams"] = {"anil": {"inner_lr": float("inf")}}
    with pytest.raises(ConfigError, match=r"meta_train\.hparams\.anil\.inner_lr: expected a finite number, found inf"):
        params_from_mapping(raw)


def test_negative_time_budget_is_refused(raw: dict) -> None:
    raw["meta_train"]["time_budget_s"] = -5
    with pytest.raises(ConfigError, match=r"meta_train\.time_budget_s: must be >= 0 .*found -5"):
        params_from_mapping(raw)


def test_learning_rate_hints_name_only_real_keys(raw: dict) -> None:
    """The non-finite-step hint is read off each algorithm's hparams model:
    every key it names is accepted by params validation, and protonet (no inner
    step size) is pointed at meta_train.meta_lr alone."""
    from metatransfer.algorithms import CATALOG, algorithm_class
    from metatransfer.algorithms.base import learning_rate_keys

    assert learning_rate_keys("protonet", algorithm_class("protonet").hparams_class) == ["meta_train.meta_lr"]
    assert learning_rate_keys("anil", algorithm_class("anil").hparams_class) == [
        "meta_train.meta_lr", "meta_train.hparams.anil.inner_lr"]
    for name in sorted(CATALOG):
        for key in learning_rate_keys(name, algorithm_class(name).hparams_class):
            bad = copy.deepcopy(raw)
            section = bad
            *parents, leaf = key.split(".")
            for part in parents:
                section = section.setdefault(part, {})
            # A key that did not exist would be an "unknown key" error. 0.01 is in range for every
            # step size (metasgd's lr_init_high must stay >= its default lr_init_low, 0.005).
            section[leaf] = 0.01
            params_from_mapping(bad)


def test_non_finite_steps_error_names_real_keys() -> None:
    """The trainer's stop message for an algorithm without an inner step size
    (protonet) names meta_train.meta_lr and no `hparams.protonet.*` key."""
    import torch

    from metatransfer.algorithms.base import Hparams, MetaLearner, StepResult
    from metatransfer.training.meta_train import NumericalFaultError, TrainSettings, meta_train

    class Exploding(MetaLearner):
        name = "protonet"
        hparams_class = Hparams

        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def meta_learn(self, episodes):  # noqa: ANN001
            (self.w * float("nan")).sum().backward()
            return StepResult(loss=float("nan"), acc=0.0)

        def adapt(self, support_x, support_y, n_way, unlabeled_x=None):  # noqa: ANN001
            raise NotImplementedError

    settings = TrainSettings(steps=3, meta_batch_size=1, meta_lr=1e-3, val_every=10, max_consecutive_faults=2)
    with pytest.raises(NumericalFaultError) as err:
        meta_train(Exploding(), lambda: None, [], settings)
    msg = str(err.value)
    assert "(meta_train.meta_lr) and re-run" in msg and "hparams.protonet" not in msg


# ------------------------------------------------- pydantic models, one error translator


def _leaves(node: object, path: tuple = ()):
    """Every (path, value) of a parsed YAML tree below its root."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from _leaves(v, path + (k,))


def test_no_pydantic_text_reaches_the_user(raw: dict) -> None:
    """Every key of params.yaml set to a wrong type or removed gives our message: the key path first, no
    pydantic wording (`config_error` translates each kind of pydantic error)."""
    raw["meta_train"]["hparams"]["reptile"] = {"inner_batch": 4}
    checked = 0
    for path, _ in list(_leaves(raw)):
        for change in ("wrong type", "removed"):
            bad = copy.deepcopy(raw)
            node = bad
            for part in path[:-1]:
                node = node[part]
            if change == "removed":
                del node[path[-1]]
            else:
                node[path[-1]] = {"a": 1} if not isinstance(node[path[-1]], dict) else "x"
            try:
                params_from_mapping(bad)
            except ConfigError as exc:
                msg, checked = str(exc), checked + 1
                assert msg.startswith("params.yaml: ") and msg.endswith(". Fix the key in params.yaml and re-run."), msg
                for leak in ("pydantic", "validation error", "Input should", "[type=", "invalid value"):
                    assert leak not in msg, msg
    assert checked > 200  # most changes are errors (removing a key with a default is not)


def test_hparams_ranges_and_choices_fail_when_params_yaml_is_loaded(raw: dict) -> None:
    """Out-of-range hyper-parameters used to pass params validation and fail only when the learner was
    built (inside a stage); the models refuse them at load, naming the key."""
    for hp, message in [
        ({"baseline": {"adapt_lr": -1}}, r"meta_train\.hparams\.baseline\.adapt_lr: must be > 0, found -1\.0"),
        ({"scratch": {"steps": -1}}, r"meta_train\.hparams\.scratch\.steps: must be >= 0, found -1\b"),
        ({"tim": {"label_smoothing": 1}}, r"meta_train\.hparams\.tim\.label_smoothing: must be in \[0, 1\), found 1\.0"),
        ({"baseline": {"adapt_dampening": 1.5}}, r"meta_train\.hparams\.baseline\.adapt_dampening: must be in \[0, 1\)"),
        ({"relationnet": {"class_pool": 3}}, r"meta_train\.hparams\.relationnet\.class_pool: expected str, found int \(3\)"),
        ({"maml": {"inner_lrr": 1}}, r"meta_train\.hparams\.maml: unknown key\(s\) \['inner_lrr'\]; valid keys: \['eval_"),
        ({"maml": {7: 1}}, r"meta_train\.hparams\.maml: expected str, found int \(7\)"),  # a key must be a string
    ]:
        raw["meta_train"]["hparams"] = hp
        with pytest.raises(ConfigError, match=message):
            params_from_mapping(raw)
    raw["meta_train"]["hparams"] = {"baseline": {"adapt_dampening": 1.5, "adapt_momentum": 0.0}}  # no momentum: unused
    assert params_from_mapping(raw).meta_train.hparams["baseline"]["adapt_dampening"] == 1.5


def test_section_shapes_are_named(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["prepare"][7] = 1  # a key that is not a string is an unknown key too
    with pytest.raises(ConfigError, match=r"params\.yaml: prepare: unknown key\(s\) \[7\]; valid keys: \['channels', "):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["prepare"]["image_folders"] = {"own": {"path": "x", "role": "target", "split_fractions": [0.5, 0.5]}}
    with pytest.raises(ConfigError, match=r"prepare\.image_folders\.own\.split_fractions: expected a list of 3 items, found 2"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["episodes"]["sets"] = {1: raw["episodes"]["sets"]["mini_imagenet_test"]}
    with pytest.raises(ConfigError, match=r"params\.yaml: episodes\.sets: expected str, found int \(1\)"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["meta_train"]["sources"][0]["weight"] = 0
    with pytest.raises(ConfigError, match=r"meta_train\.sources\[0\]\.weight: must be > 0, found 0\.0"):
        params_from_mapping(bad)


def test_direct_construction_is_validated_with_the_same_messages() -> None:
    """Code that builds a section or hyper-parameters itself gets the same checks and wording
    (fields by name or, as with the dataclasses before, by position)."""
    from metatransfer.algorithms.maml import MAMLHparams
    from metatransfer.config import EpisodeSetParams
    from metatransfer.registry.gate import GateSettings, RegistryError, gate_settings

    assert EpisodeSetParams("d", "test", 2, [1, 5], 15, 10).shots == (1, 5)
    with pytest.raises(ConfigError, match=r"^n_way: must be >= 2, found 1$"):
        EpisodeSetParams("d", "test", 1, (1,), 15, 10)
    with pytest.raises(TypeError, match="at most 7 positional fields"):
        EpisodeSetParams("d", "test", 2, (1,), 15, 10, 0, 9)
    with pytest.raises(ConfigError, match=r"^meta_train\.hparams\.maml\.inner_lr: expected a number, found str \('x'\)$"):
        MAMLHparams(inner_lr="x")
    with pytest.raises(ConfigError, match=r"^meta_train\.hparams\.maml: unknown key\(s\) \['inner_lrr'\]"):
        MAMLHparams(inner_lrr=0.1)
    # The promotion gate's settings: the same models, the registry's own error type.
    with pytest.raises(RegistryError, match=r"^promote\.confidence: must be in \(0, 1\), found 1\.0$"):
        GateSettings(confidence=1)
    with pytest.raises(RegistryError, match=r"^promote\.baseline: must name a finetune method \(e\.g\. scratch\)$"):
        gate_settings(None, baseline="")
    with pytest.raises(RegistryError, match=r"^promote\.n_folds: must be >= 2 \(an interval needs two folds\), found 1$"):
        gate_settings(None, n_folds=1)
    assert gate_settings(None, margin=0).model_dump() == {
        "margin": 0.0, "confidence": 0.95, "n_folds": 20, "baseline": "scratch", "seed": 0}
