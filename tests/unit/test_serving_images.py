"""Image files as serving inputs (issue 18, item 7): decoded and converted by prepare's own code.

The reference array of each file is the row `prepare` wrote for it into the
store (images.npy, uint8) divided by 255, as training reads it.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data import prepare as prep
from metatransfer.data.store import IMAGES_FILE, load_manifest
from metatransfer.serving.images import ImageFile, image_files, parse_base64_json, parse_multipart, preprocess
from metatransfer.serving.inputs import InputError


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB", fmt: str = "PNG") -> Path:
    """A random image of `size` (width, height) in `mode`, saved as `fmt`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, fmt)
    return path


def header_only_png(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, and nothing else (a decompression-bomb header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """A folder of PNG / JPEG files (RGB and grey, larger and smaller than 16 px) prepared at 1 x 16 x 16.

    Returns {file name: the prepared store's row for that file, float32 / 255}.
    """
    tmp = tmp_path_factory.mktemp("serving_images")
    root = tmp / "clinic"
    for k, cls in enumerate(("benign", "malignant")):
        for i in range(4):
            write_image(root / cls / f"rgb{i}.png", (40 + i, 30), seed=10 * k + i)
        write_image(root / cls / "grey.png", (23, 37), seed=20 + k, mode="L")
        write_image(root / cls / "small.png", (10, 12), seed=30 + k)  # enlarged: antialiased bilinear
        write_image(root / cls / "photo.jpg", (50, 41), seed=40 + k, fmt="JPEG")
    params = PrepareParams(image_size=16, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=0,
                           image_folders={"clinic": ImageFolderParams(str(root), "target", (0.5, 0.25, 0.25))})
    prep.prepare(params, ("clinic",), tmp / "raw", tmp / "out", seed=0)
    manifest = load_manifest(tmp / "out", "clinic")
    images = np.load(tmp / "out" / "clinic" / IMAGES_FILE)
    return {str(Path(p).relative_to(root)): images[i].astype(np.float32) / np.float32(255.0)
            for i, p in enumerate(manifest["source_path"])} | {"root": root}


def test_served_image_equals_the_prepared_store_row_bit_for_bit(store: dict) -> None:
    names = sorted(k for k in store if k != "root")
    assert len(names) == 14  # every file prepared: the comparison below covers each kind
    files = [ImageFile((store["root"] / n).read_bytes(), n) for n in names]
    got = preprocess(files, channels=1, size=16)
    assert got.dtype == np.float32 and got.shape == (14, 1, 16, 16)
    for n, arr in zip(names, got):
        assert np.array_equal(arr, store[n]), n


def test_a_plain_pil_resize_is_not_what_prepare_does(store: dict) -> None:
    """The user's workaround in the issue: PIL's own resize differs from the store (so the test above can fail)."""
    with Image.open(store["root"] / "benign" / "rgb0.png") as im:
        naive = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255
    assert np.abs(naive - store["benign/rgb0.png"][0]).max() > 1 / 255


def test_rgb_model_gets_grey_replicated_after_resizing(store: dict) -> None:
    grey = preprocess([ImageFile((store["root"] / "benign" / "grey.png").read_bytes(), "g")], channels=3, size=16)
    assert grey.shape == (1, 3, 16, 16)
    assert np.array_equal(grey[0, 0], store["benign/grey.png"][0]) and np.array_equal(grey[0, 0], grey[0, 2])


@pytest.mark.parametrize("data, lead", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt image: starts like a PNG file but PIL cannot decode it (x)"),
    (b"hello, not an image", "not an image: PIL cannot identify the file format (x)"),
    (header_only_png(8000, 8000), "too large: 8000x8000 = 64,000,000 pixels, over the limit of 40,000,000"),
    (header_only_png(4, 4), "too small: 4x4 pixels"),
], ids=["corrupt", "not an image", "too large", "too small"])
def test_bad_image_files_are_refused_with_the_importers_reason(data: bytes, lead: str) -> None:
    with pytest.raises(InputError) as err:
        preprocess([ImageFile(data, "x")], channels=1, size=16)
    assert str(err.value).startswith(lead), str(err.value)


def test_multipart_file_parts_come_back_byte_for_byte_in_order() -> None:
    from urllib3.filepost import encode_multipart_formdata

    blobs = [bytes(range(256)) * 3 + b"\r\n--\r\n", b"\r\n\r\nsecond"]
    body, ctype = encode_multipart_formdata([("note", "a plain field"), ("image", ("a.png", blobs[0], "image/png")),
                                             ("image", ("b.jpg", blobs[1], "image/jpeg"))])
    files = parse_multipart(ctype, body)
    assert [f.data for f in files] == blobs
    assert [f.where for f in files] == ["file 'a.png', part 2", "file 'b.jpg', part 3"]
    assert image_files(ctype, body) == files


@pytest.mark.parametrize("ctype, body, message", [
    ("multipart/form-data", b"x", "multipart/form-data without a boundary"),
    ("multipart/form-data; boundary=zz", b"--zz\r\nx", "malformed multipart/form-data body: no closing boundary"),
    ("multipart/form-data; boundary=zz", b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--zz--',
     "multipart/form-data body holds no file part"),
    ("image/png", b"", "empty body: a image/png request carries one image file"),
])
def test_malformed_image_requests_are_named(ctype: str, body: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        image_files(ctype, body)


def test_base64_json_images() -> None:
    png = b"\x89PNG fake"
    text = base64.b64encode(png).decode()
    body = f'{{"images_base64": ["{text}", "data:image/png;base64,{text}"]}}'.encode()
    assert [f.data for f in parse_base64_json(body)] == [png, png]
    assert [f.data for f in image_files("application/json; charset=utf-8", f'{{"images_base64": "{text}"}}'.encode())
            ] == [png]
    assert image_files("application/json", b'{"inputs": [[0.5]]}') is None  # an array request: MLflow's
    with pytest.raises(InputError, match=r"not valid base64: .* \(images_base64\[1\]\)"):
        parse_base64_json(f'{{"images_base64": ["{text}", "***"]}}'.encode())
    with pytest.raises(InputError, match="images_base64: expected a base64 string or a non-empty list"):
        parse_base64_json(b'{"images_base64": [1, 2]}')


# --------------------------------------------------------------------------- the ASGI layer
def call(app, body: bytes, content_type: str, path: str = "/invocations") -> tuple[int, bytes]:
    """One POST through an ASGI app, in-process; (status, body)."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


class Echo:
    """An inner app that answers 200 with the Content-Type and body it was handed."""

    async def __call__(self, scope: dict, receive, send) -> None:
        body = (await receive())["body"]
        ctype = dict(scope["headers"])[b"content-type"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ctype + b"\n" + body})


def test_image_layer_hands_mlflow_prepares_array_and_leaves_other_requests_alone(store: dict) -> None:
    import json

    from metatransfer.serving.server import ImageInputs

    app = ImageInputs(Echo(), (1, 16))
    png = (store["root"] / "malignant" / "rgb2.png").read_bytes()
    status, out = call(app, png, "image/png")
    ctype, body = out.split(b"\n", 1)
    assert status == 200 and ctype == b"application/json"
    got = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
    assert np.array_equal(got, store["malignant/rgb2.png"][None])
    array_request = b'{"inputs": [[[[0.5]]]]}'
    assert call(app, array_request, "application/json") == (200, b"application/json\n" + array_request)
    assert call(app, b"a,b\n1,2", "text/csv") == (200, b"text/csv\na,b\n1,2")
    assert call(app, png, "image/png", path="/other")[0] == 200  # only /invocations is read


def test_image_layer_refusals_lead_with_the_reason(store: dict) -> None:
    import json

    from urllib3.filepost import encode_multipart_formdata

    from metatransfer.serving.server import ImageInputs, image_input_shape

    png = (store["root"] / "benign" / "rgb0.png").read_bytes()
    status, out = call(ImageInputs(Echo(), None), png, "image/png")
    assert status == 415 and json.loads(out)["message"].startswith("image files are served for a target model")
    body, ctype = encode_multipart_formdata([("image", (f"{i}.png", png, "image/png")) for i in range(3)])
    status, out = call(ImageInputs(Echo(), (1, 16), max_images=2), body, ctype)
    assert status == 400 and json.loads(out)["message"].startswith("too many images: 3 in one request, at most 2")
    status, out = call(ImageInputs(Echo(), (1, 16)), png[:200], "image/png")
    assert status == 400 and json.loads(out)["message"].startswith("truncated image: ")

    from mlflow.types import Schema, TensorSpec

    def schema(*shapes):
        return Schema([TensorSpec(np.dtype(np.float32), s, f"x{i}") for i, s in enumerate(shapes)])

    assert image_input_shape(schema((-1, 3, 84, 84))) == (3, 84)
    assert image_input_shape(schema((-1, 1, 28, 28), (-1,), (-1, 1, 28, 28))) is None  # the few-shot learner
