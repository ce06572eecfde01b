"""Shared fixtures: the real dataset mirror, the project root, isolated tool homes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def mirror_dir() -> Path:
    """The local mirror of the official dataset files (../shared/datasets)."""
    return Path(os.environ.get("METATRANSFER_MIRROR", PROJECT_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = mirror_dir()
    if not (path / "omniglot" / "images_background.npz").is_file():
        pytest.fail(f"dataset mirror not found at {path}; set METATRANSFER_MIRROR")
    return path


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT
