"""Safe model artifacts: no pickle is ever loaded (so loading runs no code from
the artifact), checksums are checked, and a recorded SHA-256 pins the weights."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import (
    CHECKSUMS,
    WEIGHTS,
    ArtifactError,
    load_learner,
    pickle_files,
    save_learner,
    sha256_file,
    verify_weights,
)
from metatransfer.models import BackboneSpec
from metatransfer.training.finetune import TargetModel, load_target_model, save_target_model

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


class Payload:
    """Unpickling this writes a marker file: proof that artifact code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def learner_folder(tmp_path: Path) -> tuple[Path, str]:
    torch.manual_seed(0)
    learner = build_algorithm("protonet", TINY, 5, {})
    sums = save_learner(learner, tmp_path / "learner")
    return tmp_path / "learner", sums[WEIGHTS]


def target_folder(tmp_path: Path) -> tuple[Path, str]:
    torch.manual_seed(0)
    sums = save_target_model(TargetModel(TINY, ["a", "b"], "protonet"), tmp_path / "target")
    return tmp_path / "target", sums[WEIGHTS]


def plant(folder: Path, payload: bytes, fix_checksums: bool = True) -> None:
    (folder / WEIGHTS).write_bytes(payload)
    if fix_checksums:
        sums = json.loads((folder / CHECKSUMS).read_text())
        sums[WEIGHTS] = sha256_file(folder / WEIGHTS)
        (folder / CHECKSUMS).write_text(json.dumps(sums))


def torch_save_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": Payload(marker)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("make", [learner_folder, target_folder], ids=["learner", "target_model"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save", "pickle, checksums not updated"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, make, kind: str) -> None:
    folder, _ = make(tmp_path)
    marker = tmp_path / "marker"
    if kind == "torch.save":
        plant(folder, torch_save_bytes(marker))
        expected = "a zip archive .torch.save format"
    elif kind == "pickle":
        plant(folder, pickle.dumps(Payload(marker)))
        expected = "a Python pickle; refusing to load it"
    else:
        plant(folder, pickle.dumps(Payload(marker)), fix_checksums=False)
        expected = "checksum mismatch"
    load = load_learner if make is learner_folder else load_target_model
    with pytest.raises(ArtifactError, match=expected) as info:
        load(folder)
    assert str(folder) in str(info.value)
    assert not marker.exists()
    assert pickle_files(folder) == [folder / WEIGHTS]


def test_round_trip_and_recorded_sha_pins_the_weights(tmp_path: Path) -> None:
    folder, sha = learner_folder(tmp_path)
    assert sha == sha256_file(folder / WEIGHTS) and pickle_files(folder) == []
    learner = load_learner(folder, expected_sha256=sha)
    assert not learner.training
    verify_weights(folder, sha)
    # A consistent replacement (new weights + new checksums.json) passes the
    # folder's own checksums but not the hash recorded at training time.
    other, _ = target_folder(tmp_path)
    torch.manual_seed(1)
    replacement = build_algorithm("protonet", TINY, 5, {})
    save_learner(replacement, folder)
    reloaded = load_learner(folder)  # consistent on its own: loads, and holds the new weights
    for key, value in replacement.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with pytest.raises(ArtifactError, match="differs from the one recorded when it was trained"):
        load_learner(folder, expected_sha256=sha)
    with pytest.raises(ArtifactError, match="differs from the recorded"):
        verify_weights(folder, sha)
    t_sha = sha256_file(other / WEIGHTS)
    assert load_target_model(other, expected_sha256=t_sha).class_names == ["a", "b"]
    with pytest.raises(ArtifactError, match="recorded"):
        load_target_model(other, expected_sha256="0" * 64)


def test_pickle_scan_finds_names_and_contents_but_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "a.pkl").write_bytes(b"anything")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob").write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "sub" / "model.bin").write_bytes(torch_save_bytes(tmp_path / "m"))
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("readme.txt", "no pickle here")
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    # A safetensors file whose 8-byte header length starts with 0x80 0x02 (looks like pickle protocol 2).
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x0280 - len(header))
    (tmp_path / "ok.safetensors").write_bytes((0x0280).to_bytes(8, "little") + header + b"\0\0\0\0")
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "ok.safetensors"))["w"].shape == (1,)
    assert pickle_files(tmp_path) == [tmp_path / "a.pkl", tmp_path / "sub" / "blob", tmp_path / "sub" / "model.bin"]


def test_missing_file_is_named(tmp_path: Path) -> None:
    folder, _ = learner_folder(tmp_path)
    (folder / CHECKSUMS).unlink()
    with pytest.raises(ArtifactError, match=r"missing checksums.json .found \['config.json', 'model.safetensors'\]"):
        load_learner(folder)


def test_model_code_must_match_the_installed_serving_module(tmp_path: Path) -> None:
    from metatransfer import serving
    from metatransfer.artifacts import check_model_code

    source = Path(serving.__file__).parent / "target_model.py"
    model = tmp_path / "model"
    (model / "data").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: metatransfer.serving.target_model\n")
    check_model_code(model)  # data only, the installed loader: accepted
    (model / "target_model.py").write_bytes(source.read_bytes())
    check_model_code(model)  # a byte-identical copy of the installed code: accepted (never imported anyway)
    marker = tmp_path / "marker"
    (model / "target_model.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    with pytest.raises(ArtifactError, match=rf"target_model.py: code in the model differs from the installed package "
                                            rf"\(expected sha256 {sha256_file(source)} of the installed "
                                            rf"metatransfer.serving.target_model, found sha256 "
                                            rf"{sha256_file(model / 'target_model.py')}\).*Re-register the model"):
        check_model_code(model)
    assert not marker.exists()
    (model / "target_model.py").write_bytes(source.read_bytes())
    (model / "data" / "extra.pkl").write_bytes(pickle.dumps(1))
    with pytest.raises(ArtifactError, match="holds pickled files"):
        check_model_code(model)
    (model / "data" / "extra.pkl").unlink()
    (model / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.loaders.code_model\n")
    with pytest.raises(ArtifactError, match="loader_module is 'mlflow.pyfunc.loaders.code_model'"):
        check_model_code(model)