"""Run identity: which code, data and settings produced a run.

One builder, `identify`, for what every MLflow run (`tracking.standard_tags`),
every registered model version (`registry.provenance_tags`) and the HTML
report (`report.run_facts`) say about where a result came from:

- git_commit: HEAD's hash, "+dirty" when tracked files changed ("" outside git);
- dvc_lock_sha256: SHA-256 of dvc.lock, a compact id of the data + code state;
- data_version: the md5 DVC recorded in dvc.lock for the prepared store
  (`params.data.prepared_dir`);
- params_sha256: SHA-256 of params.yaml.

A leaf module (the standard library and PyYAML only), so the tracking,
registry and report layers can all use it.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"
LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class RunIdentity:
    """Which code, data and settings a run used (empty strings where git or DVC have nothing)."""

    git_commit: str
    dvc_lock_sha256: str
    data_version: str
    params_sha256: str

    def run_tags(self) -> dict[str, str]:
        """The tags every MLflow run carries: git commit, dvc.lock digest, prepared-data version."""
        return {"git_commit": self.git_commit, "dvc_lock_sha256": self.dvc_lock_sha256,
                "data_version": self.data_version}

    def version_tags(self) -> dict[str, str]:
        """The tags every registered model version carries: data version, git commit, params digest."""
        return {"data_version": self.data_version, "git_commit": self.git_commit,
                "params_sha256": self.params_sha256}


def identify(root: str | Path = ".", prepared_dir: str | Path | None = None) -> RunIdentity:
    """The identity of the project state at `root` now.

    Args:
        root: the project root (holds params.yaml, dvc.lock and the git work tree).
        prepared_dir: `params.data.prepared_dir` when the caller has loaded params;
            None reads it from `root`/params.yaml (`prepared_key`).

    Returns:
        The RunIdentity.
    """
    key = str(prepared_dir) if prepared_dir is not None else prepared_key(root)
    return RunIdentity(git_commit=git_commit(root), dvc_lock_sha256=lock_digest(root),
                       data_version=dvc_out_md5(root, key) if key else "", params_sha256=params_digest(root))


def prepared_key(root: str | Path = ".") -> str:
    """`data.prepared_dir` of `root`/params.yaml as written there (and so in dvc.lock).

    "" (no data version) when the file, the key or valid YAML is missing:
    identity is informative and must never stop a run; `check_params` is what
    refuses a bad params file.
    """
    path = Path(root) / PARAMS_FILE
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None
    data = raw.get("data") if isinstance(raw, dict) else None
    value = data.get("prepared_dir") if isinstance(data, dict) else None
    return value if isinstance(value, str) else ""


def git_commit(root: str | Path = ".") -> str:
    """HEAD's commit hash, with '+dirty' when tracked files changed; '' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def lock_digest(root: str | Path = ".") -> str:
    """SHA-256 of dvc.lock (a compact id of the data + code state), or "" when absent."""
    path = Path(root) / LOCK_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def params_digest(root: str | Path = ".") -> str:
    """SHA-256 of the project's params.yaml ('' when absent)."""
    path = Path(root) / PARAMS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def dvc_out_md5(root: str | Path, out_path: str) -> str:
    """The md5 DVC recorded in dvc.lock for an output path ('' when not recorded)."""
    lock = Path(root) / LOCK_FILE
    if not lock.is_file():
        return ""
    data = yaml.safe_load(lock.read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == out_path:
                return str(out.get("md5", ""))
    return ""
