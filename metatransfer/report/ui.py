"""Start (or locate) the web UIs for the CLI: MLflow, Prefect, and the HTML report as a file URL.

`open_ui("mlflow")` and `open_ui("prefect")` start the servers as subprocesses
(their own process group, stopped as a whole): no MLflow or Prefect import here.
`run_ui` is the blocking form the CLI's `ui` command uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metatransfer.config import Params, load_params
from metatransfer.errors import MetatransferError
from metatransfer.report.page import build_report
from metatransfer.tracking import tracking_uri

UI_KINDS = ("mlflow", "prefect", "report")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class UiServer:
    """A running (or external) UI: where to point a browser, and how to stop it.

    Attributes:
        kind: "mlflow", "prefect" or "report".
        url: the page to open.
        process: the server we started (None when the UI was already running elsewhere or is a file).
        log_path: the server's stdout/stderr.
    """

    kind: str
    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server and its children (its whole process group); no-op if we did not start one."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        # Both servers fork workers (uvicorn, job runners): signal the group, not just the parent.
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ui_environment(root: Path, kind: str = "", port: int | None = None) -> dict[str, str]:
    """Environment of a UI server: telemetry off, lean MLflow server, the project's Prefect home.

    Args:
        root: the project root (PREFECT_HOME defaults to <root>/.prefect).
        kind: "prefect" adds the settings that make its UI call this server's API.
        port: the server's port.

    Returns:
        A full environment for subprocess.Popen.
    """
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # Without this the MLflow server starts ~10 job-runner processes (2 GB); the UI needs none.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.setdefault("PREFECT_HOME", str(Path(root).resolve() / ".prefect"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if kind == "prefect" and port is not None:
        # The UI asks the server for its API URL, which Prefect derives from these settings
        # (or PREFECT_API_URL), not from `--port`: without them the page calls :4200 and stays empty.
        env.pop("PREFECT_API_URL", None)
        env.update(PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    return env


def ui_command(kind: str, root: Path, port: int) -> tuple[list[str], str, str]:
    """The command line of a UI server, its health URL and the page to open.

    Args:
        kind: "mlflow" or "prefect".
        root: the project root (MLflow store `mlflow.db` and `mlartifacts/` live there).
        port: the TCP port on 127.0.0.1.

    Returns:
        (argv, health_url, ui_url).
    """
    root = Path(root).resolve()
    base = f"http://127.0.0.1:{port}"
    if kind == "mlflow":
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(root),
                "--default-artifact-root", str(root / "mlartifacts"), "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1"]
        return argv, f"{base}/health", f"{base}/"
    if kind == "prefect":
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        return argv, f"{base}/api/health", f"{base}/"
    raise ValueError(f"ui kind must be one of {UI_KINDS}, got {kind!r}")


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200.

    Raises:
        MetatransferError: the process exited, or no answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise MetatransferError(f"the server behind {url} exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise MetatransferError(f"{url} did not answer within {timeout_s:.0f} s")


def open_ui(kind: str, port: int | None = None, root: str | Path = ".", timeout_s: float = 120.0,
            params: Params | None = None, log_dir: str | Path | None = None) -> UiServer:
    """Start (or locate) a UI and return where to open it; the CLI's `ui` and `report` commands.

    - "mlflow": `mlflow server` on the project's store (`<root>/mlflow.db`), unless
      MLFLOW_TRACKING_URI already names an http(s) tracking server: then that URL.
    - "prefect": `prefect server start` with PREFECT_HOME=<root>/.prefect (unless set), unless
      PREFECT_API_URL names a running server: then its UI URL.
    - "report": builds reports/index.html and returns its file:// URL (no server).

    Args:
        kind: "mlflow", "prefect" or "report".
        port: TCP port on 127.0.0.1 (None: a free one).
        root: the project root.
        timeout_s: how long to wait for the server's health endpoint.
        params: params for the report (default: <root>/params.yaml).
        log_dir: where the server's log file goes (default: the system temp folder).

    Returns:
        A `UiServer`; call `.stop()` (or use it as a context manager) to stop a started server.

    Raises:
        MetatransferError: the server did not become healthy (the message points to its log).
    """
    root = Path(root).resolve()
    if kind == "report":
        path = build_report(root, params or load_params(root / "params.yaml"))
        return UiServer("report", path.as_uri())
    if kind not in UI_KINDS:
        raise ValueError(f"ui kind must be one of {UI_KINDS}, got {kind!r}")
    env = ui_environment(root)
    external = env.get("MLFLOW_TRACKING_URI", "") if kind == "mlflow" else env.get("PREFECT_API_URL", "")
    if external.startswith(("http://", "https://")):
        url = external.rstrip("/")
        return UiServer(kind, (url.removesuffix("/api") if kind == "prefect" else url) + "/")
    port = port or free_port()
    argv, health, url = ui_command(kind, root, port)
    env = ui_environment(root, kind, port)
    log_path = Path(log_dir or tempfile.gettempdir()) / f"metatransfer-{kind}-ui-{port}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = UiServer(kind, url, proc, log_path)
    try:
        wait_healthy(health, timeout_s, proc)
    except MetatransferError as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise MetatransferError(f"{kind} UI: {exc}; its log is {log_path}:\n{tail}") from None
    return server


def run_ui(kind: str, port: int | None = None, root: str | Path = ".", open_browser: bool = False,
           echo: Callable[[str], Any] = print) -> int:
    """Blocking version of `open_ui` for a command line: print the URL, serve until Ctrl-C.

    Args:
        kind: "mlflow", "prefect" or "report".
        port: TCP port (None: a free one).
        root: the project root.
        open_browser: also open the page in the default browser.
        echo: where the URL line goes (print by default).

    Returns:
        An exit code: 0 after Ctrl-C (or at once for the report / an external server),
        the server's own code if it stopped by itself.
    """
    server = open_ui(kind, port=port, root=root)
    echo(f"{kind}: {server.url}" + ("  (Ctrl-C stops the server)" if server.process else ""))
    if open_browser:
        webbrowser.open(server.url)
    if server.process is None:
        return 0
    try:
        return int(server.process.wait())
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
