"""Kill -9 at random moments (one of them in the middle of a checkpoint write),
re-run, and get bit-identical weights; `dvc repro` resumes too and does not
redo finished stages."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from metatransfer.training.checkpoint import TEST_SLEEP_ENV
from tests.integration.conftest import project_env

pytestmark = pytest.mark.slow

ALGORITHMS = ["protonet", "fomaml"]
STAGE = [sys.executable, "-m", "metatransfer.stages.meta_train"]
DVC = [sys.executable, "-m", "dvc", "repro", "meta_train"]


def start(cmd: list[str], project: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    env = dict(project_env(project), **extra_env)
    # A new session: SIGKILL to the group reaches `dvc repro` and the stage it started.
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, extra_delay: float = 0.0,
              timeout: float = 300) -> None:
    """SIGKILL the process group once `ready()` holds (plus `extra_delay` s)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kill point not reached in {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    time.sleep(extra_delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def steps_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*")) if folder.is_dir() else []


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

    rng = random.Random(6)
    # 1. Mid-run, by steps: as soon as protonet's step-4 checkpoint exists (6 steps left).
    log = tmp_path / "kill1.log"
    kill_when(start(STAGE, project, log), lambda: "step-000000004" in steps_of(ck / "protonet"), log)
    assert "step-000000004" in steps_of(ck / "protonet") and "step-000000010" not in steps_of(ck / "protonet")
    # 2. In the middle of a checkpoint write (files written, not yet renamed).
    log = tmp_path / "kill2.log"
    kill_when(start(STAGE, project, log, **{TEST_SLEEP_ENV: "3"}),
              lambda: any(p.name.startswith(".tmp-") for p in ck.glob("*/.tmp-*")), log, rng.uniform(0.0, 1.0))
    assert any(ck.glob("*/.tmp-*")), "the kill did not land inside a checkpoint write"
    assert "resumed from checkpoint" in log.read_text()
    # 3. `dvc repro` killed while the second algorithm trains (the first has finished).
    log = tmp_path / "kill3.log"
    kill_when(start(DVC, project, log), lambda: bool(steps_of(ck / "fomaml")), log)
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
