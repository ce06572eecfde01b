"""Error answers of the HTTP server: the reason first, the input quoted only by a short prefix.

MLflow's scoring app puts the whole input (thousands of characters) before the
reason in its 4xx messages. `ReasonFirst` rewrites those answers with
`reason_first`; `MissingContentType` answers a POST without Content-Type with
415 and what to send (MLflow's app fails with 500); `reply` sends an error
answer of the server's own guards in MLflow's JSON format.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger(__name__)

# At most this many characters of the input are quoted back in an error.
ECHO_CHARS = 80
# An error message longer than this is cut (a reason never needs more).
MAX_MESSAGE_CHARS = 600


def quote_prefix(text: str, n: int = ECHO_CHARS) -> str:
    """`text` cut to `n` characters, newlines flattened, with how much was left out."""
    flat = " ".join(text.split())
    return repr(flat) if len(flat) <= n else f"{flat[:n]!r}... ({len(text)} characters)"


# Wrappers MLflow puts around a reason, each quoting the input before it. Matched
# from the outside in; `data` is the quoted input, `reason` what went wrong.
_WRAPPERS = (
    # scoring_server.invocations(): a model's MlflowException
    re.compile(r"Failed to predict data '(?P<data>.*)'\. ?\nError: (?P<reason>.*)", re.S),
    # schema enforcement (mlflow.models.utils)
    re.compile(r"Failed to enforce schema of data '(?P<data>.*)' with schema '.*?'\. Error: (?P<reason>.*)", re.S),
    # scoring_server._decode_json_input(): a body that is not JSON
    re.compile(r"(?P<reason>(?:Invalid input\. )?Ensure that input is a valid JSON formatted string\. Error: .*?)"
               r"\s*Input: ?\n(?P<data>.*)", re.S),
)
# MLflow's note on its 2.0 protocol change, appended to several 4xx messages: not a reason.
_PROTOCOL_NOTE = re.compile(r"\s*IMPORTANT: The MLflow Model scoring protocol has changed in MLflow version 2\.0\..*",
                            re.S)
_CONTENT_TYPE = re.compile(r"This predictor only supports the following content types: Types: (?P<types>\[.*?\])\. "
                           r"Got '(?P<data>.*)'\.", re.S)


def reason_first(message: str) -> str:
    """An error message that leads with the reason and quotes at most `ECHO_CHARS` of the input.

    Unwraps MLflow's "Failed to predict data '<input>'. Error: <reason>" (and the
    schema and JSON wrappers), keeps the reason, appends a short prefix of the
    input, and cuts anything longer than `MAX_MESSAGE_CHARS`.
    """
    echo = None
    m = _CONTENT_TYPE.fullmatch(message.strip())
    if m:
        return f"unsupported content type {quote_prefix(m['data'])}; send one of {m['types']}"
    for _ in range(len(_WRAPPERS) + 1):
        m = next((w.fullmatch(message) for w in _WRAPPERS if w.fullmatch(message)), None)
        if m is None:
            break
        if echo is None:
            echo = m["data"]
        message = m["reason"]
    message = " ".join(_PROTOCOL_NOTE.sub("", message).split())
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... (message cut, {len(message)} characters)"
    if echo is not None:
        message += f" (input starts with {quote_prefix(echo)})"
    return message


async def reply(send: Any, status: int, message: str) -> None:
    """Send a complete JSON error answer in MLflow's format and close the connection."""
    body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ReasonFirst:
    """ASGI middleware: 4xx answers lead with the reason and quote at most a prefix of the input.

    JSON errors (`{"error_code", "message", "stack_trace"}`) get their message
    rewritten by `reason_first` and lose the stack trace (server internals a
    client cannot act on; logged by the server); plain-text errors are rewritten
    the same way. Other answers pass through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        parts: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                start = message
                return
            if start is None:
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _rewrite_error(b"".join(parts), dict(start.get("headers") or []).get(b"content-type", b""))
            headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, rewrite)


def _rewrite_error(body: bytes, content_type: bytes) -> bytes:
    """The body of a 4xx answer with its message passed through `reason_first`."""
    text = body.decode("utf-8", "replace")
    if content_type.startswith(b"application/json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            trace = data.pop("stack_trace", None)
            if trace:
                log.info("stack trace of a %s answer (not sent to the client): %s", data.get("error_code"), trace)
            data["message"] = reason_first(data["message"])
            return json.dumps(data).encode()
    return reason_first(text).encode()


class MissingContentType:
    """ASGI middleware: a POST without Content-Type gets 415 with what to send (MLflow's app fails with 500)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST" and not any(
                k.lower() == b"content-type" for k, _ in scope.get("headers") or []):
            await reply(send, 415, "missing Content-Type header; send application/json (or text/csv), or image "
                                   "files as image/png, image/jpeg or multipart/form-data")
            return
        await self.app(scope, receive, send)
