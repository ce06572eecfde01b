"""HTTP serving of a logged model: MLflow's scoring app, behind a model check and two guards.

`metatransfer serve` runs `serve()`: the model is downloaded into a private
folder, checked (`artifacts.check_model_code`: no code but the installed
package's can run) and loaded; MLflow's own scoring app (`/invocations`,
`/ping`, `/health`, `/version`) then answers behind two ASGI layers:

- `BodyLimit` refuses a request body above a limit with 413 before reading it
  (Content-Length) or as soon as a streamed body passes it, so one oversized
  request cannot hold a worker or its memory. The default limit is derived from
  the model's input shape (`default_body_limit`).
- `ImageInputs` turns a request that carries image files (`image/png`,
  `image/jpeg`, ... as the body; `multipart/form-data`; base64 strings in JSON
  under `images_base64`) into the array request MLflow scores, each image
  preprocessed by `prepare`'s own code (`images.preprocess`) at the model's
  channels and image size; a bad image gets 400 with the reason first.
- `ReasonFirst` (`answers.py`, with the error answers of the layers above)
  rewrites 4xx answers so that the message starts with the reason and quotes
  at most a short prefix of the input (MLflow's messages put the whole input,
  thousands of characters, before the reason).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

from metatransfer.serving.answers import MissingContentType, ReasonFirst, quote_prefix, reason_first, reply

log = logging.getLogger(__name__)

# A float32 in [0, 1] sent as JSON text (`0.0078431377187371`, then ", ") takes
# up to ~22 bytes; 24 leaves room for brackets and exponents.
JSON_BYTES_PER_VALUE = 24
# The default limit fits this many images of the model's input shape per request.
DEFAULT_MAX_IMAGES = 128
# The default limit stays within these bounds whatever the input shape.
MIN_DEFAULT_BODY_BYTES = 1 << 20
MAX_DEFAULT_BODY_BYTES = 64 << 20
# Room for the JSON envelope and the non-image fields.
ENVELOPE_BYTES = 64 << 10


def default_body_limit(schema: Any) -> int:
    """The default request-body limit (bytes) for a model's input schema.

    `DEFAULT_MAX_IMAGES` rows of every tensor input (e.g. images of shape
    (C, H, W), or support + query images for a few-shot learner) as JSON text,
    plus an envelope, within [1 MiB, 64 MiB]. A schema without tensor shapes
    gets 16 MiB.

    Args:
        schema: the model's input schema (`model.metadata.get_input_schema()`), or None.
    """
    values = 0
    for spec in getattr(schema, "inputs", None) or []:
        shape = getattr(spec, "shape", None)
        if shape is None:
            return 16 << 20
        values += math.prod(abs(int(d)) for d in shape[1:])
    if values == 0:
        return 16 << 20
    limit = DEFAULT_MAX_IMAGES * values * JSON_BYTES_PER_VALUE + ENVELOPE_BYTES
    return int(min(max(limit, MIN_DEFAULT_BODY_BYTES), MAX_DEFAULT_BODY_BYTES))


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that hands the already-read `body` once, then defers to the original."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, without reading it into memory.

    A declared Content-Length over the limit is refused before any byte is
    read; a streamed body is counted and refused as soon as it passes the
    limit. A body within the limit is handed on unchanged.
    """

    def __init__(self, app: Any, limit: int, hint: str = "") -> None:
        self.app, self.limit, self.hint = app, int(limit), hint

    def _too_large(self, size: str) -> str:
        return (f"request body too large: {size}, the limit is {self.limit} bytes{self.hint}; send fewer images "
                "per request, or start the server with a larger --max-body-mb")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                found = quote_prefix(declared.decode("latin-1"))
                await reply(send, 400, f"Content-Length header is not a number: {found}")
                return
            if int(declared) > self.limit:
                await reply(send, 413, self._too_large(f"Content-Length {int(declared)} bytes"))
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await reply(send, 413, self._too_large(f"more than {self.limit} bytes received"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        await self.app(scope, _replay(body, receive), send)


# Image requests are preprocessed one at a time: decoding is CPU-bound (run off the event loop), and
# `importers.decode_files` sets a process-wide warnings filter that concurrent calls could restore wrongly.
_DECODE_LOCK = threading.Lock()


def image_input_shape(schema: Any) -> tuple[int, int] | None:
    """(channels, image size) of a model whose input is one image tensor (batch, C, S, S); else None."""
    inputs = getattr(schema, "inputs", None) or []
    shape = getattr(inputs[0], "shape", None) if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or shape[2] != shape[3] or min(shape[1:]) < 1:
        return None
    return int(shape[1]), int(shape[2])


class ImageInputs:
    """ASGI middleware: requests carrying image files become array requests for MLflow's scoring app.

    A POST to /invocations whose body is an image (`image/*`), a
    `multipart/form-data` form with file parts, or JSON with `images_base64`
    is decoded and preprocessed by `images.preprocess` (prepare's code) at the
    model's channels and image size, then handed on as
    `{"inputs": <float32 (n, C, S, S) array>}` in JSON, so it is checked
    and scored exactly like an array request. At most `max_images` images a
    request (`build_app`: as many as the body limit admits as arrays, at most
    `DEFAULT_MAX_IMAGES`). Errors answer 400 (415 for a model without one
    image input), the message leading with the reason. Must sit inside
    `BodyLimit`, which bounds and buffers the body.
    """

    def __init__(self, app: Any, image_shape: tuple[int, int] | None, max_images: int = DEFAULT_MAX_IMAGES) -> None:
        self.app, self.image_shape, self.max_images = app, image_shape, int(max_images)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        headers = dict((k.lower(), v) for k, v in scope.get("headers") or []) if scope["type"] == "http" else {}
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        kind = ctype.split(";", 1)[0].strip().lower()
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != "/invocations"
                or not (kind.startswith("image/") or kind in ("multipart/form-data", "application/json"))):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        try:
            arrays = await _to_thread(self._images, ctype, body)
        except _Refused as exc:
            await reply(send, exc.status, reason_first(str(exc)))  # cut: a decoder's message has no bound
            return
        if arrays is not None:
            body = json.dumps({"inputs": arrays.tolist()}).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers") or []
                                          if k.lower() not in (b"content-type", b"content-length")]
                     + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await self.app(scope, _replay(body, receive), send)

    def _images(self, content_type: str, body: bytes) -> Any:
        """The preprocessed images of an image request (float32 array), or None for any other request."""
        from metatransfer.serving.images import image_files, preprocess
        from metatransfer.serving.inputs import InputError

        try:
            files = image_files(content_type, body)
            if files is None:
                return None
            if self.image_shape is None:
                raise _Refused(415, "image files are served for a target model (one images input); this model "
                                    "takes named arrays as JSON (see docs/registry.md, Serving)")
            if len(files) > self.max_images:
                raise _Refused(400, f"too many images: {len(files)} in one request, at most {self.max_images} (as "
                                    "many as the body limit admits as arrays); send them in several requests, or "
                                    "start the server with a larger --max-body-mb")
            with _DECODE_LOCK:
                return preprocess(files, *self.image_shape)
        except InputError as exc:
            raise _Refused(400, str(exc)) from None


class _Refused(Exception):
    """An image request answered with `status` and this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _to_thread(func: Any, *args: Any) -> Any:
    """`func(*args)` in a worker thread, so that decoding does not stall the server's other requests."""
    import asyncio

    return await asyncio.to_thread(func, *args)


def build_app(model: Any, max_body_bytes: int | None = None) -> tuple[Any, int]:
    """MLflow's scoring app for a loaded pyfunc model, behind the size limit and the error rewriting.

    Args:
        model: a loaded (and checked) `mlflow.pyfunc.PyFuncModel`.
        max_body_bytes: request body limit; None for `default_body_limit` of the model's input schema.

    Returns:
        (ASGI app, the body limit in bytes).
    """
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    limit = int(max_body_bytes) if max_body_bytes else default_body_limit(schema)
    shapes = [tuple(s.shape[1:]) for s in getattr(schema, "inputs", None) or [] if getattr(s, "shape", None)]
    per_row = sum(math.prod(abs(int(d)) for d in s) for s in shapes) * JSON_BYTES_PER_VALUE
    hint = f" (about {limit // per_row} images of shape {shapes[0]} as JSON)" if shapes and per_row else ""
    app = scoring_server.init(model)
    # An image request becomes an array request in JSON: it may hold no more images than the limit
    # admits as arrays, so a body of small compressed files cannot expand past what the limit bounds.
    max_images = max(1, min(DEFAULT_MAX_IMAGES, limit // per_row)) if per_row else DEFAULT_MAX_IMAGES
    images = ImageInputs(MissingContentType(ReasonFirst(app)), image_input_shape(schema), max_images)
    return BodyLimit(images, limit, hint), limit


def serve(model_uri: str, host: str, port: int, workdir: str | Path, max_body_bytes: int | None = None) -> None:
    """Download, check, load and serve `model_uri` over HTTP until interrupted.

    Args:
        model_uri: e.g. `models:/NAME/VERSION`; resolved with the current tracking URI.
        host, port: where to listen.
        workdir: an empty private folder for the downloaded model.
        max_body_bytes: request body limit (None: derived from the model's input shape).

    Raises:
        ArtifactError: the model holds code or pickles, or its weights fail their checks.
    """
    import uvicorn

    from metatransfer.artifacts import load_pyfunc_model

    model = load_pyfunc_model(model_uri, workdir)
    app, limit = build_app(model, max_body_bytes)
    log.info("serving %s on http://%s:%d (request bodies up to %d bytes)", model_uri, host, port, limit)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
