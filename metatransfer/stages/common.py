"""Shared plumbing of the stage entries: argument parsing, logging, paths."""

from __future__ import annotations

import argparse
import logging
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
