"""`metatransfer serve` answers image files (issue 18, item 7) as it answers prepare's arrays of them.

A real server (`metatransfer serve` in a subprocess) of the tiny registered
target model (1 x 16 x 16, classes tiny/a and tiny/b; tests/tiny_project.py).
PNG files written here are brought through `prepare` (an image folder at
1 x 16 x 16); the store's row of a file, / 255, sent as an array request is
the reference answer for that file sent as an image.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_serving import free_port, server_env, stop, wait_ready
from tests.tiny_project import CHANNELS, SIZE, TARGET, make_tiny_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(server URL, {file: path}, {file: the prepared store's row / 255})."""
    from metatransfer.config import ImageFolderParams, PrepareParams
    from metatransfer.data import prepare as prep
    from metatransfer.data.store import IMAGES_FILE, load_manifest

    base = tmp_path_factory.mktemp("serving_images")
    root = base / "scans"
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        for i in range(4):
            (root / cls).mkdir(parents=True, exist_ok=True)
            # colour, not square, larger than 16 px: luma conversion and "area" resizing both matter
            Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8), "RGB").save(
                root / cls / f"scan{i}.png")
    params = PrepareParams(image_size=SIZE, channels=CHANNELS, omniglot_protocol="background_evaluation",
                           meta_val_classes=0,
                           image_folders={"scans": ImageFolderParams(str(root), "target", (0.5, 0.25, 0.25))})
    prep.prepare(params, ("scans",), base / "raw", base / "prepared", seed=0)
    manifest = load_manifest(base / "prepared", "scans")
    store = np.load(base / "prepared" / "scans" / IMAGES_FILE)
    arrays = {str(Path(p).relative_to(root)): store[i].astype(np.float32) / np.float32(255.0)
              for i, p in enumerate(manifest["source_path"])}
    files = {name: root / name for name in arrays}
    assert len(files) == 8
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(base)
        make_tiny_project(base / "project")
    project = base / "project"
    log = base / "server.log"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "metatransfer.cli", "--root", str(project), "serve", "--target", TARGET, "--port", str(port)],
                            cwd=project, env=server_env(project), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        yield f"http://127.0.0.1:{port}", files, arrays
    finally:
        stop(proc)


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    """POST /invocations; (status, JSON answer)."""
    req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def array_answer(url: str, arrays: list[np.ndarray]) -> list[dict]:
    status, answer = post(url, json.dumps({"inputs": np.stack(arrays).tolist()}).encode(), "application/json")
    assert status == 200, answer
    return answer["predictions"]


def same_answer(got: list[dict], expected: list[dict]) -> None:
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]
    assert [g["class_name"] for g in got] == [e["class_name"] for e in expected]
    np.testing.assert_allclose([g["prob_0"] for g in got], [e["prob_0"] for e in expected], rtol=0, atol=1e-7)


def test_png_body_is_answered_like_prepares_array_of_the_file(served) -> None:
    url, files, arrays = served
    for name in sorted(files):
        status, answer = post(url, files[name].read_bytes(), "image/png")
        assert status == 200, answer
        same_answer(answer["predictions"], array_answer(url, [arrays[name]]))


def test_answers_carry_class_names_as_probability_keys(served) -> None:
    url, files, _ = served
    status, answer = post(url, files["benign/scan0.png"].read_bytes(), "image/png")
    first = answer["predictions"][0]
    assert status == 200 and first["class_name"] == ["a", "b"][first["prediction"]]
    assert set(first["probabilities"]) == {"a", "b"} and first["label"] == f"{TARGET}/{first['class_name']}"
    assert abs(sum(first["probabilities"].values()) - 1) < 1e-6
    assert first["probabilities"]["a"] == pytest.approx(first["prob_0"], abs=1e-12)


def test_multipart_and_base64_json_answer_one_row_per_image_in_order(served) -> None:
    from urllib3.filepost import encode_multipart_formdata

    url, files, arrays = served
    names = sorted(files)[::-1]
    expected = array_answer(url, [arrays[n] for n in names])
    body, ctype = encode_multipart_formdata([("image", (n, files[n].read_bytes(), "image/png")) for n in names])
    status, answer = post(url, body, ctype)
    assert status == 200, answer
    same_answer(answer["predictions"], expected)
    doc = {"images_base64": [base64.b64encode(files[n].read_bytes()).decode() for n in names]}
    status, answer = post(url, json.dumps(doc).encode(), "application/json")
    assert status == 200, answer
    same_answer(answer["predictions"], expected)


@pytest.mark.parametrize("body, ctype, lead", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000, "image/png",
     "corrupt image: starts like a PNG file but PIL cannot decode it (the image/png body)"),
    (b"GIF89a" + b"\x00" * 10, "image/gif", "corrupt image: starts like a GIF file"),
    (b"just text", "image/jpeg", "not an image: PIL cannot identify the file format"),
    (b'{"images_base64": ["***"]}', "application/json", "not valid base64"),
], ids=["corrupt png", "corrupt gif", "not an image", "bad base64"])
def test_bad_image_gets_400_leading_with_the_reason(served, body: bytes, ctype: str, lead: str) -> None:
    url, _, _ = served
    status, answer = post(url, body, ctype)
    assert status == 400 and answer["message"].startswith(lead), answer
    assert len(answer["message"]) < 300 and "stack_trace" not in answer


def test_array_requests_are_served_as_before(served) -> None:
    url, _, arrays = served
    answer = array_answer(url, [np.full((CHANNELS, SIZE, SIZE), 0.5, np.float32)] * 3)
    assert len(answer) == 3 and {"prediction", "label", "class_name", "probabilities", "prob_0"} <= set(answer[0])
