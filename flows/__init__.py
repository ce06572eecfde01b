"""Prefect flows: only task calls, ifs and loops."""

import os
from pathlib import Path
from typing import Any

# Keep Prefect's local state inside the project unless the user chose a home.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
import metatransfer  # noqa: E402,F401  (turns telemetry off before prefect is imported)


def run_owned(flow: Any, prog: str, argv: list[str] | None = None) -> int:
    """Command-line entry of a Prefect flow taking (root, force): `<prog> [--root DIR] [--force]`,
    run as the workspace's owner.

    The workspace is claimed (metatransfer/ownership.py) *before* the flow starts, so
    every process the run starts, the ephemeral Prefect API server included, dies
    with this one, and a busy workspace is refused in one line, before Prefect starts.

    Returns:
        The exit status: 0, or 1 after an error meant for people (busy workspace, bad input).
    """
    import argparse
    import sys

    from metatransfer import ownership
    from metatransfer.errors import MetatransferError

    parser = argparse.ArgumentParser(prog=prog, description=(flow.description or "").split("\n")[0])
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--force", action="store_true", help="re-run stages even if DVC finds nothing changed")
    args = parser.parse_args(argv)
    try:
        with ownership.workspace(args.root):
            flow(root=args.root, force=args.force)
    except MetatransferError as exc:  # busy workspace, not a DVC project, a bad input: one line
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
