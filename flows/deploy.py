"""A scheduled deployment of the `pipeline` flow.

    prefect server start --host 127.0.0.1 --port 4200          # one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api          # every other terminal
    python -m flows.deploy --name nightly --cron "0 3 * * *"  # creates the deployment and serves it

`flow.serve` registers the deployment `pipeline/<name>` with its cron
schedule and parameters on the server, then polls it and runs scheduled (or
manually triggered: `prefect deployment run pipeline/<name>`) flow runs in
subprocesses until stopped (Ctrl-C pauses the schedule).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.pipeline import pipeline

DEFAULT_NAME = "scheduled"
DEFAULT_CRON = "0 3 * * *"  # daily at 03:00 (in --timezone)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m flows.deploy`."""
    parser = argparse.ArgumentParser(prog="python -m flows.deploy",
                                     description="Create a cron-scheduled deployment of the `pipeline` flow and serve it "
                                                 "(needs PREFECT_API_URL pointing at a running `prefect server start`).")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: UTC)")
    parser.add_argument("--root", default=".", help="project root passed to the flow (default: .)")
    parser.add_argument("--paused", action="store_true", help="create the schedule paused")
    return parser


def deploy(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, root: str = ".", timezone: str = "UTC",
           paused: bool = False) -> None:
    """Create (or update) the deployment `pipeline/<name>` and serve it until interrupted.

    Args:
        name: deployment name.
        cron: cron schedule string.
        root: project root: stored (absolute) as the deployment's `root` parameter, and
            the folder this process serves from (flow runs start in it).
        timezone: time zone the cron string is read in.
        paused: create the schedule paused (runs only when triggered).
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    project = Path(root).resolve()
    if not (project / "dvc.yaml").is_file():
        raise SystemExit(f"flows.deploy: {project / 'dvc.yaml'} not found; pass the project root with --root")
    # Flow runs start in this process's folder, and DVC resolves a stage name
    # against the dvc.yaml of the current folder: serve from the project root.
    os.chdir(project)
    pipeline.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"root": str(project)},
        paused=paused,
        description=f"metatransfer pipeline on {project} ({cron}, {timezone})",
        tags=["metatransfer"],
        # "flows.pipeline.pipeline" imports from the installed package wherever the
        # run starts; a file path would be relative to this process's folder.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def api_url() -> str | None:
    """The Prefect API this process talks to ($PREFECT_API_URL or the active profile), or None."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m flows.deploy [--name N] [--cron C] [--root DIR]`. Returns 1 without a server."""
    args = build_parser().parse_args(argv)
    if not api_url():
        # Without a server Prefect would start a temporary one that vanishes with
        # this process, taking the deployment and its schedule with it.
        print("flows.deploy: no Prefect server configured. Start one with `prefect server start --host 127.0.0.1 "
              "--port 4200` and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 1
    deploy(args.name, args.cron, args.root, args.timezone, args.paused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
