"""Promotion when the validation winner is the baseline itself, and deliberate promotion (`--force`).

Real components: the tiny project (tests/tiny_project.py) with its sqlite
MLflow store and registered models; a challenger version whose `method` is
the promotion baseline (`scratch`) and no champion, the case in which the
gate used to compare the baseline with itself (gain +0.0000, CI [0, 0]).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer import registry
from metatransfer.cli import main as cli
from tests.tiny_project import CHANNELS, SIZE, TARGET, make_tiny_project

NAME = registry.model_name(TARGET)


@pytest.fixture()
def baseline_challenger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tiny project whose challenger v2 is a `scratch` model and that has no champion yet."""
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    project = tmp_path / "project"
    make_tiny_project(project)
    client = MlflowClient(tracking.tracking_uri(project))
    client.delete_registered_model_alias(NAME, "champion")
    v1 = client.get_model_version(NAME, "1")
    v2 = client.create_model_version(NAME, v1.source, run_id=v1.run_id, tags={"method": "scratch"},
                                     model_id=getattr(v1, "model_id", None))
    client.set_registered_model_alias(NAME, "challenger", v2.version)
    return project, client


def _record(project: Path) -> dict:
    return json.loads((project / "reports" / "promotion.json").read_text())[TARGET]


def test_baseline_challenger_without_alternative_is_rejected_saying_why(baseline_challenger,
                                                                        capsys: pytest.CaptureFixture) -> None:
    project, client = baseline_challenger
    assert cli(["--root", str(project), "promote", "--target", TARGET]) == 0
    reason = ("version 2 is the baseline method 'scratch' itself, so the gate would compare it with itself "
              "(gain +0.0000) and can never pass, and no other fine-tuned method of "
              f"models/target/{TARGET}/selection.json is on disk to compare with; promote it deliberately with "
              f"`metatransfer promote --target {TARGET} --force --reason \"...\"`")
    assert capsys.readouterr().out.strip() == (
        f"{NAME}: rejected (challenger v2 vs baseline scratch; champion now none): {reason}")
    record = _record(project)
    assert (record["decision"], record["reason"], record["champion_after"]) == ("rejected", reason, None)
    assert "champion" not in client.get_registered_model(NAME).aliases


def test_baseline_challenger_is_compared_with_the_next_best_method(baseline_challenger,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from metatransfer.models import BackboneSpec
    from metatransfer.training.finetune import TargetModel, save_target_model

    project, _ = baseline_challenger
    folder = project / "models" / "target" / TARGET
    torch.manual_seed(1)
    spec = BackboneSpec(name="conv4", in_channels=CHANNELS, image_size=SIZE, hidden=4)
    for method in ("protonet", "anil"):  # anil is listed but not on disk: not a reference
        if method == "protonet":
            save_target_model(TargetModel(spec, [f"{TARGET}/a", f"{TARGET}/b"], method), folder / method)
    (folder / "selection.json").write_text(json.dumps({"chosen": "scratch", "methods": {
        "scratch": {"val_acc": 0.8}, "pretrain": {"val_acc": 0.6}, "protonet": {"val_acc": 0.7},
        "anil": {"val_acc": 0.75}}}))
    assert registry.next_best_method(project, TARGET, "scratch") == "protonet"
    rng = np.random.default_rng(0)
    images = rng.random((40, CHANNELS, SIZE, SIZE), dtype=np.float32)
    labels = rng.integers(0, 2, 40)
    # The target's test split: this tiny project has no prepared data, the models and registry are real.
    monkeypatch.setattr(registry.promotion, "held_out_images", lambda params, root, target: (images, labels, "fp"))
    settings = registry.GateSettings(n_folds=4)
    result = registry.promote(project, TARGET, settings)
    assert result.reference == "next-best protonet"
    assert result.evidence["reference"]["kind"] == "next_best" and result.evidence["reference"]["method"] == "protonet"
    assert result.reason.startswith(
        "version 2 is the baseline method 'scratch' itself, so it is compared with the next-best method 'protonet': ")
    # Not the challenger against itself: the reference is the protonet target model on disk.
    from metatransfer.artifacts import sha256_file

    assert result.evidence["reference"]["path"] == f"models/target/{TARGET}/protonet"
    assert result.evidence["reference"]["weights_sha256"] == sha256_file(folder / "protonet" / "model.safetensors")
    if result.decision == "rejected":
        assert result.reason.endswith(f"to ship it anyway: `metatransfer promote --target {TARGET} --force "
                                      "--reason \"...\"`")


def test_force_needs_a_reason_and_promotes_without_the_gate(baseline_challenger,
                                                            capsys: pytest.CaptureFixture) -> None:
    project, client = baseline_challenger
    root = ["--root", str(project), "promote"]
    assert cli([*root, "--target", TARGET, "--force"]) == 2
    assert capsys.readouterr().err.strip() == (
        "metatransfer promote: --force needs --reason \"...\" (why the gate is overridden)")
    assert cli([*root, "--target", TARGET, "--force", "--reason", "  "]) == 2
    assert cli([*root, "--force", "--reason", "x"]) == 2
    assert "--force needs --target" in capsys.readouterr().err
    assert cli([*root, "--target", TARGET, "--reason", "x"]) == 2
    assert "--reason is only for --force" in capsys.readouterr().err
    assert "champion" not in client.get_registered_model(NAME).aliases  # nothing moved by refused calls

    why = "scratch is the best on validation; reviewed by the clinic"
    assert cli([*root, "--target", TARGET, "--force", "--reason", why]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{NAME}: promoted (forced, without the gate) (challenger v2 vs none (forced); champion now v2): {why}")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "2"
    record = _record(project)
    assert (record["decision"], record["forced"], record["reason"]) == ("promoted", True, why)
    assert (record["champion_before"], record["champion_after"]) == (None, "2")
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "promote" and run.info.status == "FINISHED"
    assert (run.data.tags["decision"], run.data.tags["forced"], run.data.tags["force_reason"]) == ("promoted", "true", why)
    assert run.data.params["promote.force_reason"] == why and run.data.params["promote.forced"] == "True"
    tags = client.get_model_version(NAME, "2").tags
    assert (tags["gate_decision"], tags["gate_forced"], tags["gate_reason"]) == ("promoted", "true", why)
    # Already champion: nothing to force.
    assert cli([*root, "--target", TARGET, "--force", "--reason", why]) == 0
    assert "already_champion" in capsys.readouterr().out
