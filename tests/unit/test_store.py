"""The prepared store readers: load_manifest, load_split, available."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data.prepare import prepare
from metatransfer.data.store import SplitData, available, load_manifest, load_split
from metatransfer.errors import DataError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("store")
    for cls, value in (("zebra", 200), ("ant", 10), ("mole", 100)):
        for i in range(4):
            (tmp / "tree" / cls).mkdir(parents=True, exist_ok=True)
            arr = np.full((30, 30), value + i, np.uint8)
            Image.fromarray(arr).save(tmp / "tree" / cls / f"{i}.png")
    p = PrepareParams(image_size=28, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=0,
                      image_folders={"toy": ImageFolderParams(str(tmp / "tree"), "target", (0.5, 0.25, 0.25))})
    prepare(p, ("toy",), tmp / "raw", tmp / "prepared", seed=0)
    return tmp / "prepared"


def test_available_lists_datasets_and_splits(store: Path, tmp_path: Path) -> None:
    assert available(store) == {"toy": ["train", "val", "test"]}
    assert available(tmp_path / "nothing") == {}


def test_load_split_labels_follow_sorted_class_names(store: Path) -> None:
    s = load_split(store, "toy", "train")
    assert isinstance(s, SplitData) and s.split == "train" and s.dataset == "toy"
    assert s.class_names == ("toy/ant", "toy/mole", "toy/zebra")
    assert s.images.dtype == np.uint8 and s.images.shape == (6, 1, 28, 28)
    assert s.labels.dtype == np.int64 and sorted(s.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # each image's constant grey level identifies its class (ant ~10, mole ~100, zebra ~200)
    base = np.array([10, 100, 200])[s.labels]
    assert (s.images.reshape(6, -1).mean(1) - base >= 0).all() and (s.images.reshape(6, -1).mean(1) - base < 4).all()
    # a read-only memory-mapped slice of images.npy (no copy): splits are contiguous blocks of rows
    assert isinstance(s.images, np.memmap) and not s.images.flags.writeable
    whole = np.load(store / "toy" / "images.npy", mmap_mode="r")
    ids = load_manifest(store, "toy").query("split == 'train'")["id"].to_numpy()
    assert ids.tolist() == list(range(ids[0], ids[0] + 6))
    assert s.images.filename == whole.filename  # the same file, mapped at this split's offset (no copy)
    start = np.frombuffer(s.images._mmap, dtype=np.uint8).ctypes.data
    assert s.images.__array_interface__["data"][0] - start == 128 + int(ids[0]) * 28 * 28
    assert (s.images[[0, 5]] == whole[ids[[0, 5]]]).all()
    with pytest.raises(ValueError, match="read-only"):
        s.images[0, 0, 0, 0] = 1


def test_manifest_rows_match_images(store: Path) -> None:
    m = load_manifest(store, "toy")
    assert m["id"].tolist() == list(range(12))
    assert set(m.columns) >= {"id", "dataset", "domain", "class", "split", "source_path", "pixel_hash",
                              "orig_height", "orig_width", "orig_channels"}
    assert (m["orig_height"] == 30).all()


def test_missing_dataset_and_split_errors_list_what_exists(store: Path) -> None:
    with pytest.raises(DataError, match=r"dataset 'omniglot' is not prepared; prepared datasets: \['toy'\]"):
        load_split(store, "omniglot", "meta_train")
    with pytest.raises(DataError, match=r"split 'meta_train' not found .* available splits: \['train', 'val', 'test'\]"):
        load_split(store, "toy", "meta_train")
