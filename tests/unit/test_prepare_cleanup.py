"""prepare's temporary folders: a killed run's leftovers are removed (or the
last good store moved back) when the next run starts; a live run's are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data import prepare as prep
from metatransfer.data.workdirs import _HOST


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(path: Path, content: str = "x") -> Path:
    path.mkdir(parents=True)
    (path / "images.npy").write_text(content)
    return path


def test_dead_runs_folders_removed_live_and_foreign_kept(tmp_path: Path) -> None:
    out = _folder(tmp_path / "prepared", "good")
    dead, live = _dead_pid(), os.getpid()
    host = _HOST
    stale = [_folder(tmp_path / f".prepared.tmp-{host}-{dead}-0a1b2c3d"),
             _folder(tmp_path / f".prepared.old-{host}-{dead}-0a1b2c3d"),
             _folder(tmp_path / ".prepared.tmp-0123abcd")]  # made before tags named their owner
    kept = [_folder(tmp_path / f".prepared.tmp-{host}-{live}-4e5f6a7b"),  # a live run's
            _folder(tmp_path / f".prepared.tmp-{'f' * 8 if host != 'f' * 8 else 'e' * 8}-{dead}-0a1b2c3d"),  # another host's
            _folder(tmp_path / ".prepared.tmp-mine"),  # not a name prepare makes
            _folder(tmp_path / f".other.tmp-{host}-{dead}-0a1b2c3d")]  # another output's
    handled = prep.clean_stale_work_dirs(out)
    assert sorted(handled) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept)
    assert (out / "images.npy").read_text() == "good"


def test_store_moved_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    """A kill between the swap's two renames leaves no out_dir: the last good store comes back."""
    dead, host = _dead_pid(), _HOST
    _folder(tmp_path / f".prepared.old-{host}-{dead}-0a1b2c3d", "last good")
    _folder(tmp_path / f".prepared.tmp-{host}-{dead}-0a1b2c3d", "new, never swapped in")
    prep.clean_stale_work_dirs(tmp_path / "prepared")
    assert (tmp_path / "prepared" / "images.npy").read_text() == "last good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_prepare_killed_mid_run_leaves_nothing_after_the_next_run(tmp_path: Path) -> None:
    """The probe: kill -9 a real prepare while its temporary folder exists; the next run cleans it up."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(150):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    out = tmp_path / "data" / "prepared"
    code = (
        "import sys\n"
        "from metatransfer.config import ImageFolderParams, PrepareParams\n"
        "from metatransfer.data.prepare import prepare\n"
        f"p = PrepareParams(28, 1, 'background_evaluation', 0, {{'mine': ImageFolderParams({str(root)!r}, 'target', "
        "(0.6, 0.2, 0.2))})\n"
        f"prepare(p, ('mine',), {str(tmp_path / 'raw')!r}, {str(out)!r}, 0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".prepared.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(out.parent.glob(".prepared.tmp-*"))
    assert leftovers, "the run ended before it could be killed mid-way"
    assert not out.exists()

    params = PrepareParams(28, 1, "background_evaluation", 0,
                           {"mine": ImageFolderParams(str(root), "target", (0.6, 0.2, 0.2))})
    prep.prepare(params, ("mine",), tmp_path / "raw", out, 0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]
    assert (out / "mine" / "images.npy").is_file()
