"""Dataset registry and fetch: checksums, atomic writes, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metatransfer.data.checksums import verify_file
from metatransfer.data.fetch import MIRROR_ENV, fetch, fetch_file, resolve_mirror
from metatransfer.data.sources import DATASETS, get_source
from metatransfer.errors import ChecksumError, DataError



def test_registry_entries_are_complete() -> None:
    for name, src in DATASETS.items():
        assert src.name == name
        for f in src.files:
            assert f.checksums, f"{name}/{f.name} has no checksum"
            for c in f.checksums:
                assert len(c.value) == {"md5": 32, "sha256": 64}[c.algo] and c.note
            assert f.url.startswith("http") or f.name == "character_index.csv"
    assert DATASETS["retinamnist"].files[0].url == "https://zenodo.org/records/10519652/files/retinamnist.npz?download=1"
    assert any(c.value == "bd4c0672f1bba3e3a89f0e4e876791e4" for c in DATASETS["retinamnist"].files[0].checksums)
    assert "b0481240b7eb42393285a93ce7d2f266ff10c62b" in DATASETS["omniglot"].files[0].url


def test_any_medmnist_2d_by_name_and_unknown_name_error() -> None:
    src = get_source("dermamnist")
    assert src.kind == "medmnist" and src.n_classes == 7
    assert src.files[0].checksums[0].value == "0744692d530f8e62ec473284d019b0c7"
    with pytest.raises(DataError, match=r"unknown dataset 'nopemnist'.*registered"):
        get_source("nopemnist")


def test_breastmnist_accepts_official_md5_and_mirror_copy() -> None:
    notes = {c.algo: c.note for c in DATASETS["breastmnist"].files[0].checksums}
    assert set(notes) == {"md5", "sha256"}
    assert "(N,) labels" in notes["sha256"]


def test_fetch_from_mirror_verifies_and_skips_present(tmp_path: Path, mirror: Path) -> None:
    paths = fetch("breastmnist", tmp_path, str(mirror))
    assert paths == [tmp_path / "breastmnist" / "breastmnist.npz"]
    # the mirror copy matches its own provenance entry, not the official MD5
    assert "(N,) labels" in verify_file(paths[0], DATASETS["breastmnist"].files[0]).note
    before = paths[0].stat().st_mtime_ns
    os.utime(paths[0], ns=(before - 10**9, before - 10**9))
    fetch("breastmnist", tmp_path, str(mirror))
    assert paths[0].stat().st_mtime_ns == before - 10**9  # skipped, not rewritten


def test_present_file_with_wrong_checksum_is_replaced(tmp_path: Path, mirror: Path) -> None:
    dest = tmp_path / "kmnist" / "kmnist-test-labels.npz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stale")
    fetch("kmnist", tmp_path, mirror)
    assert dest.read_bytes() == (mirror / "kmnist" / "kmnist-test-labels.npz").read_bytes()


def _fake_mirror(tmp_path: Path, content: bytes) -> Path:
    mirror = tmp_path / "mirror"
    (mirror / "medmnist").mkdir(parents=True)
    (mirror / "medmnist" / "retinamnist.npz").write_bytes(content)
    return mirror


def test_checksum_mismatch_names_file_expected_found_and_leaves_nothing(tmp_path: Path) -> None:
    mirror = _fake_mirror(tmp_path, b"not the official file")
    raw = tmp_path / "raw"
    with pytest.raises(ChecksumError) as err:
        fetch("retinamnist", raw, str(mirror))
    msg = str(err.value)
    assert "retinamnist.npz" in msg and "bd4c0672f1bba3e3a89f0e4e876791e4" in msg
    import hashlib

    assert hashlib.md5(b"not the official file").hexdigest() in msg
    assert list((raw / "retinamnist").iterdir()) == []  # no partial or temp file


def test_missing_mirror_file_names_the_path_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fetch("omniglot_zip", tmp_path / "raw", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "omniglot/official/images_background.zip") in msg
    assert "METATRANSFER_MIRROR" in msg and "https://raw.githubusercontent.com/brendenlake/omniglot" in msg


def test_mirror_only_file_without_mirror_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="character_index.csv: has no public download URL"):
        fetch_file(DATASETS["omniglot"].files[2], tmp_path / "x.csv", None)


def test_env_overrides_mirror_param(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert resolve_mirror("rel/mirror", tmp_path) == (tmp_path / "rel/mirror").resolve()
    assert resolve_mirror("", tmp_path) is None
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "env"))
    assert resolve_mirror("rel/mirror", tmp_path) == (tmp_path / "env").resolve()
    monkeypatch.setenv(MIRROR_ENV, "")
    assert resolve_mirror("rel/mirror", tmp_path) is None  # set but empty: download


def test_a_missing_mirror_fails_the_tests_that_need_it(tmp_path: Path, project_root: Path) -> None:
    """One rule for data (tests/conftest.py's `mirror`): without the mirror, a test that needs it
    fails with where the mirror is expected and how to point at it; it never skips (CI goes red)."""
    missing = tmp_path / "nowhere"
    env = dict(os.environ, METATRANSFER_MIRROR=str(missing))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/test_data_sources.py::test_present_file_with_wrong_checksum_is_replaced"],
                          cwd=project_root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 error" in out and "skipped" not in out, out[-3000:]
    assert (f"dataset mirror not found at {missing} (expected {missing}/omniglot/images_background.npz there). "
            f"Put the mirror at {project_root.parent / 'shared' / 'datasets'} or set "
            f"METATRANSFER_MIRROR=/path/to/datasets, then re-run.") in out, out[-3000:]
