"""A user's own MedMNIST-format npz (`prepare.npz_files`): pinned by its sha256, prepared like MedMNIST,
the checksum recorded as the data version; bad checksums, bad content and bad params are clear errors."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from metatransfer.config import ImageFolderParams, NpzFileParams, PrepareParams, params_from_mapping
from metatransfer.data import prepare as prep
from metatransfer.data.store import load_manifest, load_split
from metatransfer.errors import ChecksumError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = {"train": 6, "val": 2, "test": 3}  # images per class in each split of the written file


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arrays(n_classes: int = 2, rgb: bool = False, seed: int = 0, val: bool = True) -> dict[str, np.ndarray]:
    """Distinct random 16x16 images, labels 0..n_classes-1 (train labels (N, 1) like MedMNIST, test (N,))."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in PER_CLASS.items():
        if split == "val" and not val:
            continue
        labels = np.repeat(np.arange(n_classes, dtype=np.uint8), k)
        shape = (len(labels), 16, 16, 3) if rgb else (len(labels), 16, 16)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = labels[:, None] if split != "test" else labels
    return out


def _write(path: Path, arrays: dict[str, np.ndarray]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return _sha(path)


def _params(entry: NpzFileParams, name: str = "blood", channels: int = 1) -> PrepareParams:
    return PrepareParams(image_size=16, channels=channels, omniglot_protocol="background_evaluation",
                         meta_val_classes=0, val_fraction=0.25, npz_files={name: entry})


def _prepare(tmp_path: Path, params: PrepareParams, out: str = "prepared") -> prep.PrepareReport:
    return prep.prepare(params, tuple(params.npz_files), tmp_path / "raw", tmp_path / out, seed=0, base_dir=tmp_path)


# --------------------------------------------------------------------------- preparing
def test_target_keeps_the_files_splits_pixels_names_and_records_the_checksum(tmp_path: Path) -> None:
    arrays = _arrays()
    sha = _write(tmp_path / "own/blood.npz", arrays)
    report = _prepare(tmp_path, _params(NpzFileParams(path="own/blood.npz", sha256=sha.upper(),
                                                      class_names=("sick", "healthy"))))
    out = tmp_path / "prepared"
    df = load_manifest(out, "blood")
    assert df.groupby(["split", "class"]).size().to_dict() == {
        (s, c): k for s, k in PER_CLASS.items() for c in ("blood/healthy", "blood/sick")}
    d = report.datasets["blood"]
    assert (d["kind"], d["role"], d["n_images"], d["n_classes"], d["quarantined"]) == ("npz_file", "target", 22, 2, 0)
    assert d["data_version"] == f"sha256:{sha}"
    on_disk = json.loads((out / "report.json").read_text())["datasets"]["blood"]
    assert on_disk["data_version"] == f"sha256:{sha}"
    for split in PER_CLASS:
        data = load_split(out, "blood", split)
        assert data.class_names == ("blood/healthy", "blood/sick")  # store labels: sorted name order
        rows = df[df["split"] == split]
        for img, path, cls in zip(data.images, rows["source_path"], rows["class"]):
            key, index = path.split(":")[1].rstrip("]").split("[")
            assert path.startswith("blood.npz:") and key == f"{split}_images"
            assert np.array_equal(img[0], arrays[key][int(index)])  # 16 px grey: stored as given
            npz_label = int(arrays[f"{split}_labels"].reshape(-1)[int(index)])
            assert cls == ("blood/sick", "blood/healthy")[npz_label]  # class_names[i] names npz label i


def test_train_test_only_carves_val_and_default_names_follow_medmnist(tmp_path: Path) -> None:
    sha = _write(tmp_path / "t.npz", _arrays(n_classes=3, rgb=True, val=False))
    _prepare(tmp_path, _params(NpzFileParams(path=str(tmp_path / "t.npz"), sha256=sha), name="tt", channels=3))
    df = load_manifest(tmp_path / "prepared", "tt")
    # round(0.25 x 6) = 2 train images per class become val; test as given
    assert df.groupby("split").size().to_dict() == {"train": 12, "val": 6, "test": 9}
    assert sorted(df["class"].unique()) == ["tt/00", "tt/01", "tt/02"]
    assert df.loc[df["split"] == "val", "source_path"].str.startswith("t.npz:train_images[").all()
    assert load_split(tmp_path / "prepared", "tt", "test").images.shape == (9, 3, 16, 16)


def test_source_pools_the_images_and_cuts_classes(tmp_path: Path) -> None:
    sha = _write(tmp_path / "s.npz", _arrays(n_classes=6))
    entry = NpzFileParams(path="s.npz", sha256=sha, role="source", split_fractions=(0.5, 0.25, 0.25))
    report = _prepare(tmp_path, _params(entry, name="src"))
    df = load_manifest(tmp_path / "prepared", "src")
    per_class = df.groupby("class")["split"].agg(["nunique", "size"])
    assert (per_class["nunique"] == 1).all() and (per_class["size"] == 11).all()  # a class's images, all splits
    # 6 classes x (0.5, 0.25, 0.25) = (3, 1.5, 1.5) -> largest remainders, ties to the earlier split: 3, 2, 1
    assert report.datasets["src"]["splits"] == {"meta_train": {"images": 33, "classes": 3},
                                                "meta_val": {"images": 22, "classes": 2},
                                                "meta_test": {"images": 11, "classes": 1}}


def test_named_class_without_images_is_reported_empty(tmp_path: Path) -> None:
    sha = _write(tmp_path / "b.npz", _arrays())
    report = _prepare(tmp_path, _params(NpzFileParams(path="b.npz", sha256=sha, class_names=("a", "b", "c"))))
    assert report.datasets["blood"]["empty_classes"] == ["blood/c"]
    assert report.datasets["blood"]["n_classes"] == 2


# --------------------------------------------------------------------------- the checksum
def test_wrong_checksum_names_the_key_and_both_digests_and_keeps_the_last_output(tmp_path: Path) -> None:
    sha = _write(tmp_path / "b.npz", _arrays())
    params = _params(NpzFileParams(path="b.npz", sha256=sha))
    _prepare(tmp_path, params)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "prepared").rglob("*") if p.is_file()}
    new_sha = _write(tmp_path / "b.npz", _arrays(seed=1))  # the file changed, params did not
    with pytest.raises(ChecksumError) as err:
        _prepare(tmp_path, params)
    msg = str(err.value)
    assert msg.startswith("prepare.npz_files.blood.sha256: ")
    assert f"expected {sha}" in msg and f"found {new_sha}" in msg and f"set prepare.npz_files.blood.sha256 to {new_sha}" in msg
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "prepared").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []


def test_missing_checksum_prints_the_digest_to_paste(tmp_path: Path) -> None:
    sha = _write(tmp_path / "b.npz", _arrays())
    with pytest.raises(DataError, match=rf"^prepare.npz_files.blood.sha256: missing\..*add `sha256: {sha}`"):
        _prepare(tmp_path, _params(NpzFileParams(path="b.npz")))
    assert not (tmp_path / "prepared").exists()


def test_missing_file_names_the_path_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^prepare.npz_files.blood.path: 'nope.npz' is not a file"):
        _prepare(tmp_path, _params(NpzFileParams(path="nope.npz", sha256="0" * 64)))


# --------------------------------------------------------------------------- bad content
def _without(key: str) -> dict[str, np.ndarray]:
    a = _arrays()
    del a[key]
    return a


def _with(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {**_arrays(), key: value}


BAD = {
    "missing key": (_without("test_labels"), r"missing key\(s\) \['test_labels'\]"),
    "val half": (_without("val_labels"), r"has val_images but no val_labels"),
    "float images": (_with("train_images", np.zeros((12, 16, 16), np.float32)), r"train_images has dtype float32; expected uint8"),
    "image shape": (_with("test_images", np.zeros((6, 16, 16, 2), np.uint8)), r"test_images has shape \(6, 16, 16, 2\)"),
    "label count": (_with("val_labels", np.zeros(5, np.int64)), r"val_labels has shape \(5,\); expected \(4,\)"),
    "float labels": (_with("train_labels", np.zeros(12, np.float64)), r"train_labels has dtype float64; expected integer"),
    "negative label": (_with("test_labels", np.array([0, 1, -1, 0, 1, 0])),
                       r"test_labels: 1 label\(s\) out of range \[0, \.\.\.\) \(labels are class indices\) \(row 2: -1\)"),
    "multi-label": (_with("train_labels", np.zeros((12, 3), np.int64)), r"multi-label data is not supported"),
    "label ids": (_with("test_labels", np.array([0, 1, 0, 1, 0, 999])), r"labels reach 999 but the file holds 22 images"),
    "tiny images": (_with("test_images", np.zeros((6, 4, 4), np.uint8)), r"test_images are 4x4 pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_content_names_the_file_and_the_array(tmp_path: Path, case: str) -> None:
    arrays, pattern = BAD[case]
    sha = _write(tmp_path / "bad.npz", arrays)
    with pytest.raises(DataError, match=pattern) as err:
        _prepare(tmp_path, _params(NpzFileParams(path="bad.npz", sha256=sha)))
    assert str(err.value).startswith(f"{tmp_path / 'bad.npz'}: ")


def test_labels_beyond_class_names_and_a_non_npz_file(tmp_path: Path) -> None:
    sha = _write(tmp_path / "b.npz", _arrays(n_classes=3))
    with pytest.raises(DataError, match=r"label\(s\) out of range \[0, 1\].*prepare.npz_files.blood.class_names \(2 names\)"):
        _prepare(tmp_path, _params(NpzFileParams(path="b.npz", sha256=sha, class_names=("a", "b"))))
    (tmp_path / "text.npz").write_text("not an archive\n")
    with pytest.raises(DataError, match=r"text.npz: cannot read as .npz"):
        _prepare(tmp_path, _params(NpzFileParams(path="text.npz", sha256=_sha(tmp_path / "text.npz"))))


# --------------------------------------------------------------------------- params
@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _load(raw: dict, entries: object) -> object:
    bad = copy.deepcopy(raw)
    bad["prepare"]["npz_files"] = entries
    return params_from_mapping(bad)


def test_params_defaults_and_absent_or_empty_section(raw: dict) -> None:
    raw["prepare"].pop("npz_files", None)
    assert params_from_mapping(raw).prepare.npz_files == {}
    assert _load(raw, {}).prepare.npz_files == {}
    entry = _load(raw, {"blood": {"path": "own/blood.npz", "sha256": "a" * 64}}).prepare.npz_files["blood"]
    assert entry == NpzFileParams(path="own/blood.npz", sha256="a" * 64, role="target",
                                  split_fractions=(0.7, 0.15, 0.15), class_names=())
    assert _load(raw, {"b": {"path": "b.npz"}}).prepare.npz_files["b"].sha256 == ""  # prepare asks for it


@pytest.mark.parametrize("entries, pattern", [
    ({"b": {"path": "b.npz", "sha": "a" * 64}}, r"prepare.npz_files.b: unknown key\(s\) \['sha'\]; valid keys: "
                                               r"\['class_names', 'path', 'role', 'sha256', 'split_fractions'\]"),
    ({"b": {"sha256": "a" * 64}}, r"prepare.npz_files.b.path: missing required key"),
    ({"b": {"path": "b.npz", "sha256": "g" * 64}}, r"prepare.npz_files.b.sha256: must be 64 hex digits .* found 'gggg"),
    ({"b": {"path": "b.npz", "sha256": "a" * 63}}, r"prepare.npz_files.b.sha256: must be 64 hex digits"),
    ({"b": {"path": "b.npz", "role": "both"}}, r"prepare.npz_files.b.role: must be one of \['source', 'target'\], found 'both'"),
    ({"b": {"path": "b.npz", "split_fractions": [0.5, 0.5, 0.5]}}, r"prepare.npz_files.b.split_fractions: must be three"),
    ({"b": {"path": "b.npz", "class_names": ["x", "y", "x"]}}, r"prepare.npz_files.b.class_names: names must be distinct, found \['x'\]"),
    ({"b": {"path": "b.npz", "class_names": ["x", "a/b"]}}, r"prepare.npz_files.b.class_names: every name must be non-empty and without '/'"),
    ({"breastmnist": {"path": "b.npz"}}, r"prepare.npz_files.breastmnist: the name 'breastmnist' is already a dataset of the source table"),
    ({"../x": {"path": "b.npz"}}, r"prepare.npz_files.../x: the entry name is the dataset name"),
    ({"b": {"path": ""}}, r"prepare.npz_files.b.path: must name a .npz file"),
    ({"b": "b.npz"}, r"prepare.npz_files.b: expected a mapping"),
])
def test_params_errors_name_the_key(raw: dict, entries: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        _load(raw, entries)


def test_name_shared_with_an_image_folder_is_refused(raw: dict) -> None:
    raw["prepare"]["image_folders"] = {"b": {"path": "x", "role": "target", "split_fractions": [0.6, 0.2, 0.2]}}
    with pytest.raises(ConfigError, match=r"prepare.npz_files.b: the name 'b' is already a dataset of prepare.image_folders"):
        _load(raw, {"b": {"path": "b.npz"}})


def test_prepared_dataset_names_lists_every_kind_once() -> None:
    p = PrepareParams(image_size=16, channels=1, omniglot_protocol="vinyals", meta_val_classes=0,
                      image_folders={"clinic": ImageFolderParams(path="c", role="target", split_fractions=(1, 0, 0))},
                      npz_files={"blood": NpzFileParams(path="b.npz")})
    assert prep.prepared_dataset_names(("omniglot", "kmnist", "clinic"), p) == ("omniglot", "kmnist", "clinic", "blood")


# --------------------------------------------------------------------------- docs
def test_documented_example_loads_and_every_key_is_documented(raw: dict) -> None:
    import re

    example = yaml.safe_load((ROOT / "docs/examples/npz_files.yaml").read_text())["prepare"]["npz_files"]
    params = _load(raw, example)
    assert set(params.prepare.npz_files) == {"blood", "cells_source"}
    guide = (ROOT / "docs/guide.md").read_text()
    start = guide.index("### Your own npz file: `prepare.npz_files`")
    section = guide[start:guide.index("\n## ", start)]
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \| ", section, re.M)}  # the key table (key, default, value)
    assert rows == set(NpzFileParams.model_fields)
