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


def test_missing_project_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "status"]) == 1
    assert f"{tmp_path / 'params.yaml'} not found" in capsys.readouterr().err
