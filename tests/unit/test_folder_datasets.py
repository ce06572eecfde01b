"""Folder datasets on real slices of the mirror: fetch (links + SHA256SUMS), the csv and
split-folder importers, colour modes, carved validation, duplicates, memory-mapped splits."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data import importers as imp
from metatransfer.data import prepare as prep
from metatransfer.data.checksums import read_manifest
from metatransfer.data.convert import convert_batch
from metatransfer.data.fetch import fetch
from metatransfer.data.sources import DATASETS
from metatransfer.data.store import load_manifest, load_split
from metatransfer.errors import ChecksumError, DataError
from tests.slices import HAM_DUPLICATE_PAIR, make_slice_mirror

FOLDERS = ("mini_imagenet", "brain_tumor_mri", "ham10000_mel_nv")


def params(**kw) -> PrepareParams:
    base = dict(image_size=32, channels=3, omniglot_protocol="background_evaluation", meta_val_classes=0,
                val_fraction=0.34)
    base.update(kw)
    return PrepareParams(**base)


@pytest.fixture(scope="module")
def slim(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_slice_mirror(tmp_path_factory.mktemp("slim") / "mirror", mirror)


@pytest.fixture(scope="module")
def raw(slim: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    for name in FOLDERS:
        fetch(name, raw, slim)
    return raw


@pytest.fixture(scope="module")
def prepared(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prep.prepare(params(), FOLDERS, raw, out, seed=0)
    return out


def _copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


# --------------------------------------------------------------------------- registry + fetch
def test_registry_has_public_provenance() -> None:
    commits = {"mini_imagenet": "557ebcae0db23651f9370f54a5f31b1f0fd4064d",
               "brain_tumor_mri": "1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec",
               "ham10000_mel_nv": "25b3c4a6b36efdc2b1468b78116f1ae2fb9b69b0"}
    for name, commit in commits.items():
        src = DATASETS[name]
        assert src.folder is not None and commit in src.folder.url and commit in src.folder.origin
        assert dict(src.folder.reference)["SHA256SUMS"] and src.files == ()
    assert (DATASETS["mini_imagenet"].kind, DATASETS["mini_imagenet"].role) == ("csv_split", "source")
    assert {DATASETS[n].role for n in ("brain_tumor_mri", "ham10000_mel_nv")} == {"target"}


def test_fetch_links_verifies_and_skips_when_present(slim: Path, raw: Path, mirror: Path) -> None:
    got = raw / "mini_imagenet"
    listed = read_manifest(got / "SHA256SUMS")
    assert len(listed) == 3 * 5 * 12
    assert sorted(p.name for p in got.iterdir()) == ["SHA256SUMS", "images", "test.csv", "train.csv", "val.csv"]
    one = next(iter(listed))
    assert os.path.samefile(got / one, mirror / "mini_imagenet" / one)  # hard link: no bytes copied
    before = got.stat().st_ino
    assert fetch("mini_imagenet", raw, slim) == [got]
    assert got.stat().st_ino == before  # verified and skipped, not rebuilt
    assert [p.name for p in raw.iterdir() if p.name.startswith(".")] == []


def test_wrong_checksum_names_file_expected_found_and_leaves_nothing(slim: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m"
    _copy_tree(slim / "brain_tumor_mri", bad / "brain_tumor_mri")
    lines = (bad / "brain_tumor_mri/SHA256SUMS").read_text().splitlines()
    digest, rel = lines[2].split("  ")
    lines[2] = f"{'0' * 64}  {rel}"
    (bad / "brain_tumor_mri/SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(ChecksumError) as err:
        fetch("brain_tumor_mri", tmp_path / "raw", bad)
    msg = str(err.value)
    assert f"{bad / 'brain_tumor_mri' / rel}: expected sha256 {'0' * 64}, found {digest}" in msg
    assert "1 of 27 file(s)" in msg and "regenerate SHA256SUMS" in msg
    assert not (tmp_path / "raw" / "brain_tumor_mri").exists()
    assert [p.name for p in (tmp_path / "raw").iterdir()] == []  # no temp folder left


def test_file_listed_in_sha256sums_but_missing(slim: Path, tmp_path: Path) -> None:
    bad = tmp_path / "m"
    _copy_tree(slim / "ham10000_mel_nv", bad / "ham10000_mel_nv")
    (bad / "ham10000_mel_nv" / HAM_DUPLICATE_PAIR[1]).unlink()
    with pytest.raises(ChecksumError, match=rf"{HAM_DUPLICATE_PAIR[1]}: expected sha256 [0-9a-f]{{64}}, found no such file"):
        fetch("ham10000_mel_nv", tmp_path / "raw", bad)


def test_no_mirror_says_where_to_get_and_where_to_put(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fetch("mini_imagenet", tmp_path, None)
    msg = str(err.value)
    assert "https://github.com/Deo0330/split_minidataset/tree/557ebcae" in msg
    assert "<mirror>/mini_imagenet/" in msg and "data.mirror" in msg and "train.csv" in msg
    with pytest.raises(DataError, match=r"folder not found in the mirror .*KomalChaudhari8/BRAIN_TUMOR_APP"):
        fetch("brain_tumor_mri", tmp_path, tmp_path / "empty_mirror")


# --------------------------------------------------------------------------- csv layout
def test_csv_layout_splits_classes_and_pixels(raw: Path, prepared: Path) -> None:
    m = load_manifest(prepared, "mini_imagenet")
    csvs = {s: pd.read_csv(raw / "mini_imagenet" / f"{s}.csv") for s in ("train", "val", "test")}
    for split, meta_split in zip(("train", "val", "test"), ("meta_train", "meta_val", "meta_test")):
        rows = m[m["split"] == meta_split]
        assert sorted(rows["source_path"]) == sorted("images/" + csvs[split]["filename"])
        assert sorted(rows["class"].unique()) == sorted("mini_imagenet/" + csvs[split]["label"].unique())
    assert m.groupby("class")["split"].nunique().max() == 1  # class-disjoint, as the csvs are
    assert m["split"].tolist() == sorted(m["split"], key=["meta_train", "meta_val", "meta_test"].index)  # grouped
    assert set(m["orig_height"]) == {84} and set(m["orig_channels"]) == {3}
    # pixels: the area-resized decoded JPEG, channel-first
    row = m.iloc[7]
    with Image.open(raw / "mini_imagenet" / row["source_path"]) as im:
        ref = convert_batch(imp.ImageBatch(np.asarray(im.convert("RGB"))[None]), 32, 3)[0]
    assert (np.load(prepared / "mini_imagenet/images.npy", mmap_mode="r")[row["id"]] == ref).all()


def _mini_copy(slim: Path, dst: Path) -> Path:
    return _copy_tree(slim / "mini_imagenet", dst)


def test_csv_missing_file_unknown_header_and_image_in_two_splits(slim: Path, tmp_path: Path) -> None:
    root = _mini_copy(slim, tmp_path / "a")
    first = pd.read_csv(root / "train.csv")["filename"].iloc[3]
    (root / "images" / first).unlink()
    with pytest.raises(DataError, match=rf"1 image\(s\) listed in the csvs are not in images/:\n  train.csv line 5: .*{first}"):
        imp.import_csv_split(root, "mini")

    root = _mini_copy(slim, tmp_path / "b")
    (root / "val.csv").write_text("file,wnid\n" + "\n".join((root / "val.csv").read_text().splitlines()[1:]) + "\n")
    with pytest.raises(DataError, match=r"val.csv: header must be 'filename,label' .*found 'file,wnid'"):
        imp.import_csv_split(root, "mini")

    root = _mini_copy(slim, tmp_path / "c")
    test = pd.read_csv(root / "test.csv")
    train = pd.read_csv(root / "train.csv")
    test.loc[0, "filename"] = train["filename"].iloc[0]  # one image listed in train and test
    test.to_csv(root / "test.csv", index=False)
    with pytest.raises(DataError) as err:
        imp.import_csv_split(root, "mini")
    assert f"test.csv line 2: image '{train['filename'].iloc[0]}' in two splits (also train.csv line 2)" in str(err.value)


def test_csv_within_class_duplicate_quarantined(mirror: Path, tmp_path: Path) -> None:
    # the real mini-ImageNet holds n0209183100000748 and ..1256: same bytes, same class
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    names = {"train": ["n0209183100000748.jpg", "n0209183100001256.jpg", "n0209183100000001.jpg"],
             "val": ["n0153282900000005.jpg"], "test": ["n0153282900000006.jpg"]}
    labels = {"train": "n02091831", "val": "n01532829", "test": "n01532830"}
    for split, files in names.items():
        for f in files:
            shutil.copyfile(mirror / "mini_imagenet/images" / f, root / "images" / f)
        (root / f"{split}.csv").write_text("filename,label\n" + "".join(f"{f},{labels[split]}\n" for f in files))
    (root / "images" / "stray.jpg").write_bytes((root / "images" / names["val"][0]).read_bytes())
    data = imp.import_csv_split(root, "mini_imagenet")
    assert [(q.source_path, q.reason) for q in data.quarantine] == [
        ("images/stray.jpg", "not listed in train.csv, val.csv or test.csv")]
    out = tmp_path / "out"
    staged = prep.build_dataset(data, params(), 0, out)
    df, q = staged[0], staged[1]
    assert len(df) == 4
    assert [(r.source_path, r.reason) for r in q[1:]] == [
        ("images/n0209183100001256.jpg", "exact duplicate of images/n0209183100000748.jpg in the same class")]


# --------------------------------------------------------------------------- split folders
def test_split_folder_test_kept_val_carved_stratified(raw: Path, prepared: Path) -> None:
    m = load_manifest(prepared, "brain_tumor_mri")
    given_test = sorted(p.relative_to(raw / "brain_tumor_mri").as_posix()
                        for p in (raw / "brain_tumor_mri/Testing").rglob("*.jpg"))
    assert sorted(m.loc[m["split"] == "test", "source_path"]) == given_test  # test kept as given
    counts = m.groupby(["class", "split"]).size().unstack().to_dict("index")
    # 6 training files per class, val_fraction 0.34 -> round(2.04) = 2 carved per class (stratified)
    assert {c: (v["train"], v["val"], v["test"]) for c, v in counts.items()} == {
        "brain_tumor_mri/glioma": (4, 2, 3), "brain_tumor_mri/meningioma": (4, 2, 3), "brain_tumor_mri/notumor": (4, 2, 3)}
    assert m.loc[m["split"] == "val", "source_path"].str.startswith("Training/").all()


def test_val_carving_same_for_same_seed(raw: Path, prepared: Path, tmp_path: Path) -> None:
    prep.prepare(params(), ("brain_tumor_mri",), raw, tmp_path / "a", seed=0)
    prep.prepare(params(), ("brain_tumor_mri",), raw, tmp_path / "b", seed=5)
    a = load_manifest(tmp_path / "a", "brain_tumor_mri")
    pd.testing.assert_frame_equal(a, load_manifest(prepared, "brain_tumor_mri"))
    assert (tmp_path / "a/brain_tumor_mri/images.npy").read_bytes() == (prepared / "brain_tumor_mri/images.npy").read_bytes()
    b = load_manifest(tmp_path / "b", "brain_tumor_mri")
    assert set(a.loc[a["split"] == "val", "source_path"]) != set(b.loc[b["split"] == "val", "source_path"])
    assert a.groupby(["class", "split"]).size().equals(b.groupby(["class", "split"]).size())


def test_real_grey_and_rgb_files_converted(raw: Path, prepared: Path, tmp_path: Path) -> None:
    m = load_manifest(prepared, "brain_tumor_mri")
    assert set(m["orig_channels"]) == {1, 3}
    images = np.load(prepared / "brain_tumor_mri/images.npy", mmap_mode="r")
    grey = m[m["orig_channels"] == 1].iloc[0]
    g = images[grey["id"]]
    assert g.shape == (3, 32, 32) and (g[0] == g[1]).all() and (g[1] == g[2]).all()  # grey -> RGB by replication
    # channels 1: an RGB file becomes ITU-R 601 luma
    prep.prepare(params(channels=1), ("brain_tumor_mri",), raw, tmp_path / "g", seed=0)
    m1 = load_manifest(tmp_path / "g", "brain_tumor_mri")
    row = m1[m1["orig_channels"] == 3].iloc[0]
    with Image.open(raw / "brain_tumor_mri" / row["source_path"]) as im:
        rgb = np.asarray(im.convert("RGB"), np.float64)
    luma = (rgb @ np.array([0.299, 0.587, 0.114])).reshape(32, 7, 32, 7).mean(axis=(1, 3))
    got = np.load(tmp_path / "g/brain_tumor_mri/images.npy")[row["id"], 0].astype(np.float64)
    assert np.abs(got - luma).max() <= 1.0


def _img(path: Path, mode: str, size: int = 24, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (size, size), dtype=np.uint16)).save(path)
        return
    base = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    im = base.convert(mode) if mode != "RGBA" else base.copy()
    if mode == "RGBA":
        im.putalpha(7)
    im.save(path)


def test_every_colour_mode_converted(tmp_path: Path) -> None:
    root = tmp_path / "clinic"
    modes = {"L": "png", "RGB": "png", "RGBA": "png", "P": "png", "CMYK": "jpg", "I;16": "png", "LA": "png", "1": "png"}
    for k, (mode, ext) in enumerate(modes.items()):
        for split, n in (("Training", 3), ("Testing", 1)):
            for i in range(n):
                _img(root / split / f"c{k % 2}" / f"{mode.replace(';', '')}_{i}.{ext}", mode, value=100 * k + 10 * i + len(split))
    folder = ImageFolderParams(str(root), "target", (0.6, 0.2, 0.2))  # layout auto -> split/class
    r = prep.prepare(params(image_size=16, image_folders={"clinic": folder}), ("clinic",), tmp_path / "raw",
                     tmp_path / "out", seed=0)
    m = load_manifest(tmp_path / "out", "clinic")
    assert r.quarantined == 0 and len(m) == 32
    by_name = m.set_index(m["source_path"].map(lambda s: Path(s).stem.split("_")[0]))
    assert by_name.loc["L", "orig_channels"].tolist() == [1] * 4 and by_name.loc["I16", "orig_channels"].tolist() == [1] * 4
    assert set(by_name.loc[["RGB", "RGBA", "P", "CMYK"], "orig_channels"]) == {3}
    images = np.load(tmp_path / "out/clinic/images.npy")
    assert images.shape == (32, 3, 16, 16)
    # RGBA: alpha dropped (an alpha of 7 does not darken the pixels)
    rgba = Path(by_name.loc["RGBA"].iloc[0]["source_path"])
    with Image.open(rgba) as im:
        ref = convert_batch(imp.ImageBatch(np.asarray(im.convert("RGB"))[None]), 16, 3)[0]
    assert (images[by_name.loc["RGBA"].iloc[0]["id"]] == ref).all()
    # I;16: scaled to 8 bits (x // 257), then replicated to 3 channels
    i16 = by_name.loc["I16"].iloc[0]
    with Image.open(i16["source_path"]) as im:
        ref16 = (np.asarray(im, np.int64) // 257).astype(np.uint8)
    ref16 = convert_batch(imp.ImageBatch(ref16[None, ..., None]), 16, 3)[0]
    assert (images[i16["id"]] == ref16).all()
    assert m.groupby("split").size().to_dict() == {"test": 8, "train": 16, "val": 8}  # 12 per class train, round(4.08)=4 val


def test_ham_duplicate_pair_quarantined_and_test_intact(prepared: Path) -> None:
    q = pd.read_csv(prepared / "quarantine.csv")
    ham = q[q["dataset"] == "ham10000_mel_nv"]
    assert ham[["source_path", "reason"]].values.tolist() == [
        [HAM_DUPLICATE_PAIR[1], f"exact duplicate of {HAM_DUPLICATE_PAIR[0]} in the same class"]]
    m = load_manifest(prepared, "ham10000_mel_nv")
    assert HAM_DUPLICATE_PAIR[0] in set(m.loc[m["split"] == "test", "source_path"])
    assert "SHA256SUMS" not in set(q["source_path"].map(lambda s: Path(s).name))  # the manifest is no input


def test_within_class_copy_across_train_and_test_keeps_test(tmp_path: Path) -> None:
    root = tmp_path / "t"
    for split, cls, i in (("train", "a", 0), ("train", "a", 1), ("train", "b", 2), ("test", "a", 3), ("test", "b", 4)):
        _img(root / split / cls / f"{i}.png", "RGB", value=i)
    shutil.copyfile(root / "train/a/0.png", root / "test/a/zz_copy.png")
    r = prep.prepare(params(image_folders={"t": ImageFolderParams(str(root), "target", (0.6, 0.2, 0.2))}), ("t",),
                     tmp_path / "raw", tmp_path / "out", 0)
    q = pd.read_csv(tmp_path / "out/quarantine.csv")
    assert [Path(p).relative_to(root).as_posix() for p in q["source_path"]] == ["train/a/0.png"]
    assert r.datasets["t"]["splits"]["test"]["images"] == 3


# --------------------------------------------------------------------------- layouts
def test_layout_detection_and_explicit_layout(tmp_path: Path) -> None:
    for tops, want in ((("Training", "Testing"), "split/class"), (("train", "VAL", "test"), "split/class"),
                       (("train", "cats"), "class")):
        root = tmp_path / "_".join(tops)
        for t in tops:
            _img(root / t / "x" / "0.png", "RGB") if want == "split/class" else _img(root / t / "0.png", "RGB")
        assert imp.detect_layout(root) == want
    dom = tmp_path / "dom"
    _img(dom / "photo/cat/0.png", "RGB")
    assert imp.detect_layout(dom) == "domain/class"
    tv = tmp_path / "train_VAL_test"
    data = imp.import_image_folder(tv, "tv")
    assert (data.layout, data.meta["origin"].tolist(), data.meta["class"].tolist()) == (
        "split/class", ["train", "val", "test"], ["tv/x"] * 3)
    # explicit "domain/class" on the same tree: the top folders become domains
    data = imp.import_image_folder(tv, "tv", layout="domain/class")
    assert sorted(data.meta["class"]) == ["tv/VAL/x", "tv/test/x", "tv/train/x"] and set(data.meta["origin"]) == {""}
    with pytest.raises(DataError, match=r"top-level folder 'photo' is not a split name"):
        imp.import_image_folder(dom, "d", layout="split/class")
    both = tmp_path / "both"
    _img(both / "train/a/0.png", "RGB")
    _img(both / "Training/a/1.png", "RGB")
    with pytest.raises(DataError, match=r"folders 'Training' and 'train' both mean split 'train'"):
        imp.import_image_folder(both, "b")


def test_given_val_folder_is_kept_and_source_role_needs_disjoint_classes(tmp_path: Path) -> None:
    root = tmp_path / "t"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for i in range(n):
            _img(root / split / "a" / f"{i}.png", "RGB", value=10 * ("train", "val", "test").index(split) + i)  # distinct seeds: no duplicate images
    p = params(val_fraction=0.5, image_folders={"t": ImageFolderParams(str(root), "target", (1.0, 0.0, 0.0))})
    prep.prepare(p, ("t",), tmp_path / "raw", tmp_path / "out", 0)
    m = load_manifest(tmp_path / "out", "t")
    assert m.groupby("split").size().to_dict() == {"test": 2, "train": 4, "val": 2}  # val as given, nothing carved
    p = params(image_folders={"t": ImageFolderParams(str(root), "source", (1.0, 0.0, 0.0))})
    with pytest.raises(DataError, match=r"role source needs class-disjoint split folders.*t/a in \['test', 'train', 'val'\]"):
        prep.prepare(p, ("t",), tmp_path / "raw", tmp_path / "out2", 0)


# --------------------------------------------------------------------------- store
def _file_offset(view: np.memmap) -> int:
    """Byte offset of a memmap view's first element inside its mapped file (fails for a copy)."""
    start = np.frombuffer(view._mmap, dtype=np.uint8).ctypes.data
    return int(view.__array_interface__["data"][0] - start)


def test_load_split_is_a_memory_mapped_view(prepared: Path) -> None:
    whole = np.load(prepared / "mini_imagenet/images.npy", mmap_mode="r")
    m = load_manifest(prepared, "mini_imagenet")
    for split in ("meta_train", "meta_val", "meta_test"):
        s = load_split(prepared, "mini_imagenet", split)
        ids = m.loc[m["split"] == split, "id"].to_numpy()
        assert isinstance(s.images, np.memmap) and not s.images.flags.writeable
        assert s.images.shape == (60, 3, 32, 32)
        assert _file_offset(s.images) == 128 + int(ids[0]) * 3 * 32 * 32  # the split's block of the file, no copy
        assert (np.asarray(s.images[[0, 59]]) == whole[ids[[0, 59]]]).all()
        assert s.class_names == tuple(sorted(m.loc[m["split"] == split, "class"].unique()))


def test_image_size_224_rgb_keeps_native_224_pixels(raw: Path, tmp_path: Path) -> None:
    prep.prepare(params(image_size=224), ("brain_tumor_mri",), raw, tmp_path / "big", seed=0)
    s = load_split(tmp_path / "big", "brain_tumor_mri", "test")
    m = load_manifest(tmp_path / "big", "brain_tumor_mri")
    row = m[(m["split"] == "test") & (m["orig_channels"] == 3)].iloc[0]
    with Image.open(raw / "brain_tumor_mri" / row["source_path"]) as im:
        ref = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    assert s.images.shape == (9, 3, 224, 224)
    assert (whole := np.load(tmp_path / "big/brain_tumor_mri/images.npy", mmap_mode="r")).shape[0] == len(m)
    assert (whole[row["id"]] == ref).all()  # native size: untouched
