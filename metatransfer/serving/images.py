"""Image files as serving inputs, preprocessed exactly as `prepare` built the training store.

A request may carry image files instead of float arrays: one image as the raw
body (`Content-Type: image/png`, `image/jpeg`, or any other `image/*` PIL
reads), several as `multipart/form-data` (every file part, in order), or
base64 strings in JSON (`{"images_base64": ["iVBORw0...", ...]}`, a
`data:image/...;base64,` prefix allowed). Each image goes through the same
code as a file of an image folder in `prepare`: `importers.decode_files`
(header bounds MAX_IMAGE_PIXELS / MIN_IMAGE_SIDE checked before any pixel is
decoded, EXIF orientation, colour mode -> grey or RGB; PIL's decompression
bomb warning an error), then `prepare.convert_batch` (luma or replication to
the model's channels, "area" / antialiased bilinear resize to its image size,
rounding to uint8), then `/ 255` to float32 as training reads the store. So a
served image file and the same file brought through `prepare` give the same
array, bit for bit.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import numpy as np

from metatransfer.serving.inputs import InputError

# The JSON key of base64-encoded images (a list of strings, or one string).
BASE64_KEY = "images_base64"


@dataclass(frozen=True)
class ImageFile:
    """One image of a request: its bytes and where it came from (for error messages)."""

    data: bytes
    where: str


def preprocess(files: list[ImageFile], channels: int, size: int) -> np.ndarray:
    """Decode and convert image files as `prepare` does, scaled to [0, 1].

    Args:
        files: the request's images, in answer order.
        channels: the model's input channels (1 grey, 3 RGB).
        size: the model's image side.

    Returns:
        float32 (len(files), channels, size, size) in [0, 1].

    Raises:
        InputError: an image is not decodable, corrupt, truncated, or outside the
            importers' bounds; the message leads with the importer's reason and
            names the image.
    """
    from metatransfer.data import importers as imp
    from metatransfer.data.convert import convert_batch

    out = np.empty((len(files), channels, size, size), dtype=np.float32)
    # decode_image reads a path (its error path sniffs the file's first bytes), as prepare hands it one:
    # each image is written to a private temporary file, decoded, and deleted.
    with tempfile.TemporaryDirectory(prefix="metatransfer-serve-") as tmp:
        for i, f in enumerate(files):
            path = Path(tmp) / f"image{i}"
            path.write_bytes(f.data)
            res = imp.decode_files([path], workers=1)[0]
            path.unlink()
            if isinstance(res, str):
                raise InputError(f"{res} ({f.where})")
            pixels = convert_batch(imp.ImageBatch(res[0][None]), size, channels)
            # The store holds uint8; training reads it as float32 / 255 (episodes, pretrain, finetune).
            out[i] = pixels[0].astype(np.float32) / np.float32(255.0)
    return out


def _params(header: str) -> Message:
    """A parsed header line (value and parameters), via the standard library's MIME parser."""
    return HeaderParser().parsestr(f"X: {header}\n\n")


def media_type(content_type: str) -> str:
    """The lower-case media type of a Content-Type header, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def parse_multipart(content_type: str, body: bytes) -> list[ImageFile]:
    """The file parts of a `multipart/form-data` body, in order.

    Parts without a filename whose Content-Type is not `image/*` (plain form
    fields) are skipped.

    Raises:
        InputError: no boundary, a malformed body, or no file part.
    """
    boundary = _params(content_type).get_param("boundary", header="x")
    if not boundary or not isinstance(boundary, str):
        raise InputError("multipart/form-data without a boundary parameter in its Content-Type")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise InputError(f"malformed multipart/form-data body: no closing boundary {delimiter.decode('latin-1')}--")
    files = []
    for n, chunk in enumerate(chunks[1:-1], start=1):
        if not chunk.startswith(b"\r\n") or b"\r\n\r\n" not in chunk:
            raise InputError(f"malformed multipart/form-data body: part {n} has no header block")
        head, data = chunk[2:].split(b"\r\n\r\n", 1)
        data = data[:-2] if data.endswith(b"\r\n") else data
        headers = HeaderParser().parsestr(head.decode("utf-8", "replace") + "\n\n")
        filename = headers.get_param("filename", header="content-disposition")
        name = headers.get_param("name", header="content-disposition")
        ctype = media_type(headers.get("content-type", ""))
        if filename is None and not ctype.startswith("image/"):
            continue  # a plain form field
        label = f"file {filename[:80]!r}" if filename else f"field {str(name)[:80]!r}"  # names have no bound
        files.append(ImageFile(data, f"{label}, part {n}"))
    if not files:
        raise InputError("multipart/form-data body holds no file part; send each image as a file field "
                         "(curl -F 'image=@scan.png')")
    return files


def parse_base64_json(body: bytes) -> list[ImageFile] | None:
    """The images of a JSON body `{"images_base64": [...]}`; None when the body has no such key.

    Raises:
        InputError: the key holds something other than base64 strings.
    """
    if BASE64_KEY.encode() not in body:  # cheap test first: array requests are large
        return None
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # MLflow's own JSON error answers it
    if not isinstance(doc, dict) or BASE64_KEY not in doc:
        return None
    value = doc[BASE64_KEY]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise InputError(f"{BASE64_KEY}: expected a base64 string or a non-empty list of them, "
                         f"found {type(value).__name__}")
    files = []
    for i, text in enumerate(items):
        if text.startswith("data:") and "base64," in text[:100]:
            text = text.split("base64,", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"not valid base64: {exc} ({BASE64_KEY}[{i}])") from None
        files.append(ImageFile(data, f"{BASE64_KEY}[{i}]"))
    return files


def image_files(content_type: str, body: bytes) -> list[ImageFile] | None:
    """The images a request carries, or None when it is an array request for MLflow's own decoding.

    Args:
        content_type: the request's Content-Type header.
        body: the whole request body.

    Raises:
        InputError: a multipart or base64 body that is malformed, or an empty image body.
    """
    kind = media_type(content_type)
    if kind.startswith("image/"):
        if not body:
            raise InputError(f"empty body: a {kind} request carries one image file as its body")
        return [ImageFile(body, f"the {kind} body")]
    if kind == "multipart/form-data":
        return parse_multipart(content_type, body)
    if kind == "application/json":
        return parse_base64_json(body)
    return None
