"""Prefect tasks of the `data` flow that are not DVC stages."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from metatransfer.config import load_params
from metatransfer.data.checks import verify_raw


@task(name="validate")
def validate(root: str) -> dict[str, list[str]]:
    """Verify every raw file against its published checksum before preparing."""
    params = load_params(Path(root) / "params.yaml")
    return verify_raw(Path(root) / params.data.raw_dir, params.fetch.datasets)
