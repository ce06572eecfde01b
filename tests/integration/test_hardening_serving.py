"""`metatransfer serve` under abuse: oversized bodies, echoing errors, planted code.

A real server (`metatransfer serve` in a subprocess, uvicorn on a free
loopback port) on a tiny registered model (tests/tiny_project.py); requests
over real sockets.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_serving import free_port, server_env, stop, wait_ready
from tests.tiny_project import CHANNELS, SIZE, TARGET, make_tiny_project, model_folder

pytestmark = pytest.mark.slow

LIMIT_MB = 0.5


def cli(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "metatransfer.cli", "--root", str(project), *args]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("hardening_serving")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(base)
        uris = make_tiny_project(base / "project")
    return {"project": base / "project", **uris}


@pytest.fixture(scope="module")
def url(project: dict, tmp_path_factory: pytest.TempPathFactory):
    """`metatransfer serve` of the tiny target model with a 0.5 MB body limit."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    proc = subprocess.Popen(cli(project["project"], "serve", "--target", TARGET, "--port", str(port),
                                "--max-body-mb", str(LIMIT_MB)),
                            cwd=project["project"], env=server_env(project["project"]), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def raw_post(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict | str, float]:
    """POST /invocations over a bare socket (the body may be cut short); (status, answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body went out
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    elapsed = time.monotonic() - start
    status = int(data.split(b" ", 2)[1])
    text = data.split(b"\r\n\r\n", 1)[1].decode()
    try:
        return status, json.loads(text), elapsed
    except json.JSONDecodeError:
        return status, text, elapsed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


JSON = b"Content-Type: application/json\r\n"


def test_declared_oversized_body_gets_413_within_a_second(url: str) -> None:
    """The issue's 255 MB probe: refused on its Content-Length, before the body is read."""
    status, answer, elapsed = raw_post(url, JSON + b"Content-Length: 255000000\r\n", b'{"inputs": [[[[0.5, ')
    assert status == 413 and elapsed < 1.0
    assert answer["message"].startswith("request body too large: Content-Length 255000000 bytes, the limit is "
                                        f"{int(LIMIT_MB * 1_000_000)} bytes")
    assert "--max-body-mb" in answer["message"]


def test_streamed_oversized_body_gets_413(url: str) -> None:
    chunk = b"0.5, " * 50_000  # 250 kB per chunk, 3 chunks > 0.5 MB
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)) + b"0\r\n\r\n"
    status, answer, elapsed = raw_post(url, JSON + b"Transfer-Encoding: chunked\r\n", body)
    assert status == 413 and elapsed < 1.0
    assert answer["message"].startswith("request body too large: more than 500000 bytes received")


def test_body_within_the_limit_is_served(url: str) -> None:
    body = json.dumps({"inputs": np.full((8, CHANNELS, SIZE, SIZE), 0.5).tolist()}).encode()
    status, answer, _ = raw_post(url, JSON + b"Content-Length: %d\r\n" % len(body), body)
    assert status == 200 and len(answer["predictions"]) == 8


@pytest.mark.parametrize("case", ["shape", "not json", "content type", "no content type"])
def test_4xx_answers_lead_with_the_reason_and_cut_the_echo(url: str, case: str) -> None:
    body, head, status, lead = {
        "shape": (json.dumps({"inputs": np.zeros((60, CHANNELS, 10, 10)).tolist()}).encode(), JSON, 400,
                  f"Shape of input (60, {CHANNELS}, 10, 10) does not match expected shape"),
        "not json": (b"not json " * 5000, JSON, 400,
                     "Invalid input. Ensure that input is a valid JSON formatted string"),
        "content type": (b"{}", b"Content-Type: text/x-" + b"y" * 4000 + b"\r\n", 415, "unsupported content type"),
        "no content type": (b"{}", b"", 415, "missing Content-Type header"),
    }[case]
    got, answer, elapsed = raw_post(url, head + b"Content-Length: %d\r\n" % len(body), body)
    message = answer["message"] if isinstance(answer, dict) else answer
    assert got == status and elapsed < 1.0
    assert message.startswith(lead), message
    assert len(message) < 400, message  # MLflow's own answers ran to thousands of characters
    assert not isinstance(answer, dict) or "stack_trace" not in answer


def test_serve_refuses_a_model_with_planted_code_and_runs_none_of_it(project: dict, tmp_path: Path) -> None:
    """The issue's probe: code added to the artifact store's copy of the model, then `metatransfer serve`."""
    from metatransfer import serving
    from metatransfer.artifacts import sha256_file

    folder = model_folder(project["project"], project["learner"])
    marker = tmp_path / "marker"
    planted = folder / "few_shot_model.py"
    planted.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    digest = sha256_file(planted)
    try:
        proc = subprocess.run(cli(project["project"], "serve", "--target", TARGET, "--model", "learner",
                                  "--port", str(free_port())),
                              cwd=project["project"], env=server_env(project["project"]), capture_output=True,
                              text=True, timeout=300)
    finally:
        planted.unlink()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not marker.exists()
    assert "Traceback" not in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("metatransfer serve:"))
    assert f"{planted}: code in the model differs from the installed package" in line  # the file in the store
    installed = Path(serving.__file__).parent / "few_shot_model.py"
    assert f"expected sha256 {sha256_file(installed)}" in line and f"found sha256 {digest}" in line
    assert "Re-register the model with this version of metatransfer" in line
