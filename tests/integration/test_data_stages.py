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
