"""Folders built beside their destination and swapped in whole (prepare, fetch), and the removal of those a killed
prepare run left."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# `.<out>.tmp-<tag>` (the store being built) and `.<out>.old-<tag>` (the last
# good store, moved aside for the final swap) sit beside out_dir. The tag names
# the owner (host, pid) so that a later run can tell a killed run's leftovers
# from a live run's; the random part keeps two runs of one process apart.
_HOST = f"{zlib.crc32(platform.node().encode()):08x}"
_TAG = re.compile(r"^(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{8}$")


def work_tag() -> str:
    """A new tag for the folders of this run: this host, this pid, a random part."""
    return f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_alive(tag: str) -> bool | None:
    """True/False: the run that made a folder with this tag is (not) running; None: not ours to judge."""
    m = _TAG.match(tag)
    if m is None:
        return None  # not a name prepare makes
    if m["pid"] is None:
        return False  # made before tags named their owner; DVC's repo lock allowed no concurrent run then
    if m["host"] != _HOST:
        return None  # another machine's run on a shared disk: its pid means nothing here
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def clean_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Remove what killed `prepare` runs left beside `out_dir`; keep a live run's folders.

    A kill during a run leaves `.<name>.tmp-<tag>` (a partial store, often tens
    of MB). A kill between the two renames of the final swap leaves out_dir
    missing and the last good store in `.<name>.old-<tag>`: it is moved back.

    Args:
        out_dir: the prepared folder (e.g. data/prepared).

    Returns:
        The leftover folders handled (deleted, or moved back to out_dir).
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for kind in stale:
        prefix = f".{out_dir.name}.{kind}-"
        for path in out_dir.parent.glob(f"{prefix}*"):
            if path.is_dir() and not path.is_symlink() and _owner_alive(path.name[len(prefix):]) is False:
                stale[kind].append(path)
    handled = stale["tmp"] + stale["old"]
    olds = sorted(stale["old"], key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        newest = olds.pop()
        os.rename(newest, out_dir)
        log.warning("%s was missing (a run was killed during its final swap): restored the last good store from %s",
                    out_dir, newest.name)
    for path in stale["tmp"] + olds:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by a prepare run that was killed", path)
    return handled


@contextlib.contextmanager
def swapped_in(dest: Path, tag: str) -> Iterator[Path]:
    """Build a folder beside `dest` and let it replace `dest` whole when the block ends without error.

    Yields `.<name>.tmp-<tag>` (created; its parent must exist). At the end of
    the block the old `dest` is moved to `.<name>.old-<tag>`, the new folder
    renamed to `dest`, and the old one removed. On any error the new folder
    is removed and `dest` is left (or put back) as it was.

    Args:
        dest: the folder to replace (need not exist).
        tag: names the temporary folders (see `work_tag`).
    """
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    old = dest.parent / f".{dest.name}.old-{tag}"
    try:
        tmp.mkdir()
        yield tmp
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.rename(old, dest)  # put the last good output back
        raise
    shutil.rmtree(old, ignore_errors=True)
