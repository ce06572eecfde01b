"""The DVC remote the repository ships (.dvc/config: remote `local`, the
default, a folder beside the project): `dvc push` after a run, then `dvc pull`
in a fresh `git clone` restores the prepared data, the episodes and the
models byte for byte, so the next `dvc repro` runs nothing.

The project is a copy of the session's `dvc_project` (already reproduced),
given the repository's own .dvc/config and .gitignore, as a clone of the
repository would have them; its relative remote url then resolves to a
folder beside the copy, inside this test's tmp folder, never the
developer's remote.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.quick import project_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Outputs DVC caches and the remote carries (dvc.yaml `outs`); metrics, plots and
# reports/evaluate.md are `cache: false` outputs, committed to git instead.
CACHED = ("data/checks/params.ok", "data/raw", "data/prepared", "data/episodes",
          "models/pretrain", "models/meta", "models/target")


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m dvc ARGS` in `cwd`; fails the test with DVC's output on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=project_env(cwd),
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def git(args: list[str], cwd: Path) -> str:
    """`git ARGS` in `cwd` (fails the test on a non-zero exit); returns stdout."""
    proc = subprocess.run(["git", *args], cwd=cwd, env=project_env(cwd), capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def files_under(root: Path, rel: str) -> dict[str, bytes]:
    """Every file of the output `rel` (a file or a folder) under `root`: relative path -> bytes."""
    path = root / rel
    if path.is_file():
        return {rel: path.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_shipped_remote_push_then_pull_in_a_fresh_clone_leaves_nothing_to_reproduce(
        dvc_project: Path, tmp_path: Path) -> None:
    project, clone, remote = tmp_path / "project", tmp_path / "clone", tmp_path / "metatransfer-dvc-remote"
    shutil.copytree(dvc_project, project, symlinks=True, ignore=shutil.ignore_patterns(
        "mlflow.db*", "mlartifacts", "checkpoints", ".prefect", "repro1.log", "tmp"))
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    git(["add", "-A"], project)
    git(["commit", "-qm", "run: dvc.lock, metrics, the shipped DVC config"], project)
    assert git(["status", "--porcelain"], project) == ""  # every cached output is git-ignored, the rest committed

    # The shipped config names the default remote; no -r anywhere below.
    assert dvc(["remote", "default"], project).stdout.strip() == "local"
    pushed = dvc(["push"], project)
    assert remote.is_dir() and any((remote / "files" / "md5").iterdir()), pushed.stdout
    assert "Cache and remote 'local' are in sync." in dvc(["status", "--cloud"], project).stdout

    git(["clone", "-q", str(project), str(clone)], tmp_path)
    missing = [rel for rel in CACHED if (clone / rel).exists()]
    assert missing == [], f"git clone already holds {missing}: they should be DVC outputs, not in git"
    dvc(["pull"], clone)

    # Byte-identical outputs: the prepared store, the episodes, every model.
    for rel in CACHED:
        theirs, ours = files_under(project, rel), files_under(clone, rel)
        assert theirs, f"{rel} is empty in the reproduced project"
        assert sorted(ours) == sorted(theirs), f"{rel}: the clone's files differ from the project's"
        changed = [p for p in theirs if ours[p] != theirs[p]]
        assert changed == [], f"{rel}: restored files differ from the originals: {changed[:5]}"
    assert dvc(["status"], clone).stdout.strip() == "Data and pipelines are up to date."
    repro = dvc(["repro"], clone).stdout
    assert repro.strip().splitlines()[-1] == "Data and pipelines are up to date.", repro
    assert "Running stage" not in repro, repro
