"""`image_folders` stages: one manifest per `prepare.image_folders` entry, so
that DVC re-runs `prepare` when a user's folder changes.

`prepare` reads these folders, but they are not DVC outputs, and a stage's
dependency list cannot name folders that only params.yaml knows. dvc.yaml
therefore generates one stage per entry (`foreach: ${prepare.image_folders}`,
named `image_folders@<name>`) whose dependency is the folder itself; DVC runs
it when a file in the folder is added, removed or edited. It writes
`data/checks/image_folders/<name>.json`: every file's relative path, size and
SHA-256, in path order. `prepare` depends on `data/checks`, so it re-runs
exactly when a manifest's content changes (touching a file without changing
it re-runs this stage, not `prepare`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from metatransfer.config import Params
from metatransfer.errors import ConfigError
from metatransfer.io import sha256_file, write_text_atomic
from metatransfer.layout import Layout

log = logging.getLogger(__name__)


def folder_manifest(folder: Path) -> list[list[Any]]:
    """Every entry under `folder`, sorted by relative path.

    Files (and links to files, by their content) give ``[path, size, sha256]``;
    links to folders (not followed) and broken links give ``[path, "link", target]``.

    Args:
        folder: an existing folder.

    Returns:
        The rows, paths relative to `folder` with "/" separators.
    """
    rows: list[list[Any]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() and not path.is_file():
                rows.append([rel, "link", os.readlink(path)])
            elif name in filenames:
                rows.append([rel, path.stat().st_size, sha256_file(path)])
    return sorted(rows, key=lambda r: r[0])


def write_manifest(name: str, rows: list[list[Any]], path: Path) -> None:
    """Write the manifest as JSON, one row per line, atomically."""
    body = ",\n".join("    " + json.dumps(r) for r in rows)
    text = f'{{\n  "dataset": {json.dumps(name)},\n  "files": [\n{body}\n  ]\n}}\n' if rows else \
        f'{{\n  "dataset": {json.dumps(name)},\n  "files": []\n}}\n'
    write_text_atomic(path, text)


def run(name: str, params: Params, root: Path) -> Path:
    """Write the manifest of the image folder `name`.

    Returns:
        The manifest's path.

    Raises:
        ConfigError: `name` is not a key of prepare.image_folders, or its path is not a folder.
    """
    from metatransfer.stages.check_params import check_paths

    if name not in params.prepare.image_folders:
        raise ConfigError(f"params.yaml: prepare.image_folders has no entry {name!r} "
                          f"(entries: {sorted(params.prepare.image_folders)})")
    check_paths(params, root)
    folder = Path(params.prepare.image_folders[name].path)
    folder = folder if folder.is_absolute() else root / folder
    rows = folder_manifest(folder)
    out = Layout.of(root, params).manifest(name)
    write_manifest(name, rows, out)
    log.info("%s: %d entries in %s -> %s", name, len(rows), folder, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.image_folders NAME [--params params.yaml]`.

    Returns:
        0 on success, 1 on a config error (one log line, no traceback).
    """
    from metatransfer.stages.common import run_stage

    parser = argparse.ArgumentParser(prog="python -m metatransfer.stages.image_folders",
                                     description="Write the manifest of one prepare.image_folders entry.")
    parser.add_argument("name", help="a key of prepare.image_folders")
    args, rest = parser.parse_known_args(argv)
    return run_stage("image_folders", rest, lambda params, root: run(args.name, params, root))


if __name__ == "__main__":
    sys.exit(main())
