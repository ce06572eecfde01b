"""An MLflow tracking server with authentication (`--app-name basic-auth`, a
non-default admin password): anonymous and wrong-password requests are
rejected, the admin's are served, and the project's tracking module logs
through it with credentials from the environment (see docs/bad_input.md)."""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# basic-auth needs Flask-WTF (the `mlflow[auth]` extra).
pytest.importorskip("flask_wtf", reason="install the auth extra: pip install 'mlflow[auth]'")

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # not listening yet


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server --app-name basic-auth` on a free local port; stopped at teardown."""
    tmp = tmp_path_factory.mktemp("auth_server")
    password = "Pw-" + secrets.token_urlsafe(16)
    ini = tmp / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )
    port = free_port()
    env = dict(os.environ)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while get(url + SEARCH, "admin", password) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"auth server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, password
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def test_anonymous_and_wrong_password_are_rejected(auth_server) -> None:
    url, password = auth_server
    assert get(url + SEARCH) == 401
    assert get(url + SEARCH, "admin", "wrong-" + password) == 401
    assert get(url + SEARCH, "nobody", password) == 401
    assert get(url + SEARCH, "admin", password) == 200


def test_tracking_module_logs_through_the_server_with_credentials(auth_server, tmp_path: Path) -> None:
    url, password = auth_server
    code = (
        "from metatransfer import tracking\n"
        "with tracking.stage_run('meta_train', '.', {'seed': 0}) as run:\n"
        "    tracking.log_metrics({'val/best_acc': 0.5})\n"
        "print('RUN', run.info.run_id)\n"
    )
    base = dict(os.environ, MLFLOW_TRACKING_URI=url, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
                MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    base.pop("MLFLOW_TRACKING_USERNAME", None), base.pop("MLFLOW_TRACKING_PASSWORD", None)
    anon = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=base, capture_output=True, text=True, timeout=120)
    assert anon.returncode != 0 and "401" in anon.stderr + anon.stdout
    ok = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=dict(base, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password))
    assert ok.returncode == 0, ok.stderr[-3000:]
    run_id = ok.stdout.split("RUN ")[1].strip()
    assert get(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}") == 401
    assert get(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}", "admin", password) == 200
