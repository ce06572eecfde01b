"""Tiny end-to-end projects: the real code, DVC, MLflow and Prefect, shrunk params."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metatransfer import quick
from metatransfer.quick import project_env, quick_params  # noqa: F401  (project_env: used by tests)

ROOT = Path(__file__).resolve().parents[2]


def make_project(dest: Path, mirror: Path) -> Path:
    """A fresh project folder: the code, dvc.yaml, shrunk params, git + dvc initialised."""
    params = quick_params(yaml.safe_load((ROOT / "params.yaml").read_text()), mirror)
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
