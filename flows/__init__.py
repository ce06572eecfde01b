"""Prefect flows: only task calls, ifs and loops."""

import os
from pathlib import Path
from typing import Any

# Keep Prefect's local state inside the project unless the user chose a home.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
import metatransfer  # noqa: E402,F401  (turns telemetry off before prefect is imported)


def run_owned(flow: Any, prog: str, argv: list[str] | None = None) -> int:
    """Command-line entry of a Prefect flow taking (root, force): `<prog> [--root DIR] [--force]`,
    run as the workspace's owner; a flow with a `task_runner` parameter also takes
    `--task-runner {local,dask} [--dask-address URL] [--dask-workers N] [--dask-threads-per-worker N]`.

    The workspace is claimed (metatransfer/ownership.py) *before* the flow starts, so
    every process the run starts, the ephemeral Prefect API server included, dies
    with this one, and a busy workspace is refused in one line, before Prefect starts.

    Returns:
        The exit status: 0, or 1 after an error meant for people (busy workspace, bad input).
    """
    import argparse
    import inspect
    import sys

    from metatransfer import ownership
    from metatransfer.errors import MetatransferError

    parser = argparse.ArgumentParser(prog=prog, description=(flow.description or "").split("\n")[0])
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--force", action="store_true", help="re-run stages even if DVC finds nothing changed")
    options = inspect.signature(flow.fn).parameters
    if "task_runner" in options:  # the `pipeline` flow: flows/fanout.py
        parser.add_argument("--task-runner", choices=["local", "dask"], default="local",
                            help="local: every stage in this process (default); dask: meta_train and finetune "
                                 "fan out on a Dask cluster")
        parser.add_argument("--dask-address", default="",
                            help="a running Dask scheduler (tcp://host:8786); default: start a local cluster")
        parser.add_argument("--dask-workers", type=int, default=2, help="local cluster worker processes (default: 2)")
        parser.add_argument("--dask-threads-per-worker", type=int, default=1,
                            help="threads per local cluster worker (default: 1)")
    args = parser.parse_args(argv)
    kwargs = {}
    if "task_runner" in options:
        kwargs = {"task_runner": args.task_runner, "dask_address": args.dask_address,
                  "dask_workers": args.dask_workers, "dask_threads_per_worker": args.dask_threads_per_worker}
    try:
        if kwargs:
            from flows.fanout import TaskRunnerChoice

            TaskRunnerChoice(args.task_runner, args.dask_address, args.dask_workers,
                             args.dask_threads_per_worker)  # a bad choice fails here, before Prefect starts
        with ownership.workspace(args.root):
            flow(root=args.root, force=args.force, **kwargs)
    except MetatransferError as exc:  # busy workspace, not a DVC project, a bad input: one line
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
