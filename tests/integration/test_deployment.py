"""A scheduled Prefect deployment of the `pipeline` flow, end to end.

A real `prefect server start` on a free loopback port; `python -m flows.deploy`
creates the cron-scheduled deployment and serves it; `prefect deployment run`
triggers a run, which must reach Completed. The flow runs on a copy of the
`dvc_project` fixture whose stages are all up to date, so the run is fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_serving import free_port, stop

CRON = "0 3 * * *"


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None


def _wait(what: str, check, timeout: float, logs: list[Path]) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"{what}: not after {timeout} s\n{tails}")


@pytest.fixture
def prefect_server(tmp_path: Path):
    """`prefect server start` on a free loopback port, PREFECT_HOME in tmp; yields (api_url, env)."""
    port = free_port()
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(tmp_path / "prefect_home"), PREFECT_UI_ENABLED="false",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "METATRANSFER_PARENT_RUN_ID"):
        env.pop(key, None)
    log = tmp_path / "server.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, cwd=tmp_path, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait("prefect server healthy", lambda: proc.poll() is None and _get(f"{api}/health")[0] == 200, 120, [log])
        yield api, {**env, "PREFECT_API_URL": api}, log
    finally:
        stop(proc)


@pytest.mark.slow
def test_cron_deployment_runs_the_pipeline_to_completion(prefect_server, dvc_project: Path, tmp_path: Path) -> None:
    api, env, server_log = prefect_server
    project = tmp_path / "project"
    shutil.copytree(dvc_project, project, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts", ".prefect"))
    env = {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}  # pick the triggered run up quickly
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--root", str(project), "--name", "ci", "--cron", CRON],
                             cwd=tmp_path, env=env, stdout=serve_log.open("w"),  # not the project: --root counts stderr=subprocess.STDOUT,
                             start_new_session=True)
    logs = [server_log, serve_log]
    try:
        def deployment():
            status, body = _get(f"{api}/deployments/name/pipeline/ci")
            return body if status == 200 else None

        dep = _wait("deployment pipeline/ci created", deployment, 90, logs)
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == [CRON]
        assert dep["schedules"][0]["active"] is True
        assert dep["parameters"] == {"root": str(project)}
        assert dep["entrypoint"] == "flows.pipeline.pipeline"

        trigger = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run", "pipeline/ci"],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)

        def finished():
            status, body = _get(f"{api}/flow_runs/{run_id}")
            state = body["state"]["type"] if status == 200 and body.get("state") else None
            return state if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        assert _wait("flow run finished", finished, 180, logs) == "COMPLETED", serve_log.read_text()[-3000:]
        _, run = _get(f"{api}/flow_runs/{run_id}")
        assert run["deployment_id"] == dep["id"] and run["parameters"] == {"root": str(project)}
    finally:
        stop(serve)
    # The run did the pipeline's work: an MLflow parent run, finished, in the project's own store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metatransfer")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_deploy_refuses_to_run_without_a_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", "--root", str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no Prefect server configured" in proc.stderr and "PREFECT_API_URL=" in proc.stderr
