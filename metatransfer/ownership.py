"""Who owns a workspace, and the processes started in it.

A pipeline run (the Prefect flow) starts other processes: the ephemeral
Prefect API server, and through DVC the stage commands (a shell and a
`python -m metatransfer.stages.<stage>`). Killed with SIGKILL, a process
runs no cleanup, so without help those children live on and the next run
trains in the same folders at the same time. Two mechanisms prevent that:

- **The workspace lock is DVC's own repo lock**, `.dvc/tmp/lock` (a
  `zc.lockfile` flock holding the owner's pid). `dvc repro` takes it for its
  whole run; a pipeline flow takes it for its whole run too (`claim`), not
  only while DVC works on one stage, and its in-process DVC calls reuse the
  hold (`dvc_repo`). So a second flow refuses with a line naming the holder's
  pid, and `dvc repro` refuses with DVC's "Unable to acquire lock" before it
  touches anything. The kernel drops a flock when its holder dies, so a lock
  left by a killed run is simply taken over (the pid in the file is stale).
- **The child guard** (`guard`): a small watchdog process, started in its own
  session so a signal to the owner's process group does not reach it, waits
  for the owner to exit (a pidfd; polling where there is none). Then it stops
  (SIGTERM, then SIGKILL after `GRACE_S`) every process that carries the
  owner's token in its environment (`$METATRANSFER_OWNER_TOKENS`, inherited
  by every process started after `guard`, whoever starts it: DVC, Prefect, a
  shell, a forked worker) and the processes adopted at start (children the
  owner already had). Reparented orphans keep their environment, so they are
  found although the process tree no longer leads to them. A clean exit
  stops the watchdog first (`release`), so nothing is killed then.

A process is named by (host, pid, start time): the start time guards against
a recycled pid, the host against judging another machine's processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metatransfer.errors import MetatransferError

TOKEN_ENV = "METATRANSFER_OWNER_TOKENS"  # space-separated: one token per guard around this process
GRACE_S = 3.0  # between SIGTERM and SIGKILL: long enough for uvicorn to close, short enough for a person
START_TOLERANCE_S = 0.01  # psutil start times of one process agree to the jiffy
_dvc_watched = False  # die_with_dvc armed in this process

log = logging.getLogger(__name__)


class WorkspaceBusy(MetatransferError):
    """Another live process (a pipeline flow or `dvc repro`) holds the workspace."""


# --------------------------------------------------------------------------- process identity
def identity(pid: int | None = None) -> tuple[str, int, float]:
    """(host, pid, start time) of this process (or of `pid`)."""
    import psutil

    proc = psutil.Process(pid)
    return socket.gethostname(), proc.pid, proc.create_time()


def alive(host: str, pid: int, started: float) -> bool | None:
    """Whether the process named by (host, pid, start time) still runs.

    Returns:
        True or False for a process of this host; None for another host's (cannot tell).
    """
    import psutil

    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < START_TOLERANCE_S
    except (psutil.NoSuchProcess, ValueError):
        return False


def describe(pid: int) -> str:
    """A short description of a process for messages: its command line (cut), or 'gone'."""
    import psutil

    try:
        cmd = " ".join(psutil.Process(pid).cmdline()) or "?"
    except psutil.Error:
        return "gone"
    return cmd if len(cmd) <= 120 else cmd[:117] + "..."


# --------------------------------------------------------------------------- the child guard
def _wait_for_exit(pid: int, started: float) -> None:
    """Return once the process (pid, started) has exited."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel) or already gone
        fd = None
    try:
        if not alive(socket.gethostname(), pid, started):
            return
        if fd is not None:
            select.select([fd], [], [])  # readable when the process exits
            return
        while alive(socket.gethostname(), pid, started):
            time.sleep(0.2)
    finally:
        if fd is not None:
            os.close(fd)


def members(token: str, adopted: list[tuple[int, float]] | None = None) -> list[Any]:
    """Live processes carrying `token` in $METATRANSFER_OWNER_TOKENS, plus the adopted ones still alive.

    Returns:
        psutil.Process objects (never this process).
    """
    import psutil

    found: dict[int, Any] = {}
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if token in proc.environ().get(TOKEN_ENV, "").split():
                found[proc.pid] = proc
        except psutil.Error:  # another user's process, or gone meanwhile
            continue
    for pid, started in adopted or []:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < START_TOLERANCE_S:
                found[pid] = proc
        except psutil.Error:
            continue
    return list(found.values())


def stop_members(token: str, adopted: list[tuple[int, float]] | None = None, grace: float = GRACE_S) -> list[int]:
    """SIGTERM every member (see `members`), SIGKILL those still alive after `grace` s; repeat
    until none is left (a member may have started another meanwhile).

    Returns:
        The pids stopped.
    """
    import psutil

    stopped: list[int] = []
    for _ in range(5):
        procs = members(token, adopted)
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, left = psutil.wait_procs(procs, timeout=grace)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=grace)
        stopped += [p.pid for p in procs]
    return stopped


def watch(owner_pid: int, owner_started: float, token: str, adopted: list[tuple[int, float]] | None = None) -> list[int]:
    """The watchdog's body: wait for the owner to exit, then stop everything it started."""
    _wait_for_exit(owner_pid, owner_started)
    stopped = stop_members(token, adopted)
    if stopped:
        print(f"metatransfer: process {owner_pid} ended without stopping its children; stopped "
              f"{len(stopped)} of them (pids {', '.join(map(str, sorted(set(stopped))))})", file=sys.stderr)
    return stopped


@dataclass
class Guard:
    """A running watchdog (see the module doc)."""

    token: str
    process: subprocess.Popen
    previous_tokens: str | None

    def stop(self) -> None:
        """Stop the watchdog (the owner ends cleanly) and take the token out of the environment."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.previous_tokens is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self.previous_tokens


def guard(adopt_children: bool = True) -> Guard:
    """Make every process this one starts from now on die with it (kill -9 included).

    Args:
        adopt_children: also stop, when this process dies, the children (and their
            descendants) it has now; e.g. an ephemeral Prefect server started before.

    Returns:
        The Guard; `Guard.stop()` ends it.
    """
    import psutil

    previous = os.environ.get(TOKEN_ENV)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _, pid, started = identity()
    adopted = []
    if adopt_children:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                adopted.append(f"{child.pid}:{child.create_time():.3f}")
    cmd = [sys.executable, "-m", "metatransfer.ownership", str(pid), f"{started:.3f}", token, *adopted]
    # Its own session: a SIGINT/SIGKILL sent to the owner's process group must not take the watchdog along.
    process = subprocess.Popen(cmd, env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               start_new_session=True, close_fds=True)
    os.environ[TOKEN_ENV] = f"{previous} {token}" if previous else token
    return Guard(token, process, previous)


def die_with_dvc() -> bool:
    """In a stage command DVC started: stop this process (SIGTERM) as soon as that DVC process exits.

    A `dvc repro` killed with SIGKILL would otherwise leave its stage training,
    free of DVC's lock, while the next `dvc repro` starts the same stage. DVC
    runs a stage as `$SHELL -c CMD` and marks its environment with
    `$DVC_STAGE`; the nearest ancestor without that mark is the DVC process
    (`dvc repro`, or the flow that runs DVC in-process). A daemon thread waits
    for it to exit (a pidfd). Does nothing outside a DVC stage.

    Returns:
        True when armed (or DVC was already gone and the signal sent).
    """
    import signal

    import psutil

    global _dvc_watched
    if "DVC_STAGE" not in os.environ or _dvc_watched:
        return _dvc_watched
    try:
        proc = psutil.Process().parent()
        while proc is not None and "DVC_STAGE" in proc.environ():
            proc = proc.parent()
    except psutil.Error:
        return False
    if proc is None or proc.pid == 1:  # orphaned already: DVC is gone
        os.kill(os.getpid(), signal.SIGTERM)
        return True
    dvc = (proc.pid, proc.create_time())

    def stop_when_dvc_exits() -> None:
        _wait_for_exit(*dvc)
        log.error("the DVC process %d that started this stage is gone; stopping", dvc[0])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_dvc_exits, name="die-with-dvc", daemon=True).start()
    _dvc_watched = True
    return True


# --------------------------------------------------------------------------- the workspace lock
@dataclass
class _Claim:
    lock: Any
    guard: Guard | None
    count: int = 1


_claims: dict[Path, _Claim] = {}
_claims_lock = threading.Lock()


def lock_path(root: str | Path) -> Path:
    """DVC's repo lock of the project at `root`: `.dvc/tmp/lock`."""
    return Path(root).resolve() / ".dvc" / "tmp" / "lock"


def holder(root: str | Path) -> int | None:
    """The pid written in the workspace lock (the current or the last holder), or None."""
    try:
        return int(lock_path(root).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def held(root: str | Path) -> bool:
    """Whether this process holds the workspace of `root` (see `claim`)."""
    return Path(root).resolve() in _claims


def claim(root: str | Path, guard_children: bool = True) -> None:
    """Take the workspace for this process until `release` (re-entrant: counted).

    Holds DVC's repo lock and (with `guard_children`) starts the child guard.

    Raises:
        WorkspaceBusy: another live process holds it (the message names its pid and command).
        MetatransferError: `root` is not a DVC project.
    """
    import zc.lockfile

    root = Path(root).resolve()
    with _claims_lock:
        if root in _claims:
            _claims[root].count += 1
            return
        if not (root / ".dvc").is_dir():
            raise MetatransferError(f"{root}: not a DVC project (no .dvc folder); run the pipeline from the "
                                    "project root, or `dvc init` a new project first")
        path = lock_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # DVC's own lock: the same file, the same flock, the same " <pid>" content.
            lock = zc.lockfile.LockFile(str(path), content_template="{pid}")
        except zc.lockfile.LockError:
            pid = holder(root)
            who = f"pid {pid} ({describe(pid)})" if pid else "another process"
            raise WorkspaceBusy(
                f"{root}: the workspace is in use by {who}; a second pipeline or `dvc repro` here would "
                f"train in the same folders at the same time. Wait for it to finish or stop it"
                f"{f' (kill {pid})' if pid else ''}, then run again.") from None
        try:
            watchdog = guard() if guard_children else None
        except BaseException:
            lock.close()
            raise
        _claims[root] = _Claim(lock, watchdog)


def release(root: str | Path) -> None:
    """Undo one `claim`; the last one stops the child guard and frees the lock."""
    root = Path(root).resolve()
    with _claims_lock:
        held_claim = _claims.get(root)
        if held_claim is None:
            return
        held_claim.count -= 1
        if held_claim.count > 0:
            return
        del _claims[root]
        try:
            if held_claim.guard is not None:
                held_claim.guard.stop()
        finally:
            held_claim.lock.close()


@contextlib.contextmanager
def workspace(root: str | Path, guard_children: bool = True) -> Iterator[None]:
    """`claim` for the duration of a `with` block."""
    claim(root, guard_children)
    try:
        yield
    finally:
        release(root)


@contextlib.contextmanager
def dvc_repo(root: str | Path) -> Iterator[Any]:
    """A DVC `Repo` of `root` that works while this process holds the workspace.

    DVC would take `.dvc/tmp/lock` again for each operation and wait on our own
    hold of it; while `held(root)`, the repo uses a no-op lock instead (the real
    one is held for the whole run).
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if held(root):
            from dvc.lock import LockNoop

            repo.lock = LockNoop()
        yield repo


def main(argv: list[str] | None = None) -> int:
    """Watchdog entry: `python -m metatransfer.ownership OWNER_PID OWNER_START TOKEN [PID:START ...]`."""
    args = sys.argv[1:] if argv is None else argv
    adopted = [(int(p), float(s)) for p, s in (a.split(":", 1) for a in args[3:])]
    watch(int(args[0]), float(args[1]), args[2], adopted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
