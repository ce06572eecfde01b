"""Shared fixtures: the real dataset mirror, the project root, isolated tool homes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


DEFAULT_MIRROR = PROJECT_ROOT.parent / "shared" / "datasets"


def mirror_dir() -> Path:
    """The local mirror of the official dataset files: $METATRANSFER_MIRROR if set and
    non-empty, else ../shared/datasets next to the project folder."""
    return Path(os.environ.get("METATRANSFER_MIRROR") or DEFAULT_MIRROR)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The dataset mirror, for every test that reads real data.

    The one rule: a missing mirror fails each such test (never skips it), so a
    run without data cannot pass as green. Tests needing data take this
    fixture instead of building the path themselves.
    """
    path = mirror_dir()
    probe = path / "omniglot" / "images_background.npz"
    if not probe.is_file():
        pytest.fail(f"dataset mirror not found at {path} (expected {probe} there). Put the mirror at "
                    f"{DEFAULT_MIRROR} or set METATRANSFER_MIRROR=/path/to/datasets, then re-run.", pytrace=False)
    return path


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT
