"""`check_params` stage: params.yaml is validated before any other stage runs.

DVC deletes a stage's outputs right before it runs the stage's command, so a
stage that refuses a typo (`meta_train.stepz: 5`) has already lost
`models/meta` and the git-tracked metrics and plots. Every stage depends on
this stage's output: `dvc repro` (with or without a target) runs this stage
first and stops at its error, and the Prefect flow runs it as its first task;
nothing has been removed by then.

The output, `data/checks/params.ok`, has the same bytes after every
successful check, so a params edit re-runs this check but no other stage
(each re-runs on its own `params:` keys, as before). The stage also checks
what needs the project folder (every `prepare.image_folders` path is a
folder) and removes the manifests of image folders no longer in params (see
`metatransfer.stages.image_folders`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import metatransfer.algorithms  # noqa: F401  (registers the algorithm checks that load_params runs)
from metatransfer.config import Params
from metatransfer.errors import ConfigError
from metatransfer.io import write_text_atomic
from metatransfer.layout import MANIFEST_DIR, PARAMS_OK, Layout  # noqa: F401  (MANIFEST_DIR: for callers)

log = logging.getLogger(__name__)

OUT = PARAMS_OK  # relative to the project root (metatransfer.layout); the name stays for callers
# Constant: downstream stages depend on these bytes, not on params.yaml.
CONTENT = "params.yaml passed validation (metatransfer/config/, metatransfer/stages/check_params.py)\n"


def check_paths(params: Params, root: Path, source: str = "params.yaml") -> None:
    """Checks of params that need the project folder.

    Args:
        params: validated params.
        root: the project root (relative image folder paths are relative to it).
        source: the params file name, for messages.

    Raises:
        ConfigError: an image folder path that is not a folder, naming the key and the resolved path.
    """
    for name, folder in params.prepare.image_folders.items():
        path = Path(folder.path)
        resolved = path if path.is_absolute() else root / path
        if not resolved.is_dir():
            what = "is not a folder" if resolved.exists() else "does not exist"
            raise ConfigError(
                f"{source}: prepare.image_folders.{name}.path: {folder.path!r} {what} ({resolved}; a relative path "
                f"is relative to the project root). Fix the key in {source} and re-run.")


def remove_stale_manifests(params: Params, root: Path) -> list[Path]:
    """Delete `data/checks/image_folders/<name>.json` of names no longer in `prepare.image_folders`.

    `prepare` depends on the whole `data/checks` folder, so a manifest left by
    a removed entry would stay part of its inputs.

    Returns:
        The files removed.
    """
    folder = Layout.of(root, params).manifest_dir
    stale = [p for p in sorted(folder.glob("*.json")) if p.stem not in params.prepare.image_folders] \
        if folder.is_dir() else []
    for path in stale:
        path.unlink()
        log.info("removed %s: %r is no longer in prepare.image_folders", path, path.stem)
    return stale


def write_marker(path: Path) -> None:
    """Write CONTENT to `path` atomically (DVC may hold a link to the old file in its cache)."""
    write_text_atomic(path, CONTENT)


def run(params: Params, root: Path) -> None:
    """Check what needs the project folder, drop stale manifests, write the marker."""
    check_paths(params, root)
    remove_stale_manifests(params, root)
    write_marker(Layout.of(root, params).params_ok)
    log.info("params.yaml is valid")


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.check_params [--params params.yaml]`.

    Returns:
        0 when params are valid, 1 otherwise (one log line naming the key; no traceback).
    """
    from metatransfer.stages.common import run_stage

    return run_stage("check_params", argv, run)


if __name__ == "__main__":
    sys.exit(main())
