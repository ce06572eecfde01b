"""The `metatransfer` command: help on every subcommand, exit codes scripts rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from metatransfer.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: metatransfer {command}")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_unknown_stage_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--stage", "train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_prefect_run_refuses_a_stage_subset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(ROOT), "run", "--prefect", "--stage", "prepare"]) == 2
    assert "--prefect runs every stage" in capsys.readouterr().err


def test_promote_old_n_episodes_flag_names_its_new_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(ROOT), "promote", "--n-episodes", "10"]) == 2
    assert "--n-episodes was renamed to --n-folds" in capsys.readouterr().err
    assert "--n-episodes" not in (main(["promote", "--help"]), capsys.readouterr().out)[1]


def test_missing_project_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "status"]) == 1
    assert f"{tmp_path / 'params.yaml'} not found" in capsys.readouterr().err


def test_serve_checks_its_body_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(ROOT), "serve", "--target", "breastmnist", "--max-body-mb", "0"]) == 1
    assert "--max-body-mb: must be in (0, 4096], found 0.0" in capsys.readouterr().err


def test_unreachable_tracking_server_is_one_line(tmp_path: Path) -> None:
    """A real connection refused (nothing listens on the port): one line naming the URI, no traceback."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
               DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.run([sys.executable, "-m", "metatransfer.cli", "--root", str(tmp_path), "status"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"metatransfer status: cannot reach http://127.0.0.1:{port} ([Errno 111] Connection refused); start the "
        "server or fix MLFLOW_TRACKING_URI, then re-run")
