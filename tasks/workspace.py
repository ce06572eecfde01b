"""Prefect tasks that make a flow run own its workspace and the processes it starts."""

from __future__ import annotations

from prefect import task

from metatransfer import ownership


@task(name="claim_workspace")
def claim_workspace(root: str) -> None:
    """Hold the workspace (DVC's repo lock) for this flow run and guard its child processes.

    Raises:
        WorkspaceBusy: another pipeline or `dvc repro` runs in `root` (the message names its pid).
    """
    ownership.claim(root)


@task(name="release_workspace")
def release_workspace(root: str) -> None:
    """Give the workspace back (the last release stops the child guard and frees the lock)."""
    ownership.release(root)
