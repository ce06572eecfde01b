"""The two non-default transfer settings of issue 15, each as its documented params file
(scenarios/heterogeneous.yaml, scenarios/unsupervised.yaml), shrunk by `quick_params`, run both
ways: `dvc repro` in one copy, the Prefect `pipeline` flow in another. Both ways must leave the
same DVC state and byte-identical models and metrics, and the report must show the scenario's
results. (The homogeneous setting, params.yaml, is tests/integration/test_pipeline.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from metatransfer import quick
from metatransfer.config import load_params
from metatransfer.quick import project_env, quick_params
from metatransfer.report import build_report, fmt_acc_ci
from tests.integration.conftest import ROOT, slice_mirror
from tests.integration.test_pipeline import STAGES, _dvc

pytestmark = pytest.mark.slow


def _run(dest: Path, args: list[str], log: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=dest, env=project_env(dest), capture_output=True, text=True)
    (dest / log).write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(args)} failed in {dest}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]


def _both_ways(tmp: pytest.TempPathFactory, name: str, params: dict[str, Any]) -> tuple[Path, Path]:
    """Two copies of one shrunk scenario project: after `dvc repro`, and after the Prefect flow."""
    repro = quick.make_project(tmp.mktemp(f"{name}_repro"), params, ROOT)
    _run(repro, ["-m", "dvc", "repro"], "repro.log")
    flow = quick.make_project(tmp.mktemp(f"{name}_flow"), params, ROOT)
    _run(flow, ["-m", "flows.pipeline"], "flow.log")
    return repro, flow


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_state(repro: Path, flow: Path) -> None:
    """The flow-vs-repro invariant of test_pipeline: clean status, the same dvc.lock outs stage by
    stage, and (checked directly) the same bytes in every file under models/ and metrics/."""
    assert _dvc(flow, "status", "--json").stdout.strip() in ("{}", "")
    assert _dvc(repro, "status", "--json").stdout.strip() in ("{}", "")
    lock_r = yaml.safe_load((repro / "dvc.lock").read_text())["stages"]
    lock_f = yaml.safe_load((flow / "dvc.lock").read_text())["stages"]
    assert set(lock_r) == set(lock_f) == set(STAGES)
    for stage in STAGES:
        assert lock_f[stage]["outs"] and lock_f[stage]["outs"] == lock_r[stage]["outs"], stage
    for folder in ("models", "metrics"):
        digests = _file_digests(repro / folder)
        assert digests and _file_digests(flow / folder) == digests, folder


def _pages(repro: Path, flow: Path) -> list[str]:
    """The report of each copy, rebuilt by `build_report` (what `metatransfer report` runs)."""
    return [build_report(p, load_params(p / "params.yaml")).read_text() for p in (repro, flow)]


@pytest.fixture(scope="module")
def heterogeneous(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, Path]:
    """scenarios/heterogeneous.yaml shrunk to Omniglot (grey) -> RetinaMNIST (kept RGB), both ways."""
    params = quick_params(yaml.safe_load((ROOT / "scenarios" / "heterogeneous.yaml").read_text()), slice_mirror(mirror))
    assert params["prepare"]["per_dataset"] == {"retinamnist": {"channels": 3}} and params["prepare"]["channels"] == 1
    params["fetch"]["datasets"] = ["omniglot", "retinamnist"]
    params["episodes"]["sets"] = {k: s for k, s in params["episodes"]["sets"].items() if s["dataset"] != "breastmnist"}
    params["finetune"]["targets"] = ["retinamnist"]
    return _both_ways(tmp_path_factory, "heterogeneous", params)


@pytest.fixture(scope="module")
def unsupervised(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> tuple[Path, Path]:
    """scenarios/unsupervised.yaml shrunk to mini-ImageNet -> BreastMNIST without labels, both ways."""
    params = quick_params(yaml.safe_load((ROOT / "scenarios" / "unsupervised.yaml").read_text()), slice_mirror(mirror))
    params["fetch"]["datasets"] = ["mini_imagenet", "breastmnist"]
    params["episodes"]["sets"] = {k: s for k, s in params["episodes"]["sets"].items() if s["dataset"] == "mini_imagenet"}
    params["finetune"]["targets"] = ["breastmnist"]
    params["finetune"]["unlabeled"]["breastmnist"].update(k_max=3, self_training_steps=3)
    return _both_ways(tmp_path_factory, "unsupervised", params)


def test_heterogeneous_scenario_both_ways(heterogeneous: tuple[Path, Path]) -> None:
    repro, flow = heterogeneous
    _assert_same_state(repro, flow)
    from metatransfer.data.store import load_split

    prepared = repro / "data" / "prepared"
    assert load_split(prepared, "omniglot", "meta_test").images.shape[1:] == (1, 28, 28)
    assert load_split(prepared, "retinamnist", "test").images.shape[1:] == (3, 28, 28)
    sel = json.loads((repro / "models" / "target" / "retinamnist" / "selection.json").read_text())
    for method in sel["methods"]:
        config = json.loads((repro / "models" / "target" / "retinamnist" / method / "config.json").read_text())
        assert config["input"] == {"channels": 3, "image_size": 28}, method  # the target's own shape, not the source's
    metrics = json.loads((repro / "metrics" / "evaluate.json").read_text())
    chosen = metrics["target_models"]["retinamnist"]["chosen"]
    assert chosen == sel["chosen"]
    for page in _pages(repro, flow):
        card = page.split('<h3 id="target-retinamnist">', 1)[1].split('<div class="card">', 1)[0]
        assert card.startswith('retinamnist: <span class="chosen-name">' + chosen)
        for r in metrics["target_models"]["retinamnist"]["methods"].values():  # each method's RGB test accuracy
            assert f"<td>{fmt_acc_ci(r['test_acc'], r['test_acc_ci95'], r['images'])}</td>" in card


def test_unsupervised_scenario_both_ways(unsupervised: tuple[Path, Path]) -> None:
    repro, flow = unsupervised
    _assert_same_state(repro, flow)
    scores = json.loads((repro / "metrics" / "evaluate.json").read_text())["unlabeled_targets"]["breastmnist"]
    sel = json.loads((repro / "models" / "target" / "breastmnist" / "selection.json").read_text())
    assert sel["unlabeled"]["labels_used"] == 0 and scores["k"] == sel["unlabeled"]["k"]
    sentence = (f"No labels were used for training; k={scores['k']}, clustering in the {sel['chosen']} embedding; "
                "scored against hidden labels")
    for page in _pages(repro, flow):
        assert sentence in page
        for r in scores["methods"].values():  # every method's NMI and ARI, as the card prints them
            assert f"<td>{r['nmi']:.3f}</td>" in page and f"<td>{r['ari']:.3f}</td>" in page
