"""A killed pipeline leaves nothing behind: no process (the stage, the ephemeral
Prefect server), no MLflow run RUNNING, no alias on a version whose run did not
finish; and a workspace in use is refused, not shared.

Real processes, a real DVC project and a real sqlite MLflow store, shrunk to a
sleeping stage and empty model versions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.quick import project_env

pytestmark = pytest.mark.slow

SLEEP = "python -c \"import pathlib, time; pathlib.Path('started').touch(); time.sleep(300)\""
# The first stages the `data` flow runs, each only sleeping: the kill lands in whichever runs first.
SLEEPING_STAGES = f"stages:\n  check_params:\n    cmd: {SLEEP}\n  fetch:\n    cmd: {SLEEP}\n"


def dvc_project(dest: Path) -> Path:
    """A DVC project (no git) whose first stages only sleep."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=dest, env=project_env(dest), check=True)
    (dest / "dvc.yaml").write_text(SLEEPING_STAGES)
    return dest


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def test_kill_9_of_a_flow_stops_its_stage_and_its_prefect_server(tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "project")
    flow = subprocess.Popen([sys.executable, "-m", "flows.data"], cwd=project, env=project_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (project / "started").exists(), flow, "the stage started")
    children = psutil.Process(flow.pid).children(recursive=True)
    cmdlines = [" ".join(p.cmdline()) for p in children]
    assert any("uvicorn" in c and "prefect" in c for c in cmdlines), cmdlines  # the ephemeral API server
    assert any("time.sleep(300)" in c for c in cmdlines), cmdlines  # the stage DVC started

    os.kill(flow.pid, signal.SIGKILL)  # the flow process only, as `kill -9 <pid>` does
    flow.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]
    # The workspace is free again: the kernel dropped the dead holder's lock.
    from metatransfer import ownership

    with ownership.workspace(project, guard_children=False):
        assert ownership.holder(project) == os.getpid()


def test_kill_9_of_dvc_repro_stops_its_stage(tmp_path: Path) -> None:
    """A stage armed with `die_with_dvc` stops when the `dvc repro` that started it is killed,
    also where the shell does not exec the command (dash: DVC -> sh -> python)."""
    project = dvc_project(tmp_path / "project")
    armed = "from metatransfer.ownership import die_with_dvc; assert die_with_dvc(); "
    (project / "dvc.yaml").write_text(SLEEPING_STAGES.replace("import pathlib", armed + "import pathlib"))
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "check_params"], cwd=project,
                             env=dict(project_env(project), SHELL="/bin/sh"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (project / "started").exists(), repro, "the stage started")
    children = psutil.Process(repro.pid).children(recursive=True)
    assert any("time.sleep(300)" in " ".join(p.cmdline()) for p in children)
    os.kill(repro.pid, signal.SIGKILL)
    repro.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]


def test_a_second_flow_or_dvc_repro_refuses_a_workspace_in_use(tmp_path: Path) -> None:
    project = dvc_project(tmp_path / "project")
    env = project_env(project)
    holder = subprocess.Popen(
        [sys.executable, "-c", "from metatransfer import ownership; ownership.claim('.'); print('held', flush=True); "
                               "import time; time.sleep(300)"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "flows.data"], cwd=project, env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by pid {holder.pid} (" in lines[0] and "kill" in lines[0], lines[0]
        assert not (project / "started").exists()  # nothing ran
        repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True,
                               text=True, timeout=120)
        assert repro.returncode != 0 and "Unable to acquire lock" in repro.stdout + repro.stderr
        assert not (project / "started").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over.
    from metatransfer import ownership

    assert ownership.holder(project) == holder.pid
    with ownership.workspace(project, guard_children=False):
        assert ownership.holder(project) == os.getpid()


VICTIM = textwrap.dedent("""
    import sys, time
    import mlflow
    from mlflow.tracking import MlflowClient
    from metatransfer import registry, tracking
    root, name = sys.argv[1], sys.argv[2]
    with tracking.stage_run("finetune", root):
        client = MlflowClient(tracking.tracking_uri(root))
        version = client.create_model_version(name, source="file:///v2").version
        registry.move_alias(client, name, "challenger", version)  # e.g. killed right after this
        print("moved", version, mlflow.active_run().info.run_id, flush=True)
        time.sleep(300)
""")


def killed_run(root: Path, name: str) -> tuple[str, str]:
    """Run VICTIM (a stage run that moves `challenger` to a new version) and SIGKILL it.

    Returns:
        (the new version, the victim's run id).
    """
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(root), name], cwd=root, env=project_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline().split()
    proc.kill()
    proc.wait()
    assert line[:1] == ["moved"], line + [proc.stdout.read()[-3000:]]
    return line[1], line[2]


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite store in tmp_path with a model `m` whose `challenger` is version 1."""
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    tracking.configure(tmp_path)
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    client.create_registered_model("m")
    v1 = client.create_model_version("m", source="file:///v1").version
    client.set_registered_model_alias("m", "challenger", v1)
    return tmp_path, client


def test_a_run_left_running_by_a_dead_process_is_reaped_to_failed(store) -> None:
    from metatransfer import tracking

    root, client = store
    _, dead = killed_run(root, "m")
    exp_id = tracking.configure(root)
    alive = client.create_run(exp_id, tags=tracking.owner_tags()).info.run_id  # this process: alive
    untagged = client.create_run(exp_id).info.run_id  # nobody can tell whose: left alone
    assert client.get_run(dead).info.status == "RUNNING"

    assert tracking.reap_stale_runs(root) == [dead]
    run = client.get_run(dead)
    assert run.info.status == "FAILED" and run.info.end_time
    assert f"owner pid {run.data.tags['owner.pid']} on" in run.data.tags[tracking.REAPED_TAG]
    assert {client.get_run(r).info.status for r in (alive, untagged)} == {"RUNNING"}
    assert tracking.reap_stale_runs(root) == []  # once


def test_an_alias_moved_by_a_run_that_did_not_finish_is_moved_back(store) -> None:
    from metatransfer import registry, tracking

    root, client = store
    v2, dead = killed_run(root, "m")
    assert str(client.get_model_version_by_alias("m", "challenger").version) == v2
    journal = tracking.registry_changes(client.get_run(dead).data.tags)
    assert journal == [{"name": "m", "alias": "challenger", "from": "1", "to": v2}]

    # A stage opening its run reaps (so `dvc repro` does it too, not only the flow).
    with tracking.stage_run("evaluate", root):
        pass
    assert client.get_run(dead).info.status == "FAILED"
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "1"
    assert registry.revert_changes(client, journal) == []  # already undone: nothing twice

    # A change made by someone else after the kill is never overwritten.
    _, dead3 = killed_run(root, "m")
    v4 = str(client.create_model_version("m", source="file:///v4").version)
    client.set_registered_model_alias("m", "challenger", v4)
    assert tracking.reap_stale_runs(root) == [dead3]
    assert str(client.get_model_version_by_alias("m", "challenger").version) == v4
