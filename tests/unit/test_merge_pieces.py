"""The merge of a fanned-out stage's pieces (`flows.pipeline --task-runner dask`): entries in params order,
each piece handed to the stage's mover once, and a name no piece holds refused by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metatransfer.config import load_params
from metatransfer.errors import ConfigError
from metatransfer.layout import Layout
from metatransfer.stages.common import merge_piece_metrics

ROOT = Path(__file__).resolve().parents[2]


def piece(folder: Path, params, stage: str, entries: dict) -> Path:
    path = Layout.of(folder, params).metrics(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return folder


def test_entries_come_back_in_params_order_and_each_piece_is_taken_once(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    targets = list(params.finetune.targets)
    assert len(targets) >= 2
    # the pieces hold the targets in reverse order, two in the first piece
    first = piece(tmp_path / "a", params, "finetune", {t: {"n": i} for i, t in enumerate(targets[:0:-1][:2])})
    rest = [t for t in targets if t not in json.loads(Layout.of(first, params).metrics("finetune").read_text())]
    second = piece(tmp_path / "b", params, "finetune", {t: {"n": 10 + i} for i, t in enumerate(rest)})
    taken: list[tuple[str, list[str]]] = []
    summary = merge_piece_metrics(params, [first, second], "finetune", "targets",
                                  lambda folder, part, names: taken.append((folder.name, names)))
    assert list(summary) == targets
    assert [name for name, _ in taken] == ["a", "b"]
    assert sorted(n for _, names in taken for n in names) == sorted(targets)


def test_a_name_no_piece_holds_is_refused_by_key(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    algorithms = list(params.meta_train.algorithms)
    only = piece(tmp_path / "a", params, "meta_train", {algorithms[0]: {}})
    with pytest.raises(ConfigError) as err:
        merge_piece_metrics(params, [only], "meta_train", "algorithms", lambda *_: None)
    assert str(err.value) == (f"meta_train pieces [{str(only)!r}] lack the algorithms {algorithms[1:]}: "
                              "run one piece per algorithm of meta_train.algorithms")
