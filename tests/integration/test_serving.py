"""Serving over HTTP: `metatransfer serve` and `mlflow models serve -m models:/NAME@champion`.

Two real servers run as subprocesses on free loopback ports, against a copy
of the `dvc_project` fixture whose registry holds the shipped model of the
first target in its params.yaml and that model's few-shot learner as
`champion`: one started through `metatransfer serve` (MLflow's scoring app
behind the model check and the request guards), one with the plain
`mlflow models serve` command line (the model's installed loader still
checks it). Tests call them over HTTP
and compare with the library; targets, image shape and class names come from
the fixture's params.yaml and prepared store, so the tests hold for either
scenario.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer import registry

pytestmark = pytest.mark.slow



def targets(project: Path) -> tuple[str, str]:
    """(the served target, another target whose classes its learner never saw), from params.yaml."""
    from metatransfer.config import load_params

    names = list(load_params(project / "params.yaml").finetune.targets)
    return names[0], (names[-1] if len(names) > 1 else names[0])


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(project: Path) -> dict[str, str]:
    """Telemetry off, the venv's bin first on PATH (uvicorn), the project's store."""
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    env.pop("METATRANSFER_PARENT_RUN_ID", None)
    return env


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and its workers (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Poll GET /ping until 200 (fail with the server's log if it dies or times out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url}/ping not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def post(url: str, body: object) -> tuple[int, dict]:
    """POST JSON (or raw bytes) to /invocations; returns (status, parsed body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"message": text}


@pytest.fixture(scope="module")
def served(dvc_project: Path, tmp_path_factory: pytest.TempPathFactory):
    """A project copy whose champion is the shipped model, served twice (model and learner)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking
    from metatransfer.config import load_params

    base = tmp_path_factory.mktemp("serving")
    project = base / "project"
    shutil.copytree(dvc_project, project, ignore=shutil.ignore_patterns("mlflow.db", "mlflow.db.lock", "mlartifacts", "cache", ".prefect"))
    params = load_params(project / "params.yaml")
    target, other = targets(project)
    channels, size = params.prepare.channels, params.prepare.image_size
    sel = json.loads((project / "models" / "target" / target / "selection.json").read_text())
    chosen = sel["chosen"]
    folder = project / "models" / "target" / target / chosen
    n_classes = len(json.loads((folder / "config.json").read_text())["class_names"])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
        tracking.configure(project)
        with mlflow.start_run(run_name="serving-fixture") as run:
            uri = tracking.log_target_model(folder, channels, size, n_classes, name="target")
            learner_uri = registry.log_learner_for("protonet", params, project, target)
        entry = {"chosen": chosen, "reason": "serving test", "methods": sel["methods"]}
        reg = registry.register_finetune_result(project, target, entry, uri, learner_uri, run.info.run_id)
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        # Test setup: make them champion directly (the gate itself is tested in test_registry.py).
        client.set_registered_model_alias(registry.model_name(target), "champion", reg["model"]["version"])
        client.set_registered_model_alias(registry.learner_name(target), "champion", reg["learner"]["version"])

    env = server_env(project)
    port_model, port_learner = free_port(), free_port()
    logs = {"model": base / "model_server.log", "learner": base / "learner_server.log"}
    procs = {
        # Through the CLI (MLflow's scoring app behind metatransfer.serving.server's guards)...
        "model": subprocess.Popen(
            [sys.executable, "-m", "metatransfer.cli", "--root", str(project), "serve", "--target", target,
             "--port", str(port_model)],
            cwd=project, env=env, stdout=logs["model"].open("w"), stderr=subprocess.STDOUT, start_new_session=True),
        # ...and with the plain command line of the docs.
        "learner": subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
             f"models:/{registry.learner_name(target)}@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port_learner)],
            cwd=project, env=env, stdout=logs["learner"].open("w"), stderr=subprocess.STDOUT, start_new_session=True),
    }
    urls = {"model": f"http://127.0.0.1:{port_model}", "learner": f"http://127.0.0.1:{port_learner}"}
    try:
        for key in procs:
            wait_ready(urls[key], procs[key], logs[key])
        yield {"project": project, "chosen": chosen, "urls": urls, "target": target, "other": other,
               "shape": (channels, size), "model_uri": uri, "version": reg["model"]["version"]}
    finally:
        for proc in procs.values():
            stop(proc)


def _test_images(project: Path, dataset: str, split: str = "test"):
    from metatransfer.data.store import load_split

    data = load_split(project / "data" / "prepared", dataset, split)
    return data.images.astype(np.float32) / 255, data.labels.astype(np.int64)


def _class_names(project: Path, dataset: str) -> tuple[list[str], list[str]]:
    """(full, display) class names of a target, in label order, from the prepared store's manifest."""
    from metatransfer.data.store import load_split

    full = list(load_split(project / "data" / "prepared", dataset, "test").class_names)
    # What a person reads: the manifest's name without its "<dataset>/" prefix.
    return full, [n.removeprefix(f"{dataset}/") for n in full]


def test_served_model_predicts_held_out_images_like_the_library(served) -> None:
    from metatransfer.training.finetune import load_target_model

    project, target = served["project"], served["target"]
    x, y = _test_images(project, target)
    status, body = post(served["urls"]["model"], {"inputs": x.tolist()})
    assert status == 200, body
    rows = body["predictions"]
    model = load_target_model(project / "models" / "target" / target / served["chosen"])
    n = len(model.class_names)
    probs_cols = {f"prob_{i}" for i in range(n)}
    assert len(rows) == len(x) and set(rows[0]) == {"prediction", "label", "class_name", "probabilities"} | probs_cols
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    assert [r["prediction"] for r in rows] == probs.argmax(1).tolist()
    assert np.allclose([[r[f"prob_{i}"] for i in range(n)] for r in rows], probs, atol=1e-6)
    assert [r["label"] for r in rows] == [model.class_names[i] for i in probs.argmax(1)]
    # The served accuracy on the held-out test split is the one `evaluate` reported.
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    reported = metrics["target_models"][target]["methods"][served["chosen"]]["test_acc"]
    assert np.mean([r["prediction"] for r in rows] == y) == pytest.approx(reported)


def test_served_model_answers_with_the_class_names_of_the_data(served) -> None:
    full, short = _class_names(served["project"], served["target"])
    x, _ = _test_images(served["project"], served["target"])
    status, body = post(served["urls"]["model"], {"inputs": x[:8].tolist()})
    assert status == 200, body
    for r in body["predictions"]:
        assert r["label"] == full[r["prediction"]] and r["class_name"] == short[r["prediction"]]
        assert list(r["probabilities"]) == short  # every class, in label order, keyed by name
        assert np.allclose(list(r["probabilities"].values()), [r[f"prob_{i}"] for i in range(len(short))])


def test_registered_version_lists_the_class_names(served) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    project, target = served["project"], served["target"]
    full, short = _class_names(project, target)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    mv = client.get_model_version(registry.model_name(target), served["version"])
    assert json.loads(mv.tags["class_names"]) == short and json.loads(mv.tags["class_names_full"]) == full
    assert "Classes (index: name" in mv.description
    assert all(f"{i}: {name}" in mv.description for i, name in enumerate(short))
    # The logged model carries them too (MLmodel metadata), for whoever loads it without the registry.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    info = mlflow.models.get_model_info(served["model_uri"])
    assert info.metadata["class_names"] == full and info.metadata["class_labels"] == short


def _bad_bodies(channels: int, size: int) -> list[tuple[object, int, str]]:
    return [
        ({"inputs": np.zeros((2, channels, 10, 10)).tolist()}, 400,
         f"does not match expected shape (-1, {channels}, {size}, {size})"),
        ({"inputs": [[["a", "b"]]]}, 400, "could not convert string to float"),
        ({"inputs": np.full((2, channels, size, size), 200.0).tolist()}, 400, "values must be in [0, 1]"),
        ({"images": [1, 2]}, 400, "exactly one of the input fields"),
        (b"not json", 400, "valid JSON"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_malformed_input_gets_a_4xx_with_a_readable_message(served, case) -> None:
    body, status, fragment = _bad_bodies(*served["shape"])[case]
    code, payload = post(served["urls"]["model"], body)
    assert code == status
    assert fragment in json.dumps(payload) .replace("\\n", "\n").replace('\\"', '"')


def test_few_shot_server_adapts_to_classes_it_never_saw(served) -> None:
    from metatransfer.artifacts import load_learner

    project = served["project"]
    x, y = _test_images(project, served["other"])  # another target: classes this learner never saw
    ways = [c for c in np.unique(y) if (y == c).sum() >= 4][:3]
    assert len(ways) >= 2, f"{served['other']}: too few test images per class for a 3-shot episode"
    support_idx = np.concatenate([np.flatnonzero(y == c)[:3] for c in ways])
    query_idx = np.concatenate([np.flatnonzero(y == c)[3:13] for c in ways])
    sx, sy = x[support_idx], np.repeat(np.arange(len(ways)), 3)
    qx = x[query_idx]
    status, body = post(served["urls"]["learner"],
                        {"inputs": {"support_x": sx.tolist(), "support_y": sy.tolist(), "query_x": qx.tolist()}})
    assert status == 200, body
    served_pred = [r["prediction"] for r in body["predictions"]]
    learner = load_learner(project / "models" / "meta" / "protonet")
    with torch.no_grad():
        ref = learner.adapt(torch.from_numpy(sx), torch.from_numpy(sy), len(ways))(torch.from_numpy(qx)).argmax(1)
    assert served_pred == ref.tolist()
    # The request defines the classes: renaming them in the support set renames the answers.
    perm = np.roll(np.arange(len(ways)), 1)
    status, body = post(served["urls"]["learner"],
                        {"inputs": {"support_x": sx.tolist(), "support_y": perm[sy].tolist(), "query_x": qx.tolist()}})
    assert status == 200 and [r["prediction"] for r in body["predictions"]] == perm[ref.numpy()].tolist()


def test_few_shot_server_rejects_bad_support_sets(served) -> None:
    x, _ = _test_images(served["project"], served["target"])
    bad_labels = {"support_x": x[:4].tolist(), "support_y": [0, 0, 2, 2], "query_x": x[4:6].tolist()}
    code, payload = post(served["urls"]["learner"], {"inputs": bad_labels})
    assert code == 400 and "labels must be 0..N-1" in json.dumps(payload)
    missing = {"support_x": x[:4].tolist(), "support_y": [0, 0, 1, 1]}
    code, payload = post(served["urls"]["learner"], {"inputs": missing})
    assert code == 400 and "query_x" in json.dumps(payload)
