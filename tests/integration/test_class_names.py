"""Class names, not indices, where a person looks after `dvc repro`: the HTML report,
reports/evaluate.md, metrics/evaluate.json and the `finetune` run in MLflow.

Targets come from the project's params.yaml and class names from its prepared
store, so these hold for either scenario of the `dvc_project` fixture.
(Serving and the registered versions: tests/integration/test_serving.py.)
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _targets(project: Path) -> dict[str, list[str]]:
    """target -> full class names in label order (the prepared manifest's `class` column)."""
    from metatransfer.config import load_params
    from metatransfer.data.store import load_split

    params = load_params(project / "params.yaml")
    return {t: list(load_split(project / params.data.prepared_dir, t, "test").class_names)
            for t in params.finetune.targets}


def _short(target: str, name: str) -> str:
    return name.removeprefix(f"{target}/")


def test_report_names_every_class_of_every_target(dvc_project: Path) -> None:
    page = (dvc_project / "reports" / "index.html").read_text()
    metrics = json.loads((dvc_project / "metrics" / "evaluate.json").read_text())
    for target, names in _targets(dvc_project).items():
        t = metrics["target_models"][target]
        assert t["class_names"] == names
        assert sum(t["class_counts"]) == t["methods"][t["chosen"]]["images"]
        card = page[page.index(f'id="target-{target}"'):]
        card = card[:card.index('<div class="card">')] if '<div class="card">' in card else card
        recall = card[card.index(f'id="recall-{target}"'):card.index(f'id="confusion-{target}"')]
        confusion = card[card.index(f'id="confusion-{target}"'):]
        for name in names:
            short = html.escape(_short(target, name))
            # one row per class in the per-class recall table, headers on both axes of the confusion matrix
            assert f'<td title="{html.escape(name)}">{short}</td>' in recall, (target, name)
            assert confusion.count(f'<th title="{html.escape(name)}">{short}</th>') == 2, (target, name)
    md = (dvc_project / "reports" / "evaluate.md").read_text()
    for target, names in _targets(dvc_project).items():
        section = md[md.index(f"## Target models: {target} "):]
        assert "| class | test images |" in section
        for name in names:
            assert f"| {_short(target, name)} | " in section, (target, name)


def test_finetune_run_records_the_class_names(dvc_project: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from metatransfer.tracking import EXPERIMENT

    client = MlflowClient(f"sqlite:///{dvc_project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'finetune'", order_by=["attributes.start_time DESC"])
    assert runs, "no finetune run in the project's MLflow store"
    run = runs[0]
    for target, names in _targets(dvc_project).items():
        assert json.loads(run.data.tags[f"{target}/class_names"]) == [_short(target, n) for n in names]
        local = client.download_artifacts(run.info.run_id, f"classes/{target}.json", str(tmp_path))
        doc = json.loads(Path(local).read_text())
        assert [c["name"] for c in doc["classes"]] == names and [c["index"] for c in doc["classes"]] == list(range(len(names)))
