"""prepare: splits, duplicates, schema enforcement, atomic writes, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data import prepare as prep
from metatransfer.data.schemas import validate_manifest
from metatransfer.data.fetch import fetch
from metatransfer.data.store import load_manifest
from metatransfer.errors import DataError


def params(**kw) -> PrepareParams:
    base = dict(image_size=28, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=10)
    base.update(kw)
    return PrepareParams(**base)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    for name in ("omniglot_small", "breastmnist", "retinamnist"):
        fetch(name, raw, mirror)
    return raw


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p") / "prepared"
    prep.prepare(params(), ("omniglot_small", "breastmnist", "retinamnist"), raw, out, seed=0)
    return out


def _tree(root: Path, spec: dict[str, int], size: int = 32, k: int = 0) -> Path:
    """ImageFolder tree with `n` distinct random images per class (seeds from k + 1 on)."""
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k += 1
            arr = np.random.default_rng(k).integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")
    return root


# --------------------------------------------------------------------------- real data
def test_layout_splits_and_report(prepared: Path) -> None:
    assert sorted(p.name for p in prepared.iterdir()) == ["breastmnist", "omniglot_small", "quarantine.csv",
                                                          "report.json", "retinamnist"]
    om = load_manifest(prepared, "omniglot_small")
    images = np.load(prepared / "omniglot_small" / "images.npy")
    assert images.shape == (len(om), 1, 28, 28) and images.dtype == np.uint8
    by_split = om.groupby("split")["class"].nunique().to_dict()
    assert by_split == {"meta_train": 232, "meta_val": 10}
    sets = [set(om.loc[om["split"] == s, "class"]) for s in ("meta_train", "meta_val")]
    assert not sets[0] & sets[1]
    retina = load_manifest(prepared, "retinamnist")
    assert retina["split"].value_counts().to_dict() == {"train": 1080, "test": 400, "val": 120}
    report = json.loads((prepared / "report.json").read_text())
    assert report["datasets"]["breastmnist"]["splits"]["test"] == {"images": 156, "classes": 2}


def test_real_breastmnist_duplicate_dropped_from_train_and_test_intact(prepared: Path) -> None:
    q = pd.read_csv(prepared / "quarantine.csv")
    row = q[q["dataset"] == "breastmnist"]
    assert row["source_path"].tolist() == ["breastmnist.npz:train_images[115]"]
    assert "same pixels as breastmnist.npz:test_images[76]" in row["reason"].iloc[0]
    m = load_manifest(prepared, "breastmnist")
    assert m["split"].value_counts().to_dict() == {"train": 545, "test": 156, "val": 78}
    assert m.groupby("pixel_hash")["split"].nunique().max() == 1


def test_same_seed_same_manifest_other_seed_other_meta_val(raw: Path, prepared: Path, tmp_path: Path) -> None:
    prep.prepare(params(), ("omniglot_small",), raw, tmp_path / "a", seed=0)
    prep.prepare(params(), ("omniglot_small",), raw, tmp_path / "b", seed=1)
    a = pd.read_parquet(tmp_path / "a/omniglot_small/manifest.parquet")
    pd.testing.assert_frame_equal(a, load_manifest(prepared, "omniglot_small", validate=False))
    assert (tmp_path / "a/omniglot_small/images.npy").read_bytes() == (prepared / "omniglot_small/images.npy").read_bytes()
    b = pd.read_parquet(tmp_path / "b/omniglot_small/manifest.parquet")
    assert set(a.loc[a["split"] == "meta_val", "class"]) != set(b.loc[b["split"] == "meta_val", "class"])


def test_vinyals_protocol_and_too_many_meta_val(raw: Path, tmp_path: Path) -> None:
    r = prep.prepare(params(omniglot_protocol="vinyals", meta_val_classes=5), ("omniglot_small",), raw, tmp_path / "v", 0)
    # 242 classes < 1200: all meta-train (minus meta-val), none meta-test
    assert r.datasets["omniglot_small"]["splits"]["meta_val"]["classes"] == 5
    assert r.datasets["omniglot_small"]["splits"]["meta_test"]["images"] == 0
    with pytest.raises(DataError, match=r"prepare.meta_val_classes=500 but omniglot_small has only 242"):
        prep.prepare(params(meta_val_classes=500), ("omniglot_small",), raw, tmp_path / "w", 0)


@pytest.mark.slow
def test_full_omniglot_background_evaluation_and_vinyals(tmp_path: Path, mirror: Path) -> None:
    raw = tmp_path / "raw"
    fetch("omniglot", raw, mirror)
    r = prep.prepare(params(meta_val_classes=100), ("omniglot",), raw, tmp_path / "be", 0)
    s = r.datasets["omniglot"]["splits"]
    assert (s["meta_train"]["classes"], s["meta_val"]["classes"], s["meta_test"]["classes"]) == (864, 100, 659)
    r = prep.prepare(params(omniglot_protocol="vinyals", meta_val_classes=100), ("omniglot",), raw, tmp_path / "vi", 0)
    s = r.datasets["omniglot"]["splits"]
    assert (s["meta_train"]["classes"], s["meta_val"]["classes"], s["meta_test"]["classes"]) == (1100, 100, 423)
    assert r.quarantined == 0


# --------------------------------------------------------------------------- image folders
def test_image_folder_target_and_source_splits(tmp_path: Path) -> None:
    _tree(tmp_path / "t", {"a": 10, "b": 5})
    _tree(tmp_path / "s", {f"c{i}": 2 for i in range(10)})
    p = params(image_folders={
        "tgt": ImageFolderParams(str(tmp_path / "t"), "target", (0.6, 0.2, 0.2)),
        "src": ImageFolderParams(str(tmp_path / "s"), "source", (0.6, 0.2, 0.2)),
    })
    prep.prepare(p, ("tgt", "src"), tmp_path / "raw", tmp_path / "out", seed=3)
    t = load_manifest(tmp_path / "out", "tgt")
    counts = t.groupby(["class", "split"]).size().to_dict()
    assert counts == {("tgt/a", "train"): 6, ("tgt/a", "val"): 2, ("tgt/a", "test"): 2,
                      ("tgt/b", "train"): 3, ("tgt/b", "val"): 1, ("tgt/b", "test"): 1}
    s = load_manifest(tmp_path / "out", "src")
    assert s.groupby("split")["class"].nunique().to_dict() == {"meta_train": 6, "meta_val": 2, "meta_test": 2}
    assert s.groupby("class")["split"].nunique().max() == 1
    assert set(t["orig_channels"]) == {3} and np.load(tmp_path / "out/tgt/images.npy").shape[1:] == (1, 28, 28)


def test_within_class_copy_quarantined_cross_class_copy_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", {"a": 6, "b": 6})
    (root / "a" / "copy.png").write_bytes((root / "a" / "000.png").read_bytes())
    p = params(image_folders={"tgt": ImageFolderParams(str(root), "target", (0.5, 0.0, 0.5))})
    prep.prepare(p, ("tgt",), tmp_path / "raw", tmp_path / "out", seed=0)
    q = pd.read_csv(tmp_path / "out/quarantine.csv")
    assert q["source_path"].str.endswith("a/copy.png").tolist() == [True]
    assert q["reason"].iloc[0].startswith("exact duplicate of") and "a/000.png" in q["reason"].iloc[0]
    # the same image under two labels: a labelling error only the user can fix -> fail, listing both files,
    # whatever split the copies land in (same split or not)
    (root / "b" / "from_a.png").write_bytes((root / "a" / "001.png").read_bytes())
    for seed in (0, 1, 2):
        with pytest.raises(DataError) as err:
            prep.prepare(p, ("tgt",), tmp_path / "raw", tmp_path / f"o{seed}", seed=seed)
        msg = str(err.value)
        assert "1 image(s) appear under two classes" in msg and "a/001.png' (tgt/a," in msg and "b/from_a.png' (tgt/b," in msg
        assert not (tmp_path / f"o{seed}").exists()


def test_failed_prepare_leaves_previous_output_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "t", {"a": 4, "b": 4})
    p = params(image_folders={"tgt": ImageFolderParams(str(root), "target", (0.5, 0.25, 0.25))})
    out = tmp_path / "out"
    prep.prepare(p, ("tgt",), tmp_path / "raw", out, seed=0)
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    # 1) bad input caught by validation
    with pytest.raises(DataError):
        prep.prepare(p, ("tgt", "missing_dataset"), tmp_path / "raw", out, seed=0)
    # 2) a crash in the middle of writing
    _tree(root, {"c": 4}, k=100)
    real_save = prep._save_manifest
    calls = []

    def failing_save(*a, **k):
        calls.append(a[1])
        real_save(*a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(prep, "_save_manifest", failing_save)
    with pytest.raises(OSError, match="disk full"):
        prep.prepare(p, ("tgt",), tmp_path / "raw", out, seed=0)
    assert calls  # the write really started
    after = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert after == before
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".out.")] == []  # no temp folder left behind


# --------------------------------------------------------------------------- schema
def _manifest() -> pd.DataFrame:
    n = 6
    return pd.DataFrame({
        "id": np.arange(n, dtype=np.int64), "dataset": "d", "domain": "d",
        "class": ["d/a", "d/a", "d/b", "d/b", "d/c", "d/c"],
        "label": np.array([0, 0, 1, 1, 2, 2], dtype=np.int64),
        "split": ["meta_train", "meta_train", "meta_val", "meta_val", "meta_test", "meta_test"],
        "source_path": [f"f{i}.png" for i in range(n)],
        "pixel_hash": [f"{i:032x}" for i in range(n)],
        "orig_height": np.full(n, 28, np.int64), "orig_width": np.full(n, 28, np.int64),
        "orig_channels": np.ones(n, np.int64),
    })


def test_schema_accepts_a_good_manifest() -> None:
    assert len(validate_manifest(_manifest(), "ok")) == 6


def test_schema_lists_every_failure_with_file_and_row() -> None:
    df = _manifest()
    df.loc[1, "split"] = "meta_test"           # class d/a in two meta splits
    df.loc[3, "pixel_hash"] = df.loc[5, "pixel_hash"]  # same pixels in meta_val and meta_test
    df.loc[4, "label"] = 9                      # label out of range
    df.loc[2, "id"] = 7                         # ids not contiguous
    with pytest.raises(DataError) as err:
        validate_manifest(df, "dataset d")
    msg = str(err.value)
    assert msg.startswith("dataset d: manifest validation failed")
    assert "row 1 file 'f1.png' (split meta_test, class d/a): meta_splits_class_disjoint" in msg
    assert "row 3 file 'f3.png'" in msg and "row 5 file 'f5.png'" in msg and "pixel_hash_in_one_split" in msg
    assert "row 4 file 'f4.png' (split meta_test, class d/c): labels_in_range" in msg
    assert "same pixels as 'f5.png' (meta_test)" in msg
    assert "row 2 file 'f2.png'" in msg and "ids_contiguous" in msg


def test_schema_rejects_mixed_split_families_and_unknown_split() -> None:
    df = _manifest()
    df.loc[0, "split"] = "train"
    df.loc[5, "split"] = "holdout"
    with pytest.raises(DataError) as err:
        validate_manifest(df, "d")
    assert "one_split_family" in str(err.value) and "'holdout'" in str(err.value)
