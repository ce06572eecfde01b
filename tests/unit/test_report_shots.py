"""The report's per-class counts show the train images fine-tuning actually used (issue 18, item 3):
selection.json's `shots` becomes a "fine-tuned on" column, and classes with fewer images than
finetune.shots_per_class are marked and named in a warning line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_report import _build, _manifest, _project

NAMES = [f"retinamnist/{c}" for c in ("basophil", "eosinophil", "monocyte", "lymphocyte", "neutrophil")]


def _with_shots(root: Path, shots: dict | None) -> str:
    _manifest(root, {"train": [5, 10, 15, 20, 25], "val": [1, 2, 3, 4, 5], "test": [3, 20, 33, 88, 207]}, NAMES)
    sel_path = root / "models" / "target" / "retinamnist" / "selection.json"
    sel = json.loads(sel_path.read_text())
    if shots is not None:
        sel["shots"] = shots
    sel_path.write_text(json.dumps(sel))
    page = _build(root)
    card = page[page.index('id="target-retinamnist"'):page.index('id="evaluation"')]
    return card[card.index('id="counts-retinamnist"'):]


def test_counts_show_the_shots_fine_tuning_used(tmp_path: Path) -> None:
    used = dict(zip(NAMES, [5, 10, 12, 12, 12]))
    counts = _with_shots(_project(tmp_path), {"requested": 12, "per_class": used,
                                              "fewer_than_requested": NAMES[:2]})
    assert "<tr><th>class</th><th>train</th><th>val</th><th>test</th><th>fine-tuned on</th></tr>" in counts
    # the two short classes are marked; the others are plain rows with the requested 12
    assert ('<tr class="short"><td title="retinamnist/basophil">basophil</td>'
            "<td>5</td><td>1</td><td>3</td><td>5</td></tr>") in counts
    assert ('<tr class="short"><td title="retinamnist/eosinophil">eosinophil</td>'
            "<td>10</td><td>2</td><td>20</td><td>10</td></tr>") in counts
    assert ('<tr><td title="retinamnist/neutrophil">neutrophil</td>'
            "<td>25</td><td>5</td><td>207</td><td>12</td></tr>") in counts
    assert '<tr class="total"><td>all classes</td><td>75</td><td>15</td><td>351</td><td>51</td></tr>' in counts
    assert ("Fewer train images than finetune.shots_per_class (12) for 2 class(es): basophil, eosinophil; "
            "fine-tuning used all they have") in counts


def test_no_shots_recorded_keeps_the_three_split_columns(tmp_path: Path) -> None:
    counts = _with_shots(_project(tmp_path), None)
    assert "<tr><th>class</th><th>train</th><th>val</th><th>test</th></tr>" in counts
    assert "fine-tuned on" not in counts.split("</table>")[0]
    assert "Fewer train images" not in counts


def test_every_class_at_the_request_has_no_warning(tmp_path: Path) -> None:
    counts = _with_shots(_project(tmp_path), {"requested": 3, "per_class": dict.fromkeys(NAMES, 3),
                                              "fewer_than_requested": []})
    assert '<tr class="total"><td>all classes</td><td>75</td><td>15</td><td>351</td><td>15</td></tr>' in counts
    assert 'class="short"' not in counts and "Fewer train images" not in counts
