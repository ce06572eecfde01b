"""The report on the transfer settings beyond the homogeneous one (issue 15): a heterogeneous target's
card says that an input adapter was trained, read from where the run records it (the chosen model's
config.json `input` beside `backbone`); an unlabelled target's card says where its registered cluster
model stands, including the `needs_review` answer of `promote`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metatransfer.models import BackboneSpec
from metatransfer.report.inputs import input_shape
from metatransfer.report.sections import adapter_sentence
from metatransfer.report.unlabeled import unlabeled_status
from metatransfer.training.finetune import TargetModel, save_target_model
from tests.unit.test_report import _build, _project

GREY_28 = BackboneSpec(name="conv4", in_channels=1, image_size=28, hidden=4)


def _card(page: str, target: str = "retinamnist") -> str:
    return page[page.index(f'id="target-{target}"'):page.index('id="evaluation"')]


def _save_chosen(root: Path, input_shape_: tuple[int, int] | None) -> dict:
    """The chosen model of the fixture's retinamnist card (protonet), saved as `finetune` saves it."""
    torch.manual_seed(0)
    model = TargetModel(GREY_28, [f"retinamnist/{i}" for i in range(5)], "protonet", input_shape=input_shape_)
    folder = root / "models" / "target" / "retinamnist" / "protonet"
    save_target_model(model, folder)
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(("shape", "sentence"), [
    ((3, 28), "Heterogeneous input: an input adapter was trained with the target model: channels 3 → 1 (a learned "
              "1×1 convolution, started as the fixed conversion prepare applies); resolution 28 px, as the backbone "
              "(adaptive pooling handles any other)."),
    ((3, 64), "Heterogeneous input: an input adapter was trained with the target model: channels 3 → 1 (a learned "
              "1×1 convolution, started as the fixed conversion prepare applies); resolution 64 px → 28 px of the backbone, "
              "handled by adaptive pooling."),
    ((1, 64), "Heterogeneous input: no channel adapter needed (1 channel on both sides); resolution 64 px → 28 px "
              "of the backbone, handled by adaptive pooling."),
])
def test_heterogeneous_card_says_the_input_adapter_was_trained(tmp_path: Path, shape, sentence: str) -> None:
    root = _project(tmp_path)
    config = _save_chosen(root, shape)
    assert input_shape(config) == {"channels": shape[0], "image_size": shape[1], "backbone_channels": 1,
                                   "backbone_size": 28}
    card = _card(_build(root))
    assert f'<p class="adapter">{sentence}</p>' in card


def test_homogeneous_card_has_no_adapter_sentence(tmp_path: Path) -> None:
    root = _project(tmp_path)
    config = _save_chosen(root, (1, 28))  # the backbone's own shape: no `input` key is written
    assert "input" not in config and input_shape(config) is None and adapter_sentence(None) == ""
    assert 'class="adapter"' not in _build(root) and "Heterogeneous input" not in _build(tmp_path)


def test_a_damaged_config_leaves_the_sentence_out() -> None:
    assert input_shape({"input": {"channels": 3}, "backbone": {"in_channels": 1, "image_size": 28}}) is None
    assert input_shape({"input": "3x28"}) is None


def test_unlabelled_status_follows_the_registry() -> None:
    facts = {"registered": {"model": {"name": "metatransfer-cells", "version": "4"}}}
    assert unlabeled_status(None, {})["text"].startswith("Clustered without labels; no registered version is recorded")
    waiting = unlabeled_status(None, facts)
    assert (waiting["badge"], waiting["text"]) == ("no labels", (
        "Clustered without labels; registered as challenger v4; no promotion decision yet (metatransfer promote: "
        "gated on matched accuracy against hidden test labels, or, without any, a person's --force --reason)."))
    review = unlabeled_status({"decision": "needs_review", "challenger": "4", "reason": "no labelled test images"}, facts)
    assert (review["badge"], review["text"]) == ("needs review", "Registered as challenger v4; not promoted: no "
                                                                  "labelled test images.")
    shipped = unlabeled_status({"decision": "promoted", "challenger": "4", "champion_after": "4", "reason": "ok"}, facts)
    assert (shipped["state"], shipped["text"]) == ("shipped", "Clustered without labels. Promoted: champion v4. ok")
