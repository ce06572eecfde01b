"""Shared plumbing of the stage entries: argument parsing, logging, paths."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import metatransfer.algorithms  # noqa: F401  (registers the algorithm checks load_params runs: every stage validates them)
from metatransfer.config import Params, load_params
from metatransfer.io import write_json_atomic


def parse_args(stage: str, argv: list[str] | None) -> argparse.Namespace:
    """`--params PATH` (default params.yaml) for every stage entry."""
    parser = argparse.ArgumentParser(prog=f"python -m metatransfer.stages.{stage}", description=f"Run the `{stage}` stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def setup(stage: str, argv: list[str] | None) -> tuple[Params, Path]:
    """Parse args, configure logging, load and validate params. Returns (params, project root)."""
    args = parse_args(stage, argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {stage} %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    return params, Path(args.params).resolve().parent


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    write_json_atomic(path, data)


def merge_piece_metrics(params: Params, pieces: list[Path], stage: str, key: str,
                        take: Callable[[Path, Any, list[str]], None]) -> dict[str, Any]:
    """Read the metrics/<stage>.json of every piece of a fanned-out stage (`flows.pipeline --task-runner dask`;
    metatransfer/dvc_stages.py runs the pieces, each a project folder of its own).

    Args:
        params: the project's params (`<stage>.<key>` lists every name the pieces must cover).
        pieces: the piece folders (each a project folder whose params name some of those names).
        stage: "meta_train" or "finetune".
        key: the list the stage fans out over ("algorithms" or "targets").
        take: called once per piece with (piece folder, its Layout, the names it holds): moves the
            piece's files into the project's outputs.

    Returns:
        Every piece's entries, in the order of `<stage>.<key>` (the summary one run would write).

    Raises:
        ConfigError: a name of `<stage>.<key>` that no piece holds.
    """
    from metatransfer.errors import ConfigError
    from metatransfer.layout import Layout

    found: dict[str, Any] = {}
    for folder in pieces:
        part = Layout.of(folder, params)
        entries = json.loads(part.metrics(stage).read_text())
        found.update(entries)
        take(folder, part, list(entries))
    expected: list[str] = list(getattr(getattr(params, stage), key))
    missing = [n for n in expected if n not in found]
    if missing:
        raise ConfigError(f"{stage} pieces {[str(p) for p in pieces]} lack the {key} {missing}: "
                          f"run one piece per {key[:-1]} of {stage}.{key}")
    return {n: found[n] for n in expected}


def run_stage(stage: str, argv: list[str] | None, body) -> int:
    """Run a stage body `body(params, root)` as a command: 0 on success, 1 on an
    error meant for people (logged with its message, no traceback), 2 when the
    params file lacks the stage's section.

    Errors meant for people are the library's own (`MetatransferError`) and
    failures of the environment wherever they surface (a full disk, a tracking
    server refusing credentials or out of reach: `errors.environment_error`);
    anything else is a bug and keeps its traceback."""
    from metatransfer.errors import MetatransferError, environment_error

    try:
        from metatransfer.ownership import die_with_dvc

        die_with_dvc()  # a `dvc repro` killed with SIGKILL takes this stage along
        params, root = setup(stage, argv)
        if stage in ("episodes", "pretrain", "meta_train", "finetune", "evaluate") and getattr(params, stage) is None:
            logging.getLogger(stage).error("params.yaml has no `%s` section; add it (see the README)", stage)
            return 2
        from metatransfer import runtime

        # Threads, determinism and the load warning before any tensor work (params.yaml `runtime:`).
        runtime.apply(params)
        body(params, root)
        return 0
    except MetatransferError as exc:
        logging.getLogger(stage).error("%s", exc)
        return 1
    except Exception as exc:
        line = environment_error(exc)
        if line is None:
            raise
        logging.getLogger(stage).error("%s", line)
        return 1
