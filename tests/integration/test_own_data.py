"""A clinic's own data, from folders and a file on disk to a served model that answers an image file
with class names, through `dvc repro` only (issue 18, "Done when").

Three targets the project has never seen, made here:
- `clinic`: a flat `class/` folder (PNG, RGB, odd sizes), split by `split_fractions`;
- `scans`: a `split/class/` folder (`Training/`, `Testing/`), whose split is kept;
- `archive`: a MedMNIST-format npz that is not any official file, with the user's own sha256.
mini-ImageNet (a real slice) is the source. After `dvc repro`, the user promotes the clinic's model
deliberately (`promote --force --reason`) and serves it; a PNG from the clinic folder is answered
with the clinic's class names.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests import quick
from tests.integration.conftest import ROOT, project_env, slice_mirror
from tests.integration.test_serving import free_port, server_env, stop, wait_ready
from tests.integration.test_serving_images import post

pytestmark = pytest.mark.slow

CLINIC_CLASSES = ("benign", "malignant")
SCANS_CLASSES = ("normal", "tumour")


def _pattern(rng: np.random.Generator, label: int, shape: tuple[int, int], rgb: bool) -> np.ndarray:
    """A learnable image: class 0 bright on the left, class 1 bright on the right, plus noise."""
    h, w = shape
    img = rng.integers(0, 80, (h, w), dtype=np.int64)
    half = slice(0, w // 2) if label == 0 else slice(w // 2, w)
    img[:, half] += 150
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img, img // 2, img], axis=-1) if rgb else img


def _make_own_data(base: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    clinic = base / "own" / "clinic"
    for label, cls in enumerate(CLINIC_CLASSES):
        (clinic / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(_pattern(rng, label, (40 + i, 36), rgb=True), "RGB").save(clinic / cls / f"img{i:02d}.png")
    (clinic / "README.txt").write_text("stray notes beside the class folders\n")  # quarantined, not a class
    scans = base / "own" / "scans"
    for split, n in (("Training", 8), ("Testing", 4)):
        for label, cls in enumerate(SCANS_CLASSES):
            (scans / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern(rng, label, (30, 30), rgb=False), "L").save(scans / split / cls / f"{i}.png")
    arrays = {}
    for split, n in (("train", 16), ("val", 6), ("test", 8)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = np.stack([_pattern(rng, int(y), (28, 28), rgb=False) for y in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    npz = base / "own" / "archive.npz"
    np.savez_compressed(npz, **arrays)
    return {"clinic": clinic, "scans": scans, "archive": npz}


@pytest.fixture(scope="module")
def own_project(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, dict[str, Path], str]:
    """A project after `dvc repro` with the three own targets; (project, own data, repro log)."""
    base = tmp_path_factory.mktemp("own_data")
    own = _make_own_data(base)
    params = quick.quick_params(yaml.safe_load((ROOT / "params.yaml").read_text()), slice_mirror(mirror))
    params["fetch"]["datasets"] = ["mini_imagenet"]
    params["prepare"]["image_folders"] = {
        "clinic": {"path": str(own["clinic"]), "role": "target", "split_fractions": [0.5, 0.25, 0.25]},
        "scans": {"path": str(own["scans"]), "role": "target", "split_fractions": [0.6, 0.2, 0.2]},
    }
    params["prepare"]["npz_files"] = {
        "archive": {"path": str(own["archive"]), "role": "target",
                    "sha256": hashlib.sha256(own["archive"].read_bytes()).hexdigest(),
                    "class_names": ["left", "right"]},
    }
    targets = ["clinic", "scans", "archive"]
    params["episodes"]["sets"] = {f"{t}_test": {"dataset": t, "split": "test", "n_way": 2, "shots": [1],
                                                "n_query": 2, "n_episodes": 2} for t in targets}
    params["finetune"]["targets"] = targets
    project = quick.make_project(base / "project", params, ROOT)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=project_env(project),
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return project, own, log


def test_dvc_repro_prepares_each_layout_with_its_own_classes_and_splits(own_project) -> None:
    import pandas as pd

    project, own, log = own_project
    for stage in ("image_folders@clinic", "image_folders@scans", "prepare", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in log
    prepared = project / "data" / "prepared"
    clinic = pd.read_parquet(prepared / "clinic" / "manifest.parquet")
    assert sorted(clinic["class"].unique()) == [f"clinic/{c}" for c in CLINIC_CLASSES]
    # 12 images a class cut 0.5 / 0.25 / 0.25
    assert clinic.groupby("split").size().to_dict() == {"test": 6, "train": 12, "val": 6}
    scans = pd.read_parquet(prepared / "scans" / "manifest.parquet")
    # the folder's own split is kept (Testing -> test); val is carved from Training (val_fraction 0.1)
    assert sorted(scans["class"].unique()) == [f"scans/{c}" for c in SCANS_CLASSES]
    assert scans[scans["split"] == "test"]["source_path"].map(lambda p: "/Testing/" in p).all()
    assert scans.groupby("split").size().to_dict() == {"test": 8, "train": 14, "val": 2}
    archive = pd.read_parquet(prepared / "archive" / "manifest.parquet")
    assert sorted(archive["class"].unique()) == ["archive/left", "archive/right"]
    assert archive.groupby("split").size().to_dict() == {"test": 8, "train": 16, "val": 6}
    quarantine = pd.read_csv(prepared / "quarantine.csv")
    own_rows = quarantine[quarantine["dataset"].isin(["clinic", "scans", "archive"])]
    assert [Path(p).name for p in own_rows["source_path"]] == ["README.txt"]
    # DVC is clean afterwards: the folders' manifests and params are the recorded state
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=project_env(project),
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout


def test_the_npz_checksum_is_recorded_as_its_data_version(own_project) -> None:
    project, own, _ = own_project
    digest = hashlib.sha256(own["archive"].read_bytes()).hexdigest()
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    assert digest in json.dumps(report["datasets"]["archive"])


def test_finetune_records_the_shots_it_used_per_class(own_project) -> None:
    project, _, _ = own_project
    shots = json.loads((project / "models" / "target" / "clinic" / "selection.json").read_text())["shots"]
    # finetune.shots_per_class 5 (quick params); the clinic has 6 train images a class
    assert shots == {"requested": 5, "fewer_than_requested": [],
                     "per_class": {f"clinic/{c}": 5 for c in CLINIC_CLASSES}}


def test_served_model_answers_an_image_file_with_class_names(own_project) -> None:
    project, own, _ = own_project
    env = server_env(project)
    cli = [sys.executable, "-m", "metatransfer.cli", "--root", str(project)]
    promoted = subprocess.run([*cli, "promote", "--target", "clinic", "--force", "--reason", "first clinic model, reviewed"],
                              cwd=project, env=env, capture_output=True, text=True)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    port, log = free_port(), project / "serve.log"
    proc = subprocess.Popen([*cli, "serve", "--target", "clinic", "--port", str(port)], cwd=project, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        status, answer = post(url, (own["clinic"] / "malignant" / "img03.png").read_bytes(), "image/png")
    finally:
        stop(proc)
    assert status == 200, answer
    (row,) = answer["predictions"]
    assert row["class_name"] in CLINIC_CLASSES and row["label"] == f"clinic/{row['class_name']}"
    assert set(row["probabilities"]) == set(CLINIC_CLASSES)
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-6
