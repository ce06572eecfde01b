"""The `prepare.image_folders` documentation stays true: every key documented, the example loads and prepares."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from metatransfer.config import IMAGE_FOLDER_LAYOUTS, ImageFolderParams, params_from_mapping
from metatransfer.data.prepare import prepare
from metatransfer.data.store import load_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs/examples/image_folders.yaml"


def _section() -> str:
    guide = (ROOT / "docs/guide.md").read_text()
    start = guide.index("### Your own images: `prepare.image_folders`")
    end = guide.index("\n## ", start)
    return guide[start:end]


def test_every_key_and_layout_is_documented() -> None:
    section = _section()
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)` \| (?:yes|no)", section, re.M)}  # the key table
    assert rows == set(ImageFolderParams.model_fields)
    for layout in IMAGE_FOLDER_LAYOUTS:
        assert f"`{layout}`" in section
    readme = (ROOT / "README.md").read_text()
    assert "docs/guide.md#your-own-images-prepareimage_folders" in readme
    assert "docs/examples/image_folders.yaml" in readme


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)


def test_documented_example_loads_and_prepares_each_layout(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    folders = yaml.safe_load(EXAMPLE.read_text())["prepare"]["image_folders"]
    raw["prepare"]["image_folders"] = folders
    params = params_from_mapping(raw)
    assert set(params.prepare.image_folders) == {"clinic", "clinic_split", "faces"}
    n = iter(range(10_000))
    for cls in ("a", "b", "c"):
        for i in range(10):
            _img(tmp_path / f"data/clinic/{cls}/{i}.png", next(n))
    for split, k in (("Training", 8), ("Testing", 3)):
        for cls in ("x", "y"):
            for i in range(k):
                _img(tmp_path / f"data/clinic_split/{split}/{cls}/{i}.png", next(n))
    for domain in ("photo", "sketch"):
        for cls in range(6):
            for i in range(3):
                _img(tmp_path / f"data/faces/{domain}/p{cls}/{i}.png", next(n))
    report = prepare(params.prepare, tuple(folders), tmp_path / "raw", tmp_path / "prepared", 0, base_dir=tmp_path)
    sizes = {name: load_manifest(tmp_path / "prepared", name).groupby("split").size().to_dict() for name in folders}
    # clinic: each class 10 images cut 0.6 / 0.2 / 0.2 (train, val, test)
    assert sizes["clinic"] == {"train": 18, "val": 6, "test": 6}
    # clinic_split: Testing kept; round(0.1 x 8) = 1 image per class carved from Training into val
    assert sizes["clinic_split"] == {"train": 14, "val": 2, "test": 6}
    # faces: 12 classes (domain/class) cut 0.7 / 0.15 / 0.15 into meta splits (8.4, 1.8, 1.8 -> 8, 2, 2)
    assert sizes["faces"] == {"meta_train": 24, "meta_val": 6, "meta_test": 6}
    assert report.datasets["faces"]["n_classes"] == 12 and report.quarantined == 0
