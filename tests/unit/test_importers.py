"""Importers on the real mirror files and on small bad inputs built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.data import importers as imp
from metatransfer.data.convert import convert_batch, pixel_hashes
from metatransfer.errors import DataError


def small_zips(mirror: Path) -> list[Path]:
    """The official `images_background_small{1,2}.zip` of the mirror."""
    return [mirror / "omniglot/official_small/images_background_small1.zip",
            mirror / "omniglot/official_small/images_background_small2.zip"]


# --------------------------------------------------------------------------- real files
def test_official_small_zips(mirror: Path) -> None:
    data = imp.import_omniglot_zips(small_zips(mirror), "omniglot_small")
    # small1 (2720) + small2 (3120) share Greek and Latin (1000 files), imported once
    assert len(data.meta) == 4840 and not data.quarantine
    assert data.meta["class"].nunique() == 242
    alphabets = {c.split("/")[1] for c in data.meta["class"]}
    assert len(alphabets) == 8 and "Japanese_(katakana)" in alphabets
    assert set(data.meta["origin"]) == {"background"}
    assert (data.meta[["orig_height", "orig_width"]] == 105).all().all()


def test_omniglot_npz_names_order_and_zip_equivalence(mirror: Path) -> None:
    om = mirror / "omniglot"
    data = imp.import_omniglot_npz(om / "images_background.npz", om / "images_evaluation.npz",
                                   om / "character_index.csv")
    assert len(data.meta) == 32460 and len(data.class_order) == 1623
    assert data.class_order[0] == "omniglot/Arcadian/character01"
    assert data.class_order[-1] == "omniglot/ULOG/character26"
    assert (data.meta["origin"] == "evaluation").sum() == 659 * 20
    # the npz and the official zip give the same prepared pixels for a character
    cls = "Greek/character01"
    rows = np.flatnonzero(data.meta["class"] == f"omniglot/{cls}")
    bg = data.batches[0].data[rows]
    npz = convert_batch(imp.ImageBatch(bg, background_true=True), 28, 1)
    z = imp.import_omniglot_zips(small_zips(mirror)[:1], "omniglot_small")
    zrows = np.flatnonzero(z.meta["class"] == f"omniglot_small/{cls}")
    zip_img = convert_batch(imp.ImageBatch(z.batches[0].data[zrows], background_true=True), 28, 1)
    assert sorted(pixel_hashes(npz)) == sorted(pixel_hashes(zip_img))
    # polarity: ink bright on black; most of a character image is background
    assert np.median(npz) == 0 and npz.max() == 255


def test_medmnist_both_label_shapes(mirror: Path) -> None:
    retina = imp.import_medmnist(mirror / "medmnist/retinamnist.npz", "retinamnist", 5)  # labels (N, 1), RGB
    assert retina.meta["origin"].value_counts().to_dict() == {"train": 1080, "test": 400, "val": 120}
    assert retina.batches[0].data.shape == (1080, 28, 28, 3) and set(retina.meta["orig_channels"]) == {3}
    breast = imp.import_medmnist(mirror / "medmnist/breastmnist.npz", "breastmnist", 2)  # labels (N,), grey
    assert len(breast.meta) == 780 and breast.batches[0].data.shape[-1] == 1
    assert sorted(breast.meta["class"].unique()) == ["breastmnist/malignant", "breastmnist/normal, benign"]


@pytest.mark.parametrize("name, n_classes", [("breastmnist", 2), ("retinamnist", 5)])
def test_medmnist_class_names_are_the_official_labels_in_label_order(mirror: Path, name: str, n_classes: int) -> None:
    import json

    info = json.loads((mirror / f"medmnist/{name}.INFO.json").read_text())["label"]
    data = imp.import_medmnist(mirror / f"medmnist/{name}.npz", name, n_classes)
    assert data.class_order == tuple(f"{name}/{info[str(i)]}" for i in range(n_classes))
    # The store numbers classes in sorted name order: that must be the npz's own label order.
    assert sorted(data.class_order) == list(data.class_order)
    npz = np.load(mirror / f"medmnist/{name}.npz")
    labels = np.concatenate([npz[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")])
    stored = data.meta["class"].map({c: i for i, c in enumerate(sorted(data.class_order))}).to_numpy()
    np.testing.assert_array_equal(stored, labels)


def test_medmnist_names_fall_back_to_numbers_when_unknown_or_out_of_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert imp.medmnist_class_names("pathmnist", 3) == ("pathmnist/00", "pathmnist/01", "pathmnist/02")
    assert imp.medmnist_class_names("breastmnist", 2) == ("breastmnist/malignant", "breastmnist/normal, benign")
    monkeypatch.setitem(imp.MEDMNIST_LABELS, "dermamnist", ("nevi", "melanoma"))  # would renumber the classes
    assert imp.medmnist_class_names("dermamnist", 2) == ("dermamnist/00", "dermamnist/01")
    assert imp.medmnist_class_names("breastmnist", 3)[0] == "breastmnist/00"  # count disagrees with the names


def test_kmnist(mirror: Path) -> None:
    data = imp.import_kmnist(mirror / "kmnist/kmnist-test-imgs.npz", mirror / "kmnist/kmnist-test-labels.npz")
    assert data.meta["class"].value_counts().tolist() == [1000] * 10


# --------------------------------------------------------------------------- bad npz
def _medmnist_npz(path: Path, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_missing_keys(tmp_path: Path) -> None:
    p = _medmnist_npz(tmp_path / "m.npz", val_labels=None)
    with pytest.raises(DataError, match=r"m.npz: missing key\(s\) \['val_labels'\]"):
        imp.import_medmnist(p, "m", 2)


def test_npz_wrong_shapes(tmp_path: Path) -> None:
    p = _medmnist_npz(tmp_path / "m.npz", train_images=np.zeros((6, 28, 28, 2), np.uint8))
    with pytest.raises(DataError, match=r"train_images has shape \(6, 28, 28, 2\)"):
        imp.import_medmnist(p, "m", 2)
    p = _medmnist_npz(tmp_path / "m2.npz", test_labels=np.zeros(5, np.uint8))
    with pytest.raises(DataError, match=r"test_labels has shape \(5,\); expected \(3,\) or \(3, 1\)"):
        imp.import_medmnist(p, "m", 2)
    p = _medmnist_npz(tmp_path / "m3.npz", val_labels=np.zeros((2, 14), np.uint8))
    with pytest.raises(DataError, match="multi-label"):
        imp.import_medmnist(p, "m", 2)


def test_labels_out_of_range_name_key_and_rows(tmp_path: Path) -> None:
    p = _medmnist_npz(tmp_path / "m.npz", test_labels=np.array([[0], [7], [1]], np.uint8))
    with pytest.raises(DataError, match=r"test_labels: 1 label\(s\) out of range \[0, 1\] \(row 1: 7\)"):
        imp.import_medmnist(p, "m", 2)


def test_not_an_npz(tmp_path: Path) -> None:
    p = tmp_path / "x.npz"
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read as .npz"):
        imp.import_kmnist(p, p)


# --------------------------------------------------------------------------- image folders
def _png(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def test_image_folder_quarantines_bad_files_and_reports_empty_classes(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _png(root / "cat/a.png")
    _png(root / "cat/b.jpg", size=(64, 64), value=2)
    _png(root / "dog/c.png", mode="L", value=3)
    Image.fromarray(np.full((20, 20), 4000, np.uint16)).save(root / "dog/d16.png")  # 16-bit grey
    (root / "dog/notes.txt").write_text("not an image")
    good = (root / "cat/a.png").read_bytes()
    (root / "cat/trunc.png").write_bytes(good[: len(good) // 2])
    (root / "cat/corrupt.png").write_bytes(good[:40] + b"\x00" * 200)
    (root / "bird").mkdir()
    (root / "fish").mkdir()
    (root / "fish/readme.md").write_text("x")
    (root / "top.txt").write_bytes(good)  # a loose *image* beside class folders is an error (test_unsupervised_folders)
    data = imp.materialise(imp.import_image_folder(root, "mine"))
    assert sorted(data.meta["class"].unique()) == ["mine/cat", "mine/dog"]
    assert len(data.meta) == 4
    reasons = {Path(q.source_path).name: q.reason for q in data.quarantine}
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["readme.md"].startswith("not an image")
    assert reasons["trunc.png"].startswith(("truncated image", "corrupt image"))
    assert reasons["corrupt.png"].startswith("corrupt image: starts like a PNG")
    assert "outside any class folder" in reasons["top.txt"]
    assert data.empty_classes == ["mine/bird", "mine/fish"]
    m = data.meta.set_index(data.meta["source_path"].map(lambda s: Path(s).name))
    assert m.loc["b.jpg", ["orig_height", "orig_width", "orig_channels"]].tolist() == [64, 64, 3]
    assert m.loc["d16.png", "orig_channels"] == 1
    # 16-bit grey 4000 -> 4000 // 257 = 15 in 8 bits
    d16 = [b for b in data.batches if b.data.shape[1:3] == (20, 20)][0]
    assert int(d16.data.max()) == 15


def test_truncated_jpeg_is_quarantined_as_truncated(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    p = _png(root / "a/x.jpg", size=(64, 64))
    _png(root / "a/ok.png")
    p.write_bytes(p.read_bytes()[:300])
    data = imp.materialise(imp.import_image_folder(root, "t"))
    assert [Path(q.source_path).name for q in data.quarantine] == ["x.jpg"]
    assert "truncated" in data.quarantine[0].reason


def test_image_folder_domain_layout_and_mixed_layout_error(tmp_path: Path) -> None:
    root = tmp_path / "dom"
    _png(root / "photo/cat/a.png")
    _png(root / "sketch/cat/b.png", value=1)
    data = imp.import_image_folder(root, "d")
    assert sorted(data.meta["class"]) == ["d/photo/cat", "d/sketch/cat"]
    assert sorted(data.meta["domain"]) == ["photo", "sketch"]
    _png(root / "dog/c.png", value=2)
    with pytest.raises(DataError, match="mixes the class/image layout"):
        imp.import_image_folder(root, "d")


def test_image_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t/a").mkdir(parents=True)
    (tmp_path / "t/a/x.txt").write_text("x")
    with pytest.raises(DataError, match=r"no usable image found \(1 file\(s\) quarantined\)"):
        imp.materialise(imp.import_image_folder(tmp_path / "t", "t"))


def test_convert_batch_luma_and_area() -> None:
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[0, ..., 0] = 200  # pure red
    rgb[1] = (10, 20, 30)
    grey = convert_batch(imp.ImageBatch(rgb), 16, 1)  # upsampling a constant image keeps it constant
    assert grey.shape == (2, 1, 16, 16)
    assert (grey[0] == round(0.299 * 200)).all() and (grey[1] == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)).all()
    b = np.ones((1, 8, 8, 1), bool)
    b[0, :4, :4, 0] = False  # ink in the top-left quarter
    small = convert_batch(imp.ImageBatch(b, background_true=True), 2, 3)
    assert small.shape == (1, 3, 2, 2) and small[0, :, 0, 0].tolist() == [255] * 3 and small[0, 0, 1, 1] == 0
    same = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28, 1)
    assert (convert_batch(imp.ImageBatch(same), 28, 1)[0, 0] == same[0, ..., 0]).all()  # native size untouched
