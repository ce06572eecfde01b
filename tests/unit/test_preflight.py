"""Params checked against the prepared data before any long work: N-way larger
than the classes of a split, K+Q larger than its smallest class, a missing split,
each reported with its params key and the allowed values, all at once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from metatransfer import preflight
from metatransfer.config import params_from_mapping
from metatransfer.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


def write_manifest(prepared: Path, dataset: str, splits: dict[str, list[int]]) -> None:
    """A manifest with `splits[name][c]` images in class c (only the columns preflight reads)."""
    rows = []
    for split, counts in splits.items():
        for c, n in enumerate(counts):
            rows += [{"id": len(rows), "dataset": dataset, "split": split, "class": f"{dataset}/{split}/c{c:02d}"}] * n
    (prepared / dataset).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(prepared / dataset / "manifest.parquet")


@pytest.fixture()
def prepared(tmp_path: Path) -> Path:
    p = tmp_path / "data" / "prepared"
    write_manifest(p, "omniglot", {"meta_train": [20] * 10, "meta_val": [20] * 6, "meta_test": [20] * 8})
    write_manifest(p, "retinamnist", {"train": [30] * 5, "val": [10] * 5, "test": [40, 40, 40, 40, 20]})
    write_manifest(p, "breastmnist", {"train": [50, 50], "val": [20, 20], "test": [60, 60]})
    return p


@pytest.fixture()
def raw() -> dict:
    # The characters scenario's shapes; the manifests above are written to match them.
    return yaml.safe_load((ROOT / "scenarios" / "characters.yaml").read_text())


def check(raw: dict, prepared: Path) -> None:
    preflight.check(params_from_mapping(raw), prepared.parent.parent)


def test_default_shapes_fit(raw: dict, prepared: Path) -> None:
    check(raw, prepared)  # raises on any problem
    shapes = preflight.split_shapes(prepared, ["retinamnist"])
    assert shapes[("retinamnist", "test")].min_per_class == 20
    assert shapes[("retinamnist", "test")].smallest_class == "retinamnist/test/c04"


def test_n_way_larger_than_classes_names_key_and_allowed(raw: dict, prepared: Path) -> None:
    raw["episodes"]["sets"]["breastmnist_test"]["n_way"] = 3
    with pytest.raises(ConfigError, match=r"episodes.sets.breastmnist_test.n_way: 3 but breastmnist/test has only 2 "
                                          r"classes; allowed: 2..2"):
        check(raw, prepared)


def test_k_plus_q_larger_than_smallest_class(raw: dict, prepared: Path) -> None:
    raw["episodes"]["sets"]["retinamnist_test"]["shots"] = [1, 5, 20]
    with pytest.raises(ConfigError) as err:
        check(raw, prepared)
    msg = str(err.value)
    assert "episodes.sets.retinamnist_test: max(shots)=20 + n_query=10 = 30 images per class" in msg
    assert "class 'retinamnist/test/c04' of retinamnist/test has only 20" in msg
    assert "max(shots) <= 10 with n_query=10" in msg


def test_meta_train_shape_with_rotation_and_meta_val(raw: dict, prepared: Path) -> None:
    raw["meta_train"]["n_way"] = 8  # 10 classes x 4 rotations fit; meta_val has 6 classes, no rotation
    with pytest.raises(ConfigError) as err:
        check(raw, prepared)
    assert "meta_train.n_way: 8 but omniglot/meta_val (the meta-val episodes) has only 6 classes; allowed: 2..6" in str(err.value)
    assert "omniglot/meta_train" not in str(err.value)
    raw["meta_train"].update(n_way=41)
    with pytest.raises(ConfigError, match=r"omniglot/meta_train has only 40 classes \(10 classes x 4 rotations\)"):
        check(raw, prepared)
    raw["meta_train"].update(n_way=5, k_shot=6, n_query=15)
    with pytest.raises(ConfigError, match=r"meta_train: k_shot=6 \+ n_query=15 = 21 images per class"):
        check(raw, prepared)


def test_all_problems_reported_at_once_and_missing_split(raw: dict, prepared: Path) -> None:
    raw["episodes"]["sets"]["omniglot_test"]["split"] = "test"
    raw["episodes"]["sets"]["breastmnist_test"]["n_way"] = 4
    with pytest.raises(ConfigError) as err:
        check(raw, prepared)
    lines = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 2
    assert "episodes.sets.omniglot_test.split: omniglot/test has no images; allowed: a split the dataset has " \
           "['meta_train', 'meta_val', 'meta_test']" in lines[0]


def test_unprepared_dataset_lists_what_is_prepared(raw: dict, prepared: Path) -> None:
    raw["episodes"]["sets"]["kmnist_test"] = dict(raw["episodes"]["sets"]["breastmnist_test"], dataset="kmnist")
    with pytest.raises(DataError, match=r"dataset 'kmnist' is not prepared; prepared datasets: "
                                        r"\['breastmnist', 'omniglot', 'retinamnist'\]"):
        check(raw, prepared)
