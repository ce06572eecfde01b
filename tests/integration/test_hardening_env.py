"""Failures of the environment reach the user as one line, not a traceback.

A stage entry (`stages.common.run_stage`) or the `metatransfer` command hit a
full disk (a real tmpfs of a few MB, mounted in a private mount namespace, so
writes fail with ENOSPC) or an MLflow tracking server with basic auth that
refuses missing credentials (401) or a user without permission (403).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_auth_server import auth_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def env(**extra: str) -> dict[str, str]:
    base = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1",
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "METATRANSFER_PARENT_RUN_ID"):
        base.pop(key, None)
    return {**base, **extra}


def stage_program(body: str, params: Path) -> str:
    """A stage entry whose body is `body` (source of `def body(params, root)`), run as `meta_train`."""
    return textwrap.dedent(body) + textwrap.dedent(f"""
        import sys
        from metatransfer.stages.common import run_stage
        sys.exit(run_stage("meta_train", ["--params", {str(params)!r}], body))
    """)


def one_error_line(proc: subprocess.CompletedProcess, prefix: str) -> str:
    """The single error line of a failed run (exit 1, no traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if prefix in line]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- full disk
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a private tmpfs (unshare -rm)")


def on_small_disk(program: str, disk: Path, size: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `program` with a tmpfs of `size` mounted on `disk` (private to the process)."""
    disk.mkdir(parents=True, exist_ok=True)
    script = cwd / "program.py"
    script.write_text(program)
    cmd = f"mount -t tmpfs -o size={size} tmpfs {disk} && exec {sys.executable} {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", cmd], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=300)


@needs_tmpfs
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    folder = disk / "checkpoints" / "maml"
    program = stage_program(f"""
        import os
        from pathlib import Path
        import torch
        from metatransfer.training.checkpoint import CheckpointConfig, save_checkpoint

        def body(params, root):
            config = CheckpointConfig(folder=Path({str(folder)!r}), every=1, fingerprint="f")
            save_checkpoint(config, 1, {{"w": torch.zeros(10)}})  # fits
            try:
                save_checkpoint(config, 2, {{"w": torch.zeros(2_000_000)}})  # 8 MB on a 2 MB disk
            finally:
                print("LEFT", sorted(os.listdir({str(folder)!r})), flush=True)
    """, tmp_path / "params.yaml")
    proc = on_small_disk(program, disk, "2m", tmp_path)
    line = one_error_line(proc, "disk full")
    assert "LEFT ['step-000000001']" in proc.stdout  # the previous checkpoint, no partial folder
    assert " meta_train ERROR " in line
    assert f"disk full: no space left on the device while writing {folder}" in line
    assert "free some space" in line and "re-run" in line


@needs_tmpfs
def test_disk_full_while_logging_to_mlflow_is_one_line(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    artifact = tmp_path / "curve.bin"
    artifact.write_bytes(os.urandom(1 << 20))
    program = stage_program(f"""
        from pathlib import Path
        from metatransfer import tracking

        def body(params, root):
            disk = Path({str(disk)!r})
            tracking.configure(disk)  # the store on the small disk: mlflow.db and mlartifacts/
            with tracking.stage_run("meta_train", disk, {{"seed": 0}}):
                tracking.log_metrics({{"meta_train/loss": 1.0}}, step=0)
                try:  # fill the disk
                    with open(disk / "filler", "wb") as f:
                        while True:
                            f.write(bytes(1 << 16))
                            f.flush()
                except OSError:
                    pass
                tracking.log_artifact({str(artifact)!r})
    """, tmp_path / "params.yaml")
    proc = on_small_disk(program, disk, "24m", tmp_path)
    line = one_error_line(proc, "disk full")
    assert "meta_train ERROR" in line
    assert f"disk full: no space left on the device while logging to MLflow (sqlite:///{disk}/mlflow.db" in line


# --------------------------------------------------------------------------- refused credentials
def _admin_request(url: str, password: str, path: str, payload: dict) -> None:
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def test_missing_or_wrong_credentials_are_one_line_naming_the_variables(
        auth_server, tmp_path: Path) -> None:  # noqa: F811
    url, password = auth_server
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    status = [sys.executable, "-m", "metatransfer.cli", "--root", str(tmp_path), "status"]
    anon = subprocess.run(status, cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True,
                          timeout=120)
    line = one_error_line(anon, "metatransfer status:")
    assert line == (f"metatransfer status: {url} refused the request: 401 Unauthorized (no credentials given); set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account "
                    "on that server, then re-run")
    wrong = subprocess.run(status, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin",
                                   MLFLOW_TRACKING_PASSWORD="wrong-" + password))
    line = one_error_line(wrong, "metatransfer status:")
    assert "refused the credentials of user 'admin': 401 Unauthorized; check MLFLOW_TRACKING_USERNAME and " \
           "MLFLOW_TRACKING_PASSWORD" in line
    assert password not in wrong.stderr


def test_stage_logging_without_permission_is_one_line(auth_server, tmp_path: Path) -> None:  # noqa: F811
    """Anonymous: 401 at the stage entry; a user with READ on the admin's experiment: 403."""
    url, password = auth_server
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    program = stage_program("""
        from metatransfer import tracking

        def body(params, root):
            with tracking.stage_run("meta_train", root, {"seed": 0}):
                tracking.log_metrics({"meta_train/loss": 1.0}, step=0)
    """, tmp_path / "params.yaml")
    (tmp_path / "stage.py").write_text(program)
    run = [sys.executable, str(tmp_path / "stage.py")]
    anon = subprocess.run(run, cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=url), capture_output=True, text=True,
                          timeout=120)
    assert "refused the request: 401 Unauthorized (no credentials given); set MLFLOW_TRACKING_USERNAME and " \
           "MLFLOW_TRACKING_PASSWORD" in one_error_line(anon, "meta_train ERROR")
    admin = env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    ok = subprocess.run(run, cwd=tmp_path, env=admin, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]  # the admin owns the experiment; others may read it
    _admin_request(url, password, "/api/2.0/mlflow/users/create", {"username": "bob", "password": "Bob-pw-123456"})
    bob = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="bob",
                                 MLFLOW_TRACKING_PASSWORD="Bob-pw-123456"))
    line = one_error_line(bob, "meta_train ERROR")
    assert f"{url} refused the request: 403 Forbidden (user 'bob' may not do this)" in line
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD of an account that has it" in line
