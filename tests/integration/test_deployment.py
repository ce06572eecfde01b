"""A scheduled Prefect deployment of the `pipeline` flow, end to end.

A real `prefect server start` on a free loopback port; `python -m flows.deploy`
creates the cron-scheduled deployment and serves it (or, with `--pool`, puts
it in a process work pool for `prefect worker start`); `prefect deployment
run` triggers a run, which must reach Completed. The flow runs on a copy of the
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


@pytest.mark.slow
def test_work_pool_deployment_runs_on_a_worker_with_its_parameters(prefect_server, dvc_project: Path,
                                                                    tmp_path: Path) -> None:
    """`flows.deploy --pool` creates the process pool and the deployment and returns; a run
    triggered with an overriding `--param` is executed by `prefect worker start --run-once`."""
    import yaml

    api, env, server_log = prefect_server
    project = tmp_path / "project"
    shutil.copytree(dvc_project, project, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts", ".prefect"))
    targets = yaml.safe_load((project / "params.yaml").read_text())["finetune"]["targets"]
    assert len(targets) >= 2, targets
    # Same values as params.yaml, other bytes: the run must copy it over params.yaml, and DVC
    # (comparing values) re-runs no stage because of it.
    nightly = "# the nightly scenario\n" + (project / "params.yaml").read_text()
    (project / "nightly.yaml").write_text(nightly)
    prefect = str(Path(sys.executable).parent / "prefect")
    cron = "0 3 1 1 *"  # far from now: only the triggered run is due

    created = subprocess.run([sys.executable, "-m", "flows.deploy", "--root", str(project), "--name", "pool-ci",
                              "--cron", cron, "--pool", "ci-pool", "--params", "nightly.yaml",
                              *[a for t in targets for a in ("--target", t)]],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "in work pool 'ci-pool'" in created.stdout and "prefect worker start --pool ci-pool" in created.stdout
    status, pool = _get(f"{api}/work_pools/ci-pool")
    assert status == 200 and pool["type"] == "process"
    status, dep = _get(f"{api}/deployments/name/pipeline/pool-ci")
    assert status == 200, dep
    assert dep["work_pool_name"] == "ci-pool"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [cron]
    assert dep["parameters"] == {"root": str(project), "params": "nightly.yaml", "targets": targets}
    assert dep["entrypoint"] == "flows.pipeline.pipeline"
    assert dep["job_variables"] == {"working_dir": str(project)}

    # Deploying again updates the same deployment in the same pool (no second pool, no error).
    again = subprocess.run([sys.executable, "-m", "flows.deploy", "--root", str(project), "--name", "pool-ci",
                            "--cron", cron, "--pool", "ci-pool", "--params", "nightly.yaml",
                            *[a for t in targets for a in ("--target", t)]],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _get(f"{api}/deployments/name/pipeline/pool-ci")[1]["id"] == dep["id"]

    trigger = subprocess.run([prefect, "deployment", "run", "pipeline/pool-ci", "--param", f'targets=["{targets[0]}"]'],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)

    # The worker starts in tmp_path, not the project: the run must start in the project folder anyway.
    # Results persisted as JSON, to read what the flow returned (the promotion decisions).
    results = tmp_path / "results"
    worker_env = {**env, "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
                  "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results)}
    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "ci-pool", "--run-once", "--limit", "1"],
                              cwd=tmp_path, env=worker_env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        worker.wait(timeout=240)  # --run-once with --limit waits for the run it took
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(worker)
    _, run = _get(f"{api}/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED", worker_log.read_text()[-4000:]
    assert run["deployment_id"] == dep["id"] and run["work_pool_name"] == "ci-pool"
    assert run["parameters"] == {"root": str(project), "params": "nightly.yaml", "targets": [targets[0]]}
    # The parameters took effect: params.yaml is now nightly.yaml, only targets[0] went through
    # the gate, and the project is up to date with its dvc.lock.
    assert (project / "params.yaml").read_text() == nightly
    key = Path(run["state"]["data"]["storage_key"])
    stored = json.loads((key if key.is_absolute() else results / key).read_text())
    # The flow's result file is the value itself (its metadata is in the state); a task's is a record.
    returned = json.loads(stored["result"]) if set(stored) == {"metadata", "result"} else stored
    assert returned["ran"] == ["check_params"]  # params.yaml's bytes changed, its values did not
    assert [p["target"] for p in returned["promotion"]] == [targets[0]]
    assert returned["dvc_status"] == {}
    assert (project / "dvc.lock").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metatransfer")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'pipeline'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_use_params_copies_a_valid_params_file_over_params_yaml(tmp_path: Path) -> None:
    from metatransfer.errors import ConfigError
    from tasks.deployment import use_params

    root = Path(__file__).resolve().parents[2]
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("old: true\n")
    other = "# other scenario\n" + (root / "params.yaml").read_text()
    (project / "other.yaml").write_text(other)
    assert use_params.fn(str(project)) == str((project / "params.yaml").resolve())
    assert (project / "params.yaml").read_text() == "old: true\n"  # None keeps it
    (project / "bad.yaml").write_text("finetune: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        use_params.fn(str(project), "bad.yaml")
    assert (project / "params.yaml").read_text() == "old: true\n"  # an invalid file is not copied
    assert use_params.fn(str(project), "other.yaml") == str((project / "params.yaml").resolve())
    assert (project / "params.yaml").read_text() == other


def test_check_targets_refuses_a_target_not_in_finetune_targets() -> None:
    import yaml

    from metatransfer.errors import ConfigError
    from tasks.deployment import check_targets

    root = Path(__file__).resolve().parents[2]
    known = yaml.safe_load((root / "params.yaml").read_text())["finetune"]["targets"]
    assert check_targets.fn(str(root)) is None
    assert check_targets.fn(str(root), known[1:2]) == known[1:2]
    with pytest.raises(ConfigError) as err:
        check_targets.fn(str(root), [known[0], "nope"])
    assert "['nope']" in str(err.value) and str(known) in str(err.value) and "params.yaml" in str(err.value)


def test_deploy_refuses_to_run_without_a_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", "--root", str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no Prefect server configured" in proc.stderr and "PREFECT_API_URL=" in proc.stderr
