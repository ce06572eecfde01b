"""The MLflow store's set-up lock (`tracking.store._store_lock`) excludes other
processes while it is held and lets them in once it is released; it is a no-op
for stores that are not sqlite files.

The processes meet at barriers on disk (files), so the order of events is fixed
however slow the machine: no sleep decides what the test sees."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from metatransfer.tracking.store import _store_lock, lock_path, sqlite_path

# The other process: wait until the test holds the lock, try to take it without
# waiting (must be refused), then, once the test has released it, wait for it
# as a second store set-up would and record that it got in. It imports filelock
# only (not mlflow through metatransfer.tracking): seconds faster, same lock file.
OTHER = """
import sys, time
from pathlib import Path
from filelock import FileLock, Timeout
lock, folder = sys.argv[1], Path(sys.argv[2])

def wait_for(name):
    while not (folder / name).exists():
        time.sleep(0.01)

def say(name, text):  # written whole, then renamed: the test never reads a half-written file
    (folder / (name + ".tmp")).write_text(text)
    (folder / (name + ".tmp")).replace(folder / name)

wait_for("held")
try:
    FileLock(lock).acquire(timeout=0)
    say("refused", "no: acquired while the other process held it")
except Timeout:
    say("refused", "yes")
wait_for("released")
with FileLock(lock, timeout=60):
    say("entered", "yes")
"""


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    """Block until `path` exists; fail if the other process dies or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the other process ended (exit {proc.returncode}) before writing {path.name}: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"{path.name} did not appear in {seconds} s"
        time.sleep(0.01)


def test_store_lock_excludes_another_process_until_released(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}?timeout=5"
    lock = lock_path(tmp_path / "store" / "mlflow.db")
    proc = subprocess.Popen([sys.executable, "-c", OTHER, str(lock), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with _store_lock(uri):
            assert lock.is_file()  # the folder and the sibling lock file were made
            (tmp_path / "held").touch()
            wait_for(tmp_path / "refused", proc)
            assert (tmp_path / "refused").read_text() == "yes"
            assert not (tmp_path / "entered").exists()
        (tmp_path / "released").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "entered").read_text() == "yes"


def test_store_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="set-up failed"), _store_lock(uri):
        raise RuntimeError("set-up failed")
    # Free again: a waiter would get in at once (timeout=0 refuses a held lock).
    lock = FileLock(lock_path(tmp_path / "mlflow.db"))
    lock.acquire(timeout=0)
    lock.release()


def test_store_lock_is_a_no_op_for_other_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("http://127.0.0.1:5000", "sqlite:///:memory:", f"file://{tmp_path}/mlruns"):
        assert sqlite_path(uri) is None
        with _store_lock(uri):
            pass
    assert list(tmp_path.iterdir()) == []  # no lock file, no folder


def test_lock_file_sits_beside_the_database() -> None:
    assert lock_path(Path("/data/x/mlflow.db")) == Path("/data/x/mlflow.db.lock")
    assert sqlite_path("sqlite:////data/x/mlflow.db?timeout=120") == Path("/data/x/mlflow.db")
