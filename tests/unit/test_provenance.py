"""Run identity (`metatransfer.provenance`): one builder behind the MLflow run tags, the registered
versions' tags and the report's run facts; the data version follows `params.data.prepared_dir`."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

from metatransfer import provenance, registry, tracking
from metatransfer.report.inputs import run_facts

ROOT = Path(__file__).resolve().parents[2]
MD5 = "0123456789abcdef0123456789abcdef.dir"


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project outside git whose prepared store is not the default folder."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["prepared_dir"] = "store/prepared"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "prepare": {"cmd": "python -m metatransfer.stages.prepare",
                    "outs": [{"path": "store/prepared", "md5": MD5}, {"path": "data/prepared", "md5": "stale"}]}}}))
    return tmp_path


def test_identity_reads_the_prepared_folder_of_the_params(project: Path) -> None:
    ident = provenance.identify(project)
    assert ident.data_version == MD5  # not the md5 of data/prepared, which this project does not use
    assert ident.dvc_lock_sha256 == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert ident.params_sha256 == hashlib.sha256((project / "params.yaml").read_bytes()).hexdigest()
    assert provenance.identify(project, "data/prepared").data_version == "stale"  # a caller's params win


def test_one_identity_behind_run_tags_version_tags_and_report(project: Path) -> None:
    ident = provenance.identify(project)
    assert tracking.standard_tags(project) == {
        "git_commit": ident.git_commit, "dvc_lock_sha256": ident.dvc_lock_sha256, "data_version": MD5}
    assert registry.provenance_tags(project) == {
        "data_version": MD5, "git_commit": ident.git_commit, "params_sha256": ident.params_sha256}
    facts = run_facts(project, None)
    assert (facts.git_commit, facts.dvc_lock_sha256, facts.data_version) == (
        ident.git_commit, ident.dvc_lock_sha256, MD5)


def test_missing_or_broken_files_give_empty_facts_not_errors(tmp_path: Path) -> None:
    empty = provenance.identify(tmp_path)
    assert (empty.dvc_lock_sha256, empty.data_version, empty.params_sha256) == ("", "", "")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    assert provenance.prepared_key(tmp_path) == ""
    (tmp_path / "params.yaml").write_text("data:\n  prepared_dir: data/prepared\n")
    assert provenance.prepared_key(tmp_path) == "data/prepared"
    assert provenance.identify(tmp_path).data_version == ""  # no dvc.lock


def test_the_repository_commit_is_head_marked_dirty_when_tracked_files_changed() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert provenance.git_commit(ROOT) == head.stdout.strip() + ("+dirty" if dirty else "")
    assert len(provenance.lock_digest(ROOT)) == 64
