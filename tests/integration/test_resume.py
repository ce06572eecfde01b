"""Kill -9 at a step boundary, inside a checkpoint write and inside `dvc repro`,
re-run, and get bit-identical weights; `dvc repro` resumes too and does not
redo finished stages.

The kill points are events seen on disk (a checkpoint appears, a write is in
flight), never delays: the process group is first stopped (SIGSTOP), the
state is checked while nothing moves, then it is killed. No hook in the
library's write path and no wall-clock assumption: a slower machine only
makes the test slower.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from metatransfer.artifacts import load_state
from metatransfer.training.checkpoint import checkpoint_dirs
from tests.integration.conftest import project_env

pytestmark = pytest.mark.slow

ALGORITHMS = ["protonet", "fomaml"]
STAGE = [sys.executable, "-m", "metatransfer.stages.meta_train"]
DVC = [sys.executable, "-m", "dvc", "repro", "meta_train"]
HUNG_S = 1800  # a run that shows no progress for this long is hung (the whole stage takes seconds)


def start(cmd: list[str], project: Path, log: Path) -> subprocess.Popen:
    # A new session: signals to the group reach `dvc repro` and the stage it started.
    return subprocess.Popen(cmd, cwd=project, env=project_env(project), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def group_stopped(pgid: int) -> bool:
    """Whether every process of group `pgid` is stopped (or gone), from /proc (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (command)"
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("T", "t", "Z", "X"):
            return False
    return True


def freeze(proc: subprocess.Popen, log: Path) -> None:
    """SIGSTOP the process group and wait until the stop has taken effect everywhere."""
    os.killpg(proc.pid, signal.SIGSTOP)
    while not group_stopped(proc.pid):
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) while being stopped:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def watch(proc: subprocess.Popen, log: Path, what: str, ready: Callable[[], bool]) -> None:
    """Poll until `ready()` holds; fail (with the log) if the run ends first.

    The deadline only keeps a hung run from hanging the suite: no result depends on it.
    """
    deadline = time.monotonic() + HUNG_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"no {what} in {HUNG_S} s: the run looks hung:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, what: str) -> None:
    """Stop the process group as soon as `ready()` holds, then SIGKILL it."""
    watch(proc, log, what, ready)
    freeze(proc, log)
    kill(proc)


def kill_inside_a_checkpoint_write(proc: subprocess.Popen, folder: Path, log: Path) -> list[Path]:
    """SIGKILL the run while one of its checkpoint writes is unfinished.

    Whenever a `.tmp-*` folder (a write in flight) is seen, the group is
    stopped; if that folder is still there once the stop took effect, the
    write is frozen midway and the group is killed. Otherwise the write had
    completed and the run goes on to the next one.

    Returns:
        The unfinished write's folders.
    """
    inflight: list[Path] = []

    def spotted() -> bool:
        inflight[:] = folder.glob("*/.tmp-*")
        return bool(inflight)

    while True:
        watch(proc, log, "a kill landed inside a checkpoint write", spotted)
        freeze(proc, log)
        landed = [p for p in inflight if p.exists()]
        if landed:
            kill(proc)
            return landed
        os.killpg(proc.pid, signal.SIGCONT)


def steps_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*")) if folder.is_dir() else []


def identities(folder: Path) -> set[tuple[str, int]]:
    """(name, inode) of each checkpoint folder: a checkpoint rewritten under the same step changes inode."""
    found = set()
    for path in checkpoint_dirs(folder):
        try:
            found.add((path.name, path.stat().st_ino))
        except FileNotFoundError:
            pass  # pruned meanwhile
    return found


def assert_checkpoints_intact(ck: Path) -> None:
    """Whatever a kill left: every complete checkpoint folder passes its checksums."""
    for algorithm in ALGORITHMS:
        for path in checkpoint_dirs(ck / algorithm):
            load_state(path)  # raises on a missing, partial or altered file


def weights(project: Path) -> dict[str, bytes]:
    return {a: (project / "models" / "meta" / a / "model.safetensors").read_bytes() for a in ALGORITHMS}


def test_sigkill_anywhere_then_rerun_gives_bit_identical_weights(dvc_project: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(dvc_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # Steps are the budget (no wall-clock guard: it would make the weights depend on timing).
    params["meta_train"].pop("time_budget_s", None)
    params["meta_train"].update(algorithms=ALGORITHMS, steps=10, checkpoint_every=2, val_every=4, val_episodes=3)
    params["finetune"]["methods"] = [*ALGORITHMS, "scratch"]
    params["evaluate"]["methods"] = [*ALGORITHMS, "scratch"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ck = project / "checkpoints" / "meta_train"

    ref = subprocess.run(STAGE, cwd=project, env=project_env(project), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = weights(project)
    assert not ck.exists()  # removed once the stage succeeded
    shutil.rmtree(project / "models" / "meta")

    # 1. At a step boundary: once protonet's step-4 checkpoint exists (the first algorithm of two).
    log = tmp_path / "kill1.log"
    kill_when(start(STAGE, project, log), lambda: "step-000000004" in steps_of(ck / "protonet"), log,
              "protonet's step-4 checkpoint")
    assert_checkpoints_intact(ck)
    assert steps_of(ck / "protonet")[-1] >= "step-000000004"

    # 2. Inside a checkpoint write (resuming from 1 first).
    log = tmp_path / "kill2.log"
    unfinished = kill_inside_a_checkpoint_write(start(STAGE, project, log), ck, log)
    assert all(p.is_dir() for p in unfinished)
    assert "resumed from checkpoint" in log.read_text()
    assert_checkpoints_intact(ck)
    before = identities(ck / "fomaml")

    # 3. `dvc repro` killed once it has written a fomaml checkpoint of its own (protonet is
    # done by then: the algorithms train one after the other).
    log = tmp_path / "kill3.log"
    kill_when(start(DVC, project, log),
              lambda: bool(identities(ck / "fomaml") - before), log,
              "a fomaml checkpoint written by `dvc repro`")
    assert_checkpoints_intact(ck)
    assert steps_of(ck / "protonet")[-1] == "step-000000010"  # its final checkpoint

    done = subprocess.run(DVC, cwd=project, env=project_env(project), capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Running stage 'meta_train'" in out and "Running stage 'prepare'" not in out
    assert "resumed from checkpoint" in out and "(step 10, finished)" in out  # protonet: nothing redone
    assert weights(project) == expected
    assert not ck.exists()


def test_runs_left_running_by_dead_processes_are_marked_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILLed pipeline leaves its flow run "Running"; the next pipeline run marks it Crashed
    (owner process gone) and leaves live or just-started runs alone."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running
    from prefect.testing.utilities import prefect_test_harness

    from tasks.recovery import owner_tag, recover_crashed_runs

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_tag = owner_tag(victim.pid)
    victim.kill()
    victim.wait()

    @flow(name="pipeline")
    def pipeline() -> list[str]:
        return recover_crashed_runs()

    with prefect_test_harness(server_startup_timeout=120), get_client(sync_client=True) as client:
        def make(tags: list[str], state) -> str:
            return str(client.create_flow_run(pipeline, tags=tags, state=state).id)

        killed = make([dead_tag], Running())
        alive = make([owner_tag()], Running())  # this process: still running
        starting = make([], Running())  # not tagged yet: inside the grace period
        finished = make([dead_tag], Completed())
        marked = pipeline()
        assert marked == [killed]
        states = {r: client.read_flow_run(r).state.type.value for r in (killed, alive, starting, finished)}
        assert states == {killed: "CRASHED", alive: "RUNNING", starting: "RUNNING", finished: "COMPLETED"}
        own = [r for r in client.read_flow_runs() if str(r.id) not in states]
        assert len(own) == 1 and owner_tag() in own[0].tags  # the new run tagged itself


def test_no_pickle_and_no_foreign_code_in_any_artifact(dvc_project: Path) -> None:
    """Every model the pipeline wrote (DVC outputs and MLflow logged models) is
    safetensors + JSON/YAML, and its code is the installed package's."""
    from metatransfer.artifacts import check_model_code, pickle_files

    assert pickle_files(dvc_project / "models") == []
    assert pickle_files(dvc_project / "mlartifacts") == []
    logged = sorted(p.parent for p in (dvc_project / "mlartifacts").rglob("MLmodel"))
    assert len(logged) >= 2
    for model in logged:
        check_model_code(model)
