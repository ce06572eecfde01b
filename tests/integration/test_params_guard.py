"""A params typo stops `dvc repro` before DVC deletes any output (the
`check_params` stage every stage depends on), and a params edit alone
re-runs that check but no other stage."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import project_env

pytestmark = pytest.mark.slow

# Every output `dvc repro` writes (DVC outs, metrics, plots), files or folders.
OUTPUTS = ("data/raw", "data/prepared", "data/episodes", "data/checks", "models", "metrics", "plots",
           "reports/evaluate.md")


def _snapshot(project: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel in OUTPUTS:
        base = project / rel
        assert base.exists(), rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            out[f.relative_to(project).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project),
                          capture_output=True, text=True)


def test_params_typo_stops_repro_before_any_output_is_removed(dvc_project: Path) -> None:
    params_file = dvc_project / "params.yaml"
    good = params_file.read_bytes()
    before = _snapshot(dvc_project)
    assert any(k.startswith("models/meta/") for k in before) and "metrics/meta_train.json" in before
    params = yaml.safe_load(good)
    params["meta_train"]["stepz"] = 5
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        failed = _dvc(dvc_project, "repro")
        log = failed.stdout + failed.stderr
        assert failed.returncode != 0
        assert "check_params ERROR" in log and "meta_train: unknown key(s) ['stepz']" in log, log[-3000:]
        assert "Running stage 'meta_train'" not in log and "Running stage 'fetch'" not in log
        assert _snapshot(dvc_project) == before  # nothing deleted, nothing rewritten
        status = _dvc(dvc_project, "status").stdout
        assert "check_params:" in status  # still to run: the failed check recorded nothing
    finally:
        params_file.write_bytes(good)
    again = _dvc(dvc_project, "repro")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage" not in again.stdout
    assert _dvc(dvc_project, "status", "--json").stdout.strip() in ("{}", "")


def test_params_edit_reruns_only_the_check(dvc_project: Path) -> None:
    """The check's output has the same bytes for every valid params file, so it triggers nothing."""
    params_file = dvc_project / "params.yaml"
    good = params_file.read_bytes()
    params_file.write_bytes(good + b"# a comment changes params.yaml's hash, no stage's params\n")
    try:
        out = _dvc(dvc_project, "repro")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        ran = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
        assert ran == ["Running stage 'check_params':"]
        assert _dvc(dvc_project, "status", "--json").stdout.strip() in ("{}", "")
    finally:
        params_file.write_bytes(good)
        assert _dvc(dvc_project, "repro", "check_params").returncode == 0


def test_params_typo_stops_the_prefect_flow_before_any_output_is_removed(prefect_project: Path) -> None:
    """The flow's first task is `check_params`: the same guard as `dvc repro`."""
    params_file = prefect_project / "params.yaml"
    good = params_file.read_bytes()
    before = _snapshot(prefect_project)
    params = yaml.safe_load(good)
    params["finetune"]["lrr"] = 0.1
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=prefect_project,
                              env=project_env(prefect_project), capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "check_params ERROR" in log and "finetune: unknown key(s) ['lrr']" in log, log[-3000:]
        assert "Running stage 'fetch'" not in log and "Running stage 'finetune'" not in log
        assert _snapshot(prefect_project) == before
    finally:
        params_file.write_bytes(good)
    assert _dvc(prefect_project, "status", "--json").stdout.strip() in ("{}", "")
