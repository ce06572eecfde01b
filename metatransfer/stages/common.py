"""Shared plumbing of the stage entries: argument parsing, logging, paths."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from metatransfer.config import Params, load_params


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_stage(stage: str, argv: list[str] | None, body) -> int:
    """Run a stage body `body(params, root)` as a command: 0 on success, 1 on an
    error meant for people (logged with its message, no traceback), 2 when the
    params file lacks the stage's section."""
    from metatransfer.errors import MetatransferError

    try:
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
