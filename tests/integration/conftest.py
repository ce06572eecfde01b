"""Tiny end-to-end projects: the real code, DVC, MLflow and Prefect, shrunk params."""

from __future__ import annotations

import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import yaml

from tests import quick
from tests.quick import project_env, quick_params  # noqa: F401  (project_env: used by tests)
from tests.slices import make_slice_mirror

ROOT = Path(__file__).resolve().parents[2]


_SLICES: dict[Path, Path] = {}


def slice_mirror(mirror: Path) -> Path:
    """A mirror of real slices of the folder datasets (tests/slices.py), built once per session.

    Every class of brain_tumor_mri, 10 training and 8 test scans each; 5
    mini-ImageNet classes of 20 images per csv split; the other datasets
    linked whole.
    """
    if mirror not in _SLICES:
        dest = Path(tempfile.mkdtemp(prefix="metatransfer-slices-")) / "mirror"
        _SLICES[mirror] = make_slice_mirror(
            dest, mirror, mini_classes=5, mini_per_class=20,
            brain_classes=("glioma", "meningioma", "notumor", "pituitary"), brain_train=10, brain_test=8, ham_per=12)
    return _SLICES[mirror]


def make_project(dest: Path, mirror: Path, params_file: Path = ROOT / "params.yaml") -> Path:
    """A fresh project folder: the code, dvc.yaml, shrunk params (of `params_file`: the default
    natural -> medical scenario on real slices, or scenarios/characters.yaml), git + dvc initialised."""
    params = quick_params(yaml.safe_load(params_file.read_text()), slice_mirror(mirror))
    return quick.make_project(dest, params, ROOT)


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A project after `dvc repro` (run once per session)."""
    dest = make_project(tmp_path_factory.mktemp("dvc_project"), mirror)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=dest, env=project_env(dest),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (dest / "repro1.log").write_text(proc.stdout + proc.stderr)
    return dest


@pytest.fixture(scope="session")
def prefect_project(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A project after the Prefect `pipeline` flow (run once per session)."""
    dest = make_project(tmp_path_factory.mktemp("prefect_project"), mirror)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=dest, env=project_env(dest),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (dest / "flow.log").write_text(proc.stdout + proc.stderr)
    return dest
