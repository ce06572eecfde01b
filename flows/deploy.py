"""A scheduled deployment of the `pipeline` flow, served by this process or run by work-pool workers.

    prefect server start --host 127.0.0.1 --port 4200          # one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api          # every other terminal
    python -m flows.deploy --name nightly --cron "0 3 * * *"  # creates the deployment and serves it
    python -m flows.deploy --name nightly --pool local        # or: creates it in a work pool, returns
    prefect worker start --pool local                         # a worker (here or elsewhere) runs it

Without `--pool` (the default), `flow.serve` registers the deployment
`pipeline/<name>` with its cron schedule and parameters on the server, then
polls it and runs scheduled (or manually triggered: `prefect deployment run
pipeline/<name>`) flow runs in subprocesses until stopped (Ctrl-C pauses the
schedule).

With `--pool NAME`, the process work pool NAME is created if missing and
`flow.deploy` registers the same deployment in it, then this process exits;
any `prefect worker start --pool NAME` whose machine has the package
installed and the project at the same path runs the flow runs, in the project
folder (the `working_dir` job variable).

The deployment parameters are `root` (always, absolute), and `params` and
`targets` when given (`--params FILE`, `--target T` repeated): see the
`pipeline` flow. A run can override them: `prefect deployment run
pipeline/<name> --param targets='["t"]'`.
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
                                     description="Create a cron-scheduled deployment of the `pipeline` flow and serve it, "
                                                 "or with --pool put it in a process work pool for `prefect worker start` "
                                                 "(needs PREFECT_API_URL pointing at a running `prefect server start`).")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default: {DEFAULT_NAME})")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: UTC)")
    parser.add_argument("--root", default=".", help="project root passed to the flow (default: .)")
    parser.add_argument("--paused", action="store_true", help="create the schedule paused")
    parser.add_argument("--params", default=None,
                        help="params file (relative to --root) each run copies over params.yaml (default: keep it)")
    parser.add_argument("--target", dest="targets", action="append", default=None,
                        help="a target the runs promote (repeat; default: every finetune target)")
    parser.add_argument("--pool", "--work-pool", dest="pool", default=None,
                        help="deploy to this process work pool (created if missing) for `prefect worker start "
                             "--pool NAME`, and return, instead of serving from this process")
    return parser


def flow_parameters(project: Path, params: str | None = None, targets: list[str] | None = None) -> dict:
    """The deployment's parameters of the `pipeline` flow: root, and params/targets when given."""
    parameters: dict = {"root": str(project)}
    if params is not None:
        parameters["params"] = params
    if targets is not None:
        parameters["targets"] = list(targets)
    return parameters


def project_root(root: str) -> Path:
    """`root` resolved; exits naming the missing dvc.yaml if it is not a project."""
    project = Path(root).resolve()
    if not (project / "dvc.yaml").is_file():
        raise SystemExit(f"flows.deploy: {project / 'dvc.yaml'} not found; pass the project root with --root")
    return project


def ensure_process_pool(pool: str) -> bool:
    """Create the process work pool `pool` if it does not exist. Returns True if it was created.

    Exits if a pool of that name exists with another type (its workers would not run a local process).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
    if found.type != ProcessWorker.type:
        raise SystemExit(f"flows.deploy: work pool {pool!r} has type {found.type!r}, expected 'process'; "
                         f"pass another --pool name or delete it (`prefect work-pool delete {pool}`)")
    return False


def deploy_to_pool(pool: str, name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, root: str = ".",
                   timezone: str = "UTC", paused: bool = False, params: str | None = None,
                   targets: list[str] | None = None) -> str:
    """Create (or update) the deployment `pipeline/<name>` in the process work pool `pool` and return.

    The pool is created if missing. Flow runs start where a `prefect worker start --pool <pool>`
    runs: in the project folder (job variable `working_dir`), from the module entrypoint
    `flows.pipeline.pipeline` of the installed package.

    Returns:
        The deployment id.
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    project = project_root(root)
    ensure_process_pool(pool)
    deployment_id = pipeline.deploy(
        name=name,
        work_pool_name=pool,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=flow_parameters(project, params, targets),
        # DVC resolves a stage name against the dvc.yaml of the current folder.
        job_variables={"working_dir": str(project)},
        paused=paused,
        description=f"metatransfer pipeline on {project} ({cron}, {timezone})",
        tags=["metatransfer"],
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_next_steps=False,
        ignore_warnings=True,  # the "use .serve for local development" hint
    )
    return str(deployment_id)


def deploy(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, root: str = ".", timezone: str = "UTC",
           paused: bool = False, params: str | None = None, targets: list[str] | None = None) -> None:
    """Create (or update) the deployment `pipeline/<name>` and serve it until interrupted.

    Args:
        name: deployment name.
        cron: cron schedule string.
        root: project root: stored (absolute) as the deployment's `root` parameter, and
            the folder this process serves from (flow runs start in it).
        timezone: time zone the cron string is read in.
        paused: create the schedule paused (runs only when triggered).
        params, targets: the flow's `params` and `targets` parameters (omitted when None).
    """
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    project = project_root(root)
    # Flow runs start in this process's folder, and DVC resolves a stage name
    # against the dvc.yaml of the current folder: serve from the project root.
    os.chdir(project)
    pipeline.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=flow_parameters(project, params, targets),
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
    """Entry: `python -m flows.deploy [--name N] [--cron C] [--root DIR] [--pool P]`. Returns 1 without a server."""
    args = build_parser().parse_args(argv)
    if not api_url():
        # Without a server Prefect would start a temporary one that vanishes with
        # this process, taking the deployment and its schedule with it.
        print("flows.deploy: no Prefect server configured. Start one with `prefect server start --host 127.0.0.1 "
              "--port 4200` and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 1
    if args.pool is None:
        deploy(args.name, args.cron, args.root, args.timezone, args.paused, args.params, args.targets)
        return 0
    deployment_id = deploy_to_pool(args.pool, args.name, args.cron, args.root, args.timezone, args.paused,
                                   args.params, args.targets)
    print(f"deployment pipeline/{args.name} ({deployment_id}) in work pool {args.pool!r}; "
          f"run it with `prefect worker start --pool {args.pool}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
