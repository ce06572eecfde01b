"""`dvc repro prepare` on a fresh project: both stages run once, then are skipped;
a failed prepare leaves the last good output untouched."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import make_project, project_env

pytestmark = pytest.mark.slow


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repro_prepare_twice_second_skips(tmp_path: Path, mirror: Path) -> None:
    project = make_project(tmp_path / "p", mirror)
    env = project_env(project)
    first = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=project, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Running stage 'fetch'" in first.stdout and "Running stage 'prepare'" in first.stdout
    second = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "Stage 'fetch' didn't change, skipping" in second.stdout
    assert "Stage 'prepare' didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout

    # A prepare that fails (bad param value) leaves the good store byte-identical.
    before = _digest_tree(project / "data" / "prepared")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["image_folders"] = {"mine": {"path": "no/such/folder", "role": "target", "split_fractions": [0.6, 0.2, 0.2]}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = subprocess.run([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=project, env=env, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "no/such/folder" in failed.stdout + failed.stderr
    assert _digest_tree(project / "data" / "prepared") == before


def _images(folder: Path, classes: dict[str, int], seed: int = 0) -> None:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    for cls, n in classes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")


def test_image_folder_edit_reruns_prepare(tmp_path: Path, mirror: Path) -> None:
    """A folder named in prepare.image_folders is a DVC input: a new class folder shows in
    `dvc status` and re-runs prepare; a touched but unchanged file does not."""
    project = make_project(tmp_path / "p", mirror)
    env = project_env(project)

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)

    _images(project / "mine", {"a": 6, "b": 6})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fetch"]["datasets"] = ["breastmnist"]  # the smallest registered dataset: prepare stays quick
    params["prepare"]["image_folders"] = {"mine": {"path": "mine", "role": "target", "split_fractions": [0.5, 0.25, 0.25]}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = dvc("repro", "prepare")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'image_folders@mine'" in first.stdout and "Running stage 'prepare'" in first.stdout
    assert dvc("status", "prepare", "--with-deps", "--json").stdout.strip() in ("{}", "")
    report = project / "data" / "prepared" / "report.json"
    assert yaml.safe_load(report.read_text())["datasets"]["mine"]["n_classes"] == 2

    _images(project / "mine", {"c": 6}, seed=1)  # a new class folder
    status = dvc("status", "prepare", "--with-deps").stdout
    assert "image_folders@mine" in status and "modified:" in status and "mine" in status
    second = dvc("repro", "prepare")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage 'image_folders@mine'" in second.stdout and "Running stage 'prepare'" in second.stdout
    assert yaml.safe_load(report.read_text())["datasets"]["mine"]["n_classes"] == 3
    manifest = yaml.safe_load((project / "data/checks/image_folders/mine.json").read_text())
    assert [row[0] for row in manifest["files"]][-6:] == [f"c/{i}.png" for i in range(6)]

    # Same bytes, new mtime: the manifest is rewritten identical, prepare is skipped.
    f = project / "mine" / "a" / "0.png"
    f.write_bytes(f.read_bytes())
    third = dvc("repro", "prepare")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "Stage 'prepare' didn't change, skipping" in third.stdout

    # An entry removed from params: its manifest goes, prepare re-runs without it.
    del params["prepare"]["image_folders"]["mine"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc("repro", "prepare")
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert not (project / "data/checks/image_folders/mine.json").exists()
    assert "mine" not in yaml.safe_load(report.read_text())["datasets"]
    assert dvc("status", "prepare", "--with-deps", "--json").stdout.strip() in ("{}", "")
