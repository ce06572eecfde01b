"""The `finetune` stage on a class with fewer labelled images than asked, and its progress lines.

A real run of the stage (`metatransfer.stages.finetune.run`: fine-tuning,
the sqlite MLflow store, registration) on a tiny hand-written prepared store:
target `tiny` with 3 classes, one of which has only 2 train images while
`finetune.shots_per_class` asks for 4.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tiny"
TRAIN = {"tiny/a": 6, "tiny/b": 2, "tiny/c": 5}  # images per class in the train split
VAL, TEST = 3, 3  # per class


def _write_store(prepared: Path, channels: int, size: int) -> None:
    """images.npy + manifest.parquet of `TARGET`, each split one contiguous block (as `prepare` writes)."""
    rows = []
    for split, counts in (("train", TRAIN), ("val", dict.fromkeys(TRAIN, VAL)), ("test", dict.fromkeys(TRAIN, TEST))):
        for cls, n in counts.items():
            rows += [{"id": len(rows) + i, "dataset": TARGET, "class": cls, "split": split} for i in range(n)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(rows), channels, size, size), dtype=np.uint8)
    for r in rows:  # a learnable signal: brightness by class
        images[r["id"]] //= 1 + "abc".index(r["class"][-1])
    (prepared / TARGET).mkdir(parents=True)
    np.save(prepared / TARGET / "images.npy", images)
    pd.DataFrame(rows).to_parquet(prepared / TARGET / "manifest.parquet")


@pytest.fixture()
def tiny_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("METATRANSFER_PROGRESS", "log")
    project = tmp_path / "project"
    project.mkdir()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"].update(targets=[TARGET], methods=["scratch"], shots_per_class=4, val_per_class=0, steps=10,
                           batch_size=8, eval_every=5, patience=0, checkpoint_every=0)
    raw["finetune"]["augment"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _write_store(project / raw["data"]["prepared_dir"], raw["prepare"]["channels"], raw["prepare"]["image_size"])
    return project


@pytest.mark.slow  # ~20 s on two cores: a real finetune stage run
def test_finetune_records_the_shots_used_warns_and_reports_progress(tiny_target: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking
    from metatransfer.config import load_params
    from metatransfer.stages.finetune import run

    project = tiny_target
    with caplog.at_level(logging.INFO):
        run(load_params(project / "params.yaml"), project)
    shots = {"requested": 4, "per_class": {"tiny/a": 4, "tiny/b": 2, "tiny/c": 4}, "fewer_than_requested": ["tiny/b"]}
    selection_path = project / "models" / "target" / TARGET / "selection.json"
    selection = json.loads(selection_path.read_text())
    assert selection["shots"] == shots
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "shots_per_class" in r.getMessage()]
    assert warnings == [f"{TARGET}: finetune.shots_per_class is 4 but 1 of 3 classes have fewer labelled train "
                        "images; fine-tuning uses all they have: tiny/b (2)"]
    # Progress of the fine-tuning loop: 10 % steps in log mode, then the closing line.
    lines = [r.getMessage() for r in caplog.records if r.name == "metatransfer.progress"]
    assert any(line.startswith(f"finetune {TARGET}/scratch: 5/10 step (50%), ") for line in lines), lines
    assert lines[-1].startswith(f"finetune {TARGET}/scratch: 10/10 step (100%), ") and " done in " in lines[-1]
    assert "loss=" in lines[-1] and "val_acc=" in lines[-1]
    # MLflow: the same counts as a param and in the logged selection.
    client = MlflowClient(tracking.tracking_uri(project))
    exp = client.get_experiment_by_name("metatransfer")
    (finetune_run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'finetune'")
    assert json.loads(finetune_run.data.params[f"{TARGET}/shots_used"]) == shots["per_class"]
    assert finetune_run.data.metrics[f"finetune/{TARGET}/shots_min"] == 2
    # Every finetune metric is named finetune/<target>/...: the loop's curve and the summary.
    loss = client.get_metric_history(finetune_run.info.run_id, f"finetune/{TARGET}/scratch/loss")
    assert [m.step for m in loss] == list(range(1, 11))
    assert finetune_run.data.metrics[f"finetune/{TARGET}/scratch/best_val_acc"] == selection["methods"]["scratch"]["val_acc"]
    assert finetune_run.data.metrics[f"finetune/{TARGET}/selected_val_acc"] == selection["methods"]["scratch"]["val_acc"]
    assert not [k for k in finetune_run.data.metrics if not k.startswith("finetune/")]
    logged = json.loads(Path(client.download_artifacts(finetune_run.info.run_id, f"selection/{TARGET}.json")).read_text())
    assert logged["shots"] == shots
    # selection.json is a DVC output: a second run writes the same bytes.
    first = selection_path.read_bytes()
    shutil.rmtree(project / "models")
    run(load_params(project / "params.yaml"), project)
    assert selection_path.read_bytes() == first
