"""Tiny end-to-end projects: the real code, DVC, MLflow and Prefect, shrunk params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metatransfer.quick import quick_params

ROOT = Path(__file__).resolve().parents[2]


def make_project(dest: Path, mirror: Path) -> Path:
    """A fresh project folder: the code, dvc.yaml, shrunk params, git + dvc initialised."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "metatransfer", dest / "metatransfer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    params = quick_params(yaml.safe_load((ROOT / "params.yaml").read_text()), mirror)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(dest)
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    run(sys.executable, "-m", "dvc", "config", "core.check_update", "false")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "test project")
    return dest


def project_env(dest: Path) -> dict[str, str]:
    """Environment of a test project's processes: its own MLflow store and Prefect home."""
    env = dict(os.environ)
    env.update(
        DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(dest / ".prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=env.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("METATRANSFER_PARENT_RUN_ID", None)
    return env


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
