"""Small classes and per-source episode shapes (issue 18, items 3 and 4).

- `episodes.sets.<set>.min_images_per_class` and
  `meta_train.sources[i].min_images_per_class` exclude the classes under the
  minimum (one WARNING line lists them, the episode file records them); too
  few classes left is an error naming the key; 0 / absent changes nothing.
- `meta_train.sources[i].k_shot` / `.n_query` give each source its own episode
  shape; every algorithm learns from a meta-batch mixing shapes; preflight
  checks each source with its own shape.
- `finetune.min_images_per_class` refuses (never drops) a target class under it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open

from metatransfer import preflight
from metatransfer.algorithms import CATALOG, build_algorithm
from metatransfer.config import params_from_mapping
from metatransfer.data.store import SplitData, load_split
from metatransfer.episodes import (
    EpisodeSampler,
    build_fixed_episodes,
    kept_classes,
    load_fixed_episodes,
    save_fixed_episodes,
    small_classes,
)
from metatransfer.episodes.files import META_KEY
from metatransfer.errors import ConfigError, EpisodeError
from metatransfer.models import BackboneSpec
from metatransfer.stages.episodes import build_episode_files
from metatransfer.training.sources import meta_train_sampler, meta_val_episodes, mixed_source_sampler

ROOT = Path(__file__).resolve().parents[2]
TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


def write_dataset(prepared: Path, dataset: str, splits: dict[str, list[int]], seed: int = 0) -> None:
    """A prepared dataset whose class c of split s has `splits[s][c]` random 1x16x16 images."""
    rows = []
    for split, counts in splits.items():
        for c, n in enumerate(counts):
            rows += [{"id": len(rows) + j, "dataset": dataset, "split": split,
                      "class": f"{dataset}/{split}/c{c:02d}"} for j in range(n)]
    (prepared / dataset).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(prepared / dataset / "manifest.parquet")
    rng = np.random.default_rng(seed)
    np.save(prepared / dataset / "images.npy", rng.integers(0, 256, (len(rows), 1, 16, 16), dtype=np.uint8))


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    p = tmp_path / "data" / "prepared"
    # a clinic's blood cells: 3 / 20 / 33 / 2 / 40 test images per class
    write_dataset(p, "cells", {"train": [30, 30, 4, 30, 30], "val": [5] * 5, "test": [3, 20, 33, 2, 40]})
    write_dataset(p, "omni", {"meta_train": [20] * 8, "meta_val": [20] * 6, "meta_test": [20] * 6}, seed=1)
    write_dataset(p, "faces", {"meta_train": [10, 10, 10, 4, 10, 10], "meta_val": [10] * 5}, seed=2)
    return p


@pytest.fixture()
def raw() -> dict:
    raw = yaml.safe_load((ROOT / "scenarios" / "characters.yaml").read_text())
    raw["episodes"] = {"sets": {"cells_test": {"dataset": "cells", "split": "test", "n_way": 3, "shots": [1, 5],
                                               "n_query": 10, "n_episodes": 6}}}
    raw["meta_train"].update(sources=[{"dataset": "omni", "weight": 1.0}], n_way=3, k_shot=1, n_query=15,
                             rotation_augment=False)
    raw["finetune"]["targets"] = ["cells"]
    return raw


def episode_bytes(raw: dict, prepared: Path, out: Path, **set_keys) -> dict[str, bytes]:
    raw = copy.deepcopy(raw)
    raw["episodes"]["sets"]["cells_test"].update(set_keys)
    params = params_from_mapping(raw)
    files = build_episode_files(params.episodes, prepared, out, params.seed)
    return {f.name: f.read_bytes() for f in files}


def stored_meta(path: Path) -> dict:
    """The metadata of an episode file, read with plain safetensors."""
    with safe_open(path, framework="np") as f:
        return json.loads(f.metadata()[META_KEY])


# ---------------------------------------------------------------- episode sets


def test_set_minimum_excludes_small_classes_with_one_warning_and_records_them(
    raw: dict, prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        episode_bytes(raw, prepared, tmp_path / "episodes", min_images_per_class=15)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["episodes.sets.cells_test.min_images_per_class: 2 of 5 classes of cells/test have fewer "
                        "than 15 images and are excluded: cells/test/c00 (3), cells/test/c03 (2)"]
    split = load_split(prepared, "cells", "test")
    for k in (1, 5):
        path = tmp_path / "episodes" / "cells_test" / f"{k}shot.safetensors"
        fe = load_fixed_episodes(path, split)
        assert fe.excluded_classes == {"cells/test/c00": 3, "cells/test/c03": 2}
        assert fe.min_images_per_class == 15
        assert stored_meta(path)["excluded_classes"] == {"cells/test/c00": 3, "cells/test/c03": 2}
        # never drawn; every kept class of the 3 drawn per episode, K + Q = k + 10 images each
        assert set(np.unique(fe.classes)) == {1, 2, 4}
        assert fe.support_idx.shape == (6, 3 * k) and fe.query_idx.shape == (6, 30)
        labels = split.labels[np.concatenate([fe.support_idx, fe.query_idx], axis=1)]
        assert not np.isin(labels, [0, 3]).any()


def test_too_few_classes_left_is_an_error_naming_the_key(raw: dict, prepared: Path, tmp_path: Path) -> None:
    split = load_split(prepared, "cells", "test")
    with pytest.raises(EpisodeError) as err:
        build_fixed_episodes(split, 3, 1, 10, 4, seed=0, min_images_per_class=25,
                             key="episodes.sets.cells_test.min_images_per_class")
    assert str(err.value).startswith(
        "episodes.sets.cells_test.min_images_per_class: 25 excludes 3 of 5 classes of cells/test "
        "(cells/test/c00 (3), cells/test/c01 (20), cells/test/c03 (2)), leaving 2 classes = 2 ways but n_way is 3.")
    # preflight says it before any file is written, with the largest minimum that works
    raw["episodes"]["sets"]["cells_test"]["min_images_per_class"] = 25
    with pytest.raises(ConfigError) as err:
        preflight.check(params_from_mapping(raw), prepared.parent.parent)
    assert ("episodes.sets.cells_test.min_images_per_class: 25 excludes 3 of 5 classes of cells/test "
            "(cells/test/c00 (3), cells/test/c01 (20), cells/test/c03 (2)), leaving 2 classes but "
            "episodes.sets.cells_test.n_way is 3; allowed: episodes.sets.cells_test.min_images_per_class <= 20"
            in str(err.value))


def test_preflight_checks_k_plus_q_on_the_kept_classes_and_suggests_the_minimum(raw: dict, prepared: Path) -> None:
    with pytest.raises(ConfigError) as err:  # no minimum: class c03 (2 images) cannot give 5 + 10
        preflight.check(params_from_mapping(raw), prepared.parent.parent)
    msg = str(err.value)
    assert "class 'cells/test/c03' of cells/test has only 2" in msg
    assert "or episodes.sets.cells_test.min_images_per_class: 15 to exclude the 2 classes with fewer than 15 images" in msg
    raw["episodes"]["sets"]["cells_test"]["min_images_per_class"] = 15
    preflight.check(params_from_mapping(raw), prepared.parent.parent)  # fits now
    raw["episodes"]["sets"]["cells_test"]["shots"] = [1, 15]
    with pytest.raises(ConfigError, match=r"max\(shots\)=15 \+ n_query=10 = 25 images per class are needed but class "
                                          r"'cells/test/c01' of cells/test has only 20"):
        preflight.check(params_from_mapping(raw), prepared.parent.parent)


def test_minimum_zero_absent_or_excluding_nothing_writes_identical_bytes(raw: dict, prepared: Path, tmp_path: Path) -> None:
    raw["episodes"]["sets"]["cells_test"].update(shots=[1], n_query=1)  # fits every class (>= 2 images)
    absent = episode_bytes(raw, prepared, tmp_path / "a")
    assert absent == episode_bytes(raw, prepared, tmp_path / "b", min_images_per_class=0)
    assert absent == episode_bytes(raw, prepared, tmp_path / "c", min_images_per_class=2)  # no class under 2
    assert "excluded_classes" not in stored_meta(tmp_path / "a" / "cells_test" / "1shot.safetensors")
    assert absent != episode_bytes(raw, prepared, tmp_path / "d", min_images_per_class=3)


def test_small_classes_and_kept_classes() -> None:
    split = SplitData("d", "test", np.zeros((9, 1, 2, 2), np.uint8), np.array([0, 0, 0, 1, 2, 2, 2, 2, 2]),
                      ("d/a", "d/b", "d/c"))
    assert small_classes(split, 0) == {}
    assert small_classes(split, 3) == {"d/b": 1}
    assert kept_classes(split, 3, 2, "k") == ([0, 2], {"d/b": 1})
    assert kept_classes(split, 1, 2, "k") == (None, {})
    assert kept_classes(split, 4, 4, "k", rotation_augment=True) == ([2], {"d/a": 3, "d/b": 1})
    with pytest.raises(EpisodeError, match=r"^k: 4 excludes 2 of 3 classes of d/test \(d/a \(3\), d/b \(1\)\), "
                                           r"leaving 1 classes x 4 rotations = 4 ways but n_way is 5"):
        kept_classes(split, 4, 5, "k", rotation_augment=True)


# ---------------------------------------------------------------- meta-training sources


def params_with_sources(raw: dict, sources: list[dict], **meta) -> object:
    raw = copy.deepcopy(raw)
    raw["meta_train"].update(sources=sources, **meta)
    return params_from_mapping(raw)


def test_per_source_shape_gives_each_source_its_own_support_and_query_sizes(raw: dict, prepared: Path) -> None:
    params = params_with_sources(raw, [{"dataset": "omni", "weight": 1.0},
                                       {"dataset": "faces", "weight": 1.0, "k_shot": 2, "n_query": 3,
                                        "min_images_per_class": 5}])
    m = params.meta_train
    splits = [load_split(prepared, "omni", "meta_train"), load_split(prepared, "faces", "meta_train")]
    source = meta_train_sampler(m, splits, seed=0)
    assert source.shapes == ((1, 15), (2, 3))
    assert source.excluded == ({}, {"faces/meta_train/c03": 4})
    seen = {0: 0, 1: 0}
    for _ in range(40):
        ep = source.sample()
        domain = int(ep.classes[0] >= 8)  # faces' global ids follow omni's 8 classes
        assert bool((ep.classes >= 8).all()) == bool(domain)
        k, q = source.shapes[domain]
        assert ep.support_x.shape == (3 * k, 1, 16, 16) and ep.query_x.shape == (3 * q, 1, 16, 16)
        assert ep.support_y.tolist() == [w for w in range(3) for _ in range(k)]
        assert ep.query_y.tolist() == [w for w in range(3) for _ in range(q)]
        if domain:
            assert 8 + 3 not in ep.classes.tolist()  # faces c03 (4 images) is excluded
        seen[domain] += 1
    assert seen[0] > 5 and seen[1] > 5


def test_without_per_source_keys_the_sampler_and_meta_val_are_the_old_ones(raw: dict, prepared: Path) -> None:
    params = params_with_sources(raw, [{"dataset": "omni", "weight": 1.0}, {"dataset": "faces", "weight": 2.0}],
                                 k_shot=1, n_query=3, rotation_augment=True)
    m = params.meta_train
    splits = [load_split(prepared, "omni", "meta_train"), load_split(prepared, "faces", "meta_train")]
    new = meta_train_sampler(m, splits, seed=5)
    old = mixed_source_sampler(splits, [1.0, 2.0], 3, 1, 3, 5, True)
    assert new.num_classes == old.num_classes == (8 + 6) * 4
    for _ in range(10):
        a, b = new.sample(), old.sample()
        assert torch.equal(a.classes, b.classes) and torch.equal(a.support_x, b.support_x)
        assert torch.equal(a.query_x, b.query_x)
    val = load_split(prepared, "omni", "meta_val")
    fe = meta_val_episodes(m, val, seed=1)
    ref = build_fixed_episodes(val, 3, 1, 3, m.val_episodes, 1)
    assert np.array_equal(fe.support_idx, ref.support_idx) and np.array_equal(fe.query_idx, ref.query_idx)


def test_meta_val_takes_the_first_sources_shape_and_minimum(raw: dict, prepared: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    params = params_with_sources(raw, [{"dataset": "faces", "weight": 1.0, "k_shot": 2, "n_query": 4,
                                        "min_images_per_class": 5}], val_episodes=4)
    val = load_split(prepared, "faces", "meta_val")
    fe = meta_val_episodes(params.meta_train, val, seed=1)
    assert (fe.k_shot, fe.n_query) == (2, 4) and fe.excluded_classes == {}
    splits = [load_split(prepared, "faces", "meta_train")]
    with caplog.at_level(logging.WARNING):
        meta_train_sampler(params.meta_train, splits, seed=0)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "meta_train.sources[0].min_images_per_class: 1 of 6 classes of faces/meta_train have fewer than 5 images "
        "and are excluded: faces/meta_train/c03 (4)"]
    strict = params_with_sources(raw, [{"dataset": "faces", "weight": 1.0, "min_images_per_class": 11}])
    with pytest.raises(EpisodeError, match=r"^meta_train.sources\[0\].min_images_per_class: 11 excludes 6 of 6 "):
        meta_train_sampler(strict.meta_train, splits, seed=0)


def test_preflight_checks_each_source_with_its_own_shape(raw: dict, prepared: Path) -> None:
    root = prepared.parent.parent
    # faces' 10-image classes cannot give 1 + 15, but omni keeps n_query 15 while faces asks for 2 + 3
    shared = [{"dataset": "omni", "weight": 1.0}, {"dataset": "faces", "weight": 1.0}]
    raw["episodes"]["sets"]["cells_test"]["min_images_per_class"] = 15
    with pytest.raises(ConfigError) as err:
        preflight.check(params_with_sources(raw, shared), root)
    assert ("meta_train: k_shot=1 + n_query=15 = 16 images per class are needed but class 'faces/meta_train/c03' "
            "of faces/meta_train has only 4") in str(err.value)
    own = [{"dataset": "omni", "weight": 1.0},
           {"dataset": "faces", "weight": 1.0, "k_shot": 2, "n_query": 3, "min_images_per_class": 5}]
    preflight.check(params_with_sources(raw, own), root)
    own[1]["n_query"] = 9
    with pytest.raises(ConfigError) as err:
        preflight.check(params_with_sources(raw, own), root)
    lines = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert lines == ["  - meta_train.sources[1]: k_shot=2 + n_query=9 = 11 images per class are needed but class "
                     "'faces/meta_train/c00' of faces/meta_train has only 10; allowed: k_shot + n_query <= 10 "
                     "(k_shot <= 1 with n_query=9, or n_query <= 9 with k_shot=1)"]
    # the meta-val episodes of the first source take that source's shape
    first = [{"dataset": "faces", "weight": 1.0, "k_shot": 2, "n_query": 9}]
    with pytest.raises(ConfigError, match=r"meta_train.sources\[0\]: k_shot=2 \+ n_query=9 = 11 images per class are "
                                          r"needed but class 'faces/meta_val/c00' of faces/meta_val \(the meta-val "
                                          r"episodes\) has only 10"):
        preflight.check(params_with_sources(raw, first), root)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_algorithm_learns_from_a_meta_batch_mixing_shapes(name: str, prepared: Path) -> None:
    torch.manual_seed(0)
    splits = [load_split(prepared, "omni", "meta_train"), load_split(prepared, "faces", "meta_train")]
    source = mixed_source_sampler(splits, [1.0, 1.0], 3, [1, 3], [4, 2], seed=0, rotation_augment=False,
                                  classes=[None, [0, 1, 2, 4, 5]])
    batch = []
    while {int(ep.support_x.shape[0]) for ep in batch} != {3, 9}:
        batch.append(source.sample())
    assert {int(ep.query_x.shape[0]) for ep in batch} == {12, 6}
    learner = build_algorithm(name, TINY, 3, None, num_classes=source.num_classes)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    step = learner.meta_learn(batch)
    assert np.isfinite(step.loss) and 0.0 <= step.acc <= 1.0
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    moved = any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())
    if name == "scratch":  # meta-training is a documented no-op: no gradient, no update
        assert not grads and not moved
    else:  # a gradient to step on (or, like Reptile, weights already moved)
        assert moved or (all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads))


def test_episode_sampler_restricted_to_classes(prepared: Path) -> None:
    split = load_split(prepared, "faces", "meta_train")
    sampler = EpisodeSampler(split, 3, 2, 2, seed=0, rotation_augment=True, classes=[0, 4])
    ids = {int(i) for _ in range(30) for i in sampler.sample().classes}
    assert ids <= {0, 1, 2, 3, 16, 17, 18, 19} and sampler.drawn_classes == (0, 4)
    with pytest.raises(EpisodeError, match=r"n_way=3 but the split has only 2 classes \(of 6\) left"):
        EpisodeSampler(split, 3, 2, 2, seed=0, classes=[0, 4])
    with pytest.raises(EpisodeError, match=r"classes must be class indices 0..5; found \[6\]"):
        EpisodeSampler(split, 2, 1, 1, seed=0, classes=[6])


def test_fixed_episode_file_round_trips_the_exclusion(prepared: Path, tmp_path: Path) -> None:
    split = load_split(prepared, "cells", "test")
    fe = build_fixed_episodes(split, 2, 1, 1, 3, seed=4, min_images_per_class=3)
    assert fe.excluded_classes == {"cells/test/c03": 2}
    back = load_fixed_episodes(save_fixed_episodes(fe, tmp_path / "e.safetensors"), split)
    assert back.excluded_classes == {"cells/test/c03": 2} and back.min_images_per_class == 3
    ep = back.materialise(0, split)
    assert ep.support_x.shape[0] == 2 and 3 not in ep.classes.tolist()


# ---------------------------------------------------------------- fine-tuning


def test_finetune_minimum_refuses_and_names_every_small_class(raw: dict, prepared: Path) -> None:
    raw["episodes"]["sets"]["cells_test"]["min_images_per_class"] = 15
    preflight.check(params_from_mapping(raw), prepared.parent.parent)  # finetune minimum 0: nothing checked
    raw["finetune"]["min_images_per_class"] = 5
    with pytest.raises(ConfigError) as err:
        preflight.check(params_from_mapping(raw), prepared.parent.parent)
    msg = str(err.value)
    assert msg.startswith("finetune.min_images_per_class: 5 labelled images per class are required but\n"
                          "  - cells/train: 1 of 5 classes have fewer: cells/train/c02 (4)\n")
    assert "cannot exclude a class" in msg
    raw["finetune"]["min_images_per_class"] = 4
    preflight.check(params_from_mapping(raw), prepared.parent.parent)  # the smallest class has exactly 4
    # the finetune stage checks only the target it fine-tunes
    strict = params_from_mapping({**raw, "finetune": {**raw["finetune"], "min_images_per_class": 31}})
    with pytest.raises(ConfigError, match=r"cells/train: 5 of 5 classes have fewer: cells/train/c00 \(30\)"):
        preflight.check_finetune_classes(strict, prepared, ["cells"])


def test_new_keys_are_range_checked(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["episodes"]["sets"]["cells_test"]["min_images_per_class"] = -1
    with pytest.raises(ConfigError, match=r"episodes.sets.cells_test.min_images_per_class: must be >= 0"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["meta_train"]["sources"][0]["n_query"] = 0
    with pytest.raises(ConfigError, match=r"meta_train.sources\[0\].n_query: must be >= 1 \(or absent: "
                                          r"meta_train.n_query\), found 0"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["meta_train"]["sources"][0]["k_shot"] = "two"
    with pytest.raises(ConfigError, match=r"meta_train.sources\[0\].k_shot"):
        params_from_mapping(bad)
    bad = copy.deepcopy(raw)
    bad["finetune"]["min_images_per_class"] = -2
    with pytest.raises(ConfigError, match=r"finetune.min_images_per_class: must be >= 0, found -2"):
        params_from_mapping(bad)


def test_finetune_stage_refuses_before_training(raw: dict, prepared: Path) -> None:
    from metatransfer.stages.finetune import finetune_target

    raw["prepare"].update(channels=1, image_size=16)
    raw["finetune"].update(methods=["scratch"], min_images_per_class=5)
    with pytest.raises(ConfigError, match=r"^finetune.min_images_per_class: 5 labelled images per class are required "
                                          r"but\n  - cells/train: 1 of 5 classes have fewer: cells/train/c02 \(4\)\n"):
        finetune_target("cells", params_from_mapping(raw), prepared.parent.parent)
