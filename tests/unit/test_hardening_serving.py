"""Model code in the artifact store never runs, and serving errors lead with the reason.

The models are logged and registered by the project's own code into a tiny
store (tests/tiny_project.py); loading goes through MLflow's real
`mlflow.pyfunc.load_model` and the scoring server's real `invocations`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from metatransfer.artifacts import PYFUNC_LOADERS, ArtifactError, check_model_code, load_pyfunc_model, sha256_file
from tests.tiny_project import CHANNELS, SIZE, make_tiny_project, model_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A project with a registered tiny target model and learner; MLflow pointed at it."""
    project = tmp_path_factory.mktemp("tiny") / "project"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(project.parent)
        uris = make_tiny_project(project)
        yield {"project": project, **uris}


def copy_model(tiny, kind: str, dest: Path) -> Path:
    """A private copy of a logged model folder (tests alter it)."""
    return Path(shutil.copytree(model_folder(tiny["project"], tiny[kind]), dest / kind))


def plant(marker: Path) -> str:
    """Python source that, if it ever runs, writes `marker`."""
    return f"\nopen({str(marker)!r}, 'w').write('pwned')\n"


def images(n: int = 2) -> np.ndarray:
    return np.full((n, CHANNELS, SIZE, SIZE), 0.5, dtype=np.float32)


@pytest.mark.parametrize("kind", ["model", "learner"])
def test_logged_model_holds_no_code_and_names_an_installed_loader(tiny, kind: str) -> None:
    folder = model_folder(tiny["project"], tiny[kind])
    assert not [p for p in folder.rglob("*") if p.suffix in (".py", ".pyc", ".pkl")]
    conf = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert conf["loader_module"] in PYFUNC_LOADERS and not conf.get("code")
    check_model_code(folder)  # accepted as logged


@pytest.mark.parametrize("kind, module", [("model", "target_model"), ("learner", "few_shot_model")])
def test_code_planted_in_a_model_never_runs_under_pyfunc_load_model(tiny, kind: str, module: str,
                                                                    tmp_path: Path) -> None:
    """The probe of issue 17: code added to the artifact's `<module>.py`, then the model loaded."""
    import mlflow

    from metatransfer import serving

    folder = copy_model(tiny, kind, tmp_path)
    marker = tmp_path / "marker"
    installed = Path(serving.__file__).parent / f"{module}.py"
    planted = folder / f"{module}.py"
    planted.write_text(installed.read_text() + plant(marker))
    with pytest.raises(ArtifactError) as err:
        mlflow.pyfunc.load_model(str(folder))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{planted}: code in the model differs from the installed package")
    assert f"expected sha256 {sha256_file(installed)}" in message and f"found sha256 {sha256_file(planted)}" in message
    assert "Re-register the model with this version of metatransfer" in message
    assert not marker.exists()


def test_model_whose_mlmodel_runs_artifact_code_is_refused_by_the_library_loaders(tiny, tmp_path: Path) -> None:
    """MLmodel switched to MLflow's models-from-code loader (what main logged): the registry's
    predictions and `load_pyfunc_model` refuse it before MLflow imports the file."""
    from metatransfer import registry

    folder = copy_model(tiny, "model", tmp_path)
    marker = tmp_path / "marker"
    meta = yaml.safe_load((folder / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(loader_module="mlflow.pyfunc.loaders.code_model",
                                              model_code_path=str(folder / "evil.py"))
    (folder / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"loader_module is 'mlflow.pyfunc.loaders.code_model', expected one of"):
        registry.predict_uri(str(folder), images())
    (folder / "evil.py").write_text(plant(marker))
    with pytest.raises(ArtifactError, match=r"evil.py: code in the model differs .*no such file: metatransfer.serving "
                                             r"has no evil.py"):
        load_pyfunc_model(str(folder), tmp_path / "dl")
    assert not marker.exists()


def test_code_paths_and_pickles_are_refused(tiny, tmp_path: Path) -> None:
    import pickle

    folder = copy_model(tiny, "learner", tmp_path)
    meta_path = folder / "MLmodel"
    meta = yaml.safe_load(meta_path.read_text())
    meta["flavors"]["python_function"]["code"] = "code"
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(ArtifactError, match=r"lists code paths 'code', expected none"):
        check_model_code(folder)
    del meta["flavors"]["python_function"]["code"]
    meta_path.write_text(yaml.safe_dump(meta))
    (folder / "python_model.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ArtifactError, match=r"holds pickled files .*python_model.pkl"):
        check_model_code(folder)


def test_checked_load_answers_like_the_library(tiny, tmp_path: Path) -> None:
    import torch

    from metatransfer.training.finetune import load_target_model

    out = load_pyfunc_model(tiny["model"], tmp_path).predict(images())
    with torch.no_grad():
        model = load_target_model(tiny["project"] / "weights" / "pretrain")
        probs = torch.softmax(model(torch.from_numpy(images())), 1)
    assert np.allclose(out["prob_0"], probs[:, 0].numpy(), atol=1e-6)
    assert list(out["label"]) == [["tiny/a", "tiny/b"][i] for i in probs.argmax(1).tolist()]


# --------------------------------------------------------------------------- error messages
def mlflow_error(model, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    """What MLflow's scoring server answers to `body` (status, message), before any rewriting."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        res = scoring_server.invocations(body, content_type, model, model.metadata.get_input_schema())
    except MlflowException as exc:
        return exc.get_http_status_code(), exc.message
    return res.status, res.response


@pytest.fixture(scope="module")
def loaded(tiny, tmp_path_factory: pytest.TempPathFactory):
    return load_pyfunc_model(tiny["model"], tmp_path_factory.mktemp("loaded"))


@pytest.mark.parametrize("case", ["shape", "range", "json", "content type"])
def test_4xx_messages_lead_with_the_reason_and_quote_only_a_prefix(loaded, case: str) -> None:
    from metatransfer.serving.answers import ECHO_CHARS, reason_first

    body, ctype, lead = {
        "shape": (json.dumps({"inputs": np.zeros((40, CHANNELS, 10, 10)).tolist()}), "application/json",
                  f"Shape of input (40, {CHANNELS}, 10, 10) does not match expected shape "
                  f"(-1, {CHANNELS}, {SIZE}, {SIZE})"),
        "range": (json.dumps({"inputs": np.full((40, CHANNELS, SIZE, SIZE), 200.0).tolist()}), "application/json",
                  "images: values must be in [0, 1] (pixel / 255), found range [200, 200]"),
        "json": ("not json " * 2000, "application/json",
                 "Invalid input. Ensure that input is a valid JSON formatted string."),
        "content type": ("{}", "text/x-" + "y" * 5000, "unsupported content type 'text/x-yyy"),
    }[case]
    status, raw = mlflow_error(loaded, body.encode(), ctype)
    assert status in (400, 415) and len(raw) > 2000  # MLflow's own message echoes the input
    message = reason_first(raw)
    assert message.startswith(lead), message
    assert len(message) < len(lead) + ECHO_CHARS + 200, message


def test_default_body_limit_follows_the_input_shape(loaded, tiny, tmp_path: Path) -> None:
    from mlflow.types import Schema, TensorSpec

    from metatransfer.serving.server import DEFAULT_MAX_IMAGES, JSON_BYTES_PER_VALUE, default_body_limit

    def schema(*shapes):
        return Schema([TensorSpec(np.dtype(np.float32), s, f"x{i}") for i, s in enumerate(shapes)])

    assert default_body_limit(loaded.metadata.get_input_schema()) == 1 << 20  # 1x16x16: the 1 MiB floor
    rgb32 = default_body_limit(schema((-1, 3, 32, 32)))
    assert rgb32 > DEFAULT_MAX_IMAGES * 3 * 32 * 32 * JSON_BYTES_PER_VALUE and rgb32 < 48_000_000
    assert default_body_limit(schema((-1, 3, 32, 32), (-1,), (-1, 3, 32, 32))) > rgb32  # support + query
    assert default_body_limit(schema((-1, 3, 512, 512))) == 64 << 20  # the ceiling


def test_image_requests_follow_the_model_and_the_body_limit(loaded, tiny, tmp_path: Path) -> None:
    """The image layer gets the target model's (channels, size), and no more images than the limit
    admits as arrays; the few-shot learner (named inputs) gets none (its image requests answer 415)."""
    from metatransfer.serving.server import DEFAULT_MAX_IMAGES, JSON_BYTES_PER_VALUE, ImageInputs, build_app

    app, limit = build_app(loaded)
    layer = app.app
    assert isinstance(layer, ImageInputs) and layer.image_shape == (CHANNELS, SIZE)
    assert layer.max_images == DEFAULT_MAX_IMAGES  # 1 MiB holds 170 arrays of 1x16x16 as JSON
    app, _ = build_app(loaded, 100_000)
    assert app.app.max_images == 100_000 // (CHANNELS * SIZE * SIZE * JSON_BYTES_PER_VALUE) == 16
    app, _ = build_app(load_pyfunc_model(tiny["learner"], tmp_path))
    assert app.app.image_shape is None
