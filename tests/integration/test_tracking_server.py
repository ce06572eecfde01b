"""The pipeline against an MLflow tracking server with proxied artifacts.

`mlflow server --serve-artifacts` runs on a free loopback port with its own
sqlite backend store and artifact folder; a fresh shrunk project
(`tests.quick`) is reproduced with `MLFLOW_TRACKING_URI=http://...`,
then the registry actions (`promote --force`, `status`) and `metatransfer
serve` run against the same server. Artifacts go through the server
(`mlflow-artifacts:/` URIs), so the project never writes a local store and
the server's folder holds every artifact: a client needs no shared disk
(docs/scale.md, "MLflow tracking server").
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import make_project, project_env
from tests.integration.test_serving import free_port, stop

pytestmark = pytest.mark.slow

STAGE_RUNS = {"fetch", "prepare", "pretrain", "meta_train", "finetune", "evaluate"}


def wait_ready(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180) -> None:
    """Poll GET `url` until 200; fail with the process's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: {url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def cli(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python -m metatransfer.cli --root PROJECT ARGS` (fails the test on a non-zero exit)."""
    proc = subprocess.run([sys.executable, "-m", "metatransfer.cli", "--root", str(project), *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"metatransfer {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_pipeline_registry_and_serving_through_a_tracking_server_with_proxied_artifacts(
        mirror: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from metatransfer import registry
    from metatransfer.config import load_params
    from metatransfer.data.store import load_split
    from metatransfer.training.finetune import load_target_model

    server_dir, artifacts = tmp_path / "server", tmp_path / "server" / "artifacts"
    server_dir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    senv = project_env(server_dir)
    senv["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
         "--artifacts-destination", str(artifacts), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=server_dir, env=senv, stdout=server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    serving = None
    try:
        wait_ready(f"{url}/health", server, server_log, "mlflow server")
        project = make_project(tmp_path / "project", mirror)
        env = dict(project_env(project), MLFLOW_TRACKING_URI=url)

        repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env,
                               capture_output=True, text=True)
        assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-4000:]
        # Everything went to the server: no local store, no local artifact folder.
        assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("metatransfer")
        runs = client.search_runs([exp.experiment_id], max_results=500)
        assert STAGE_RUNS <= {r.info.run_name for r in runs}
        assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
        # Proxied: clients only see mlflow-artifacts:/ URIs; the bytes are in the server's folder.
        assert {r.info.artifact_uri.split(":", 1)[0] for r in runs} == {"mlflow-artifacts"}
        assert any(p.name == "MLmodel" for p in artifacts.rglob("MLmodel"))

        params = load_params(project / "params.yaml")
        target = params.finetune.targets[0]
        name = registry.model_name(target)
        challenger = client.get_model_version_by_alias(name, "challenger").version

        promoted = json.loads(cli(project, env, "promote", "--target", target, "--force",
                                  "--reason", "tracking server test", "--json").stdout)
        assert [(p["name"], p["decision"], p["forced"], p["champion_after"]) for p in promoted] == [
            (name, "promoted", True, challenger)]
        status = json.loads(cli(project, env, "status", "--target", target, "--json").stdout)
        assert status[target][name]["aliases"] == {"challenger": challenger, "champion": challenger}
        assert client.get_model_version_by_alias(name, "champion").version == challenger

        # Serve the champion: the server downloads the model through the tracking server.
        sport = free_port()
        serve_log = tmp_path / "serve.log"
        serving = subprocess.Popen(
            [sys.executable, "-m", "metatransfer.cli", "--root", str(project), "serve", "--target", target,
             "--port", str(sport)],
            cwd=project, env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready(f"http://127.0.0.1:{sport}/ping", serving, serve_log, "metatransfer serve")
        test = load_split(project / "data" / "prepared", target, "test")
        x = test.images[:4].astype(np.float32) / 255
        req = urllib.request.Request(f"http://127.0.0.1:{sport}/invocations",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            rows = json.loads(r.read())["predictions"]
        chosen = json.loads((project / "models" / "target" / target / "selection.json").read_text())["chosen"]
        model = load_target_model(project / "models" / "target" / target / chosen)
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
        assert [row["prediction"] for row in rows] == probs.argmax(1).tolist()
        assert np.allclose([[row[f"prob_{i}"] for i in range(probs.shape[1])] for row in rows], probs, atol=1e-6)
    finally:
        if serving is not None:
            stop(serving)
        stop(server)
