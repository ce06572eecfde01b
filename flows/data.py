"""The `data` flow: check_params, fetch, validate, image_folders, prepare (the same code as `dvc repro prepare`).

    python -m flows.data [--root DIR] [--force]
"""

from __future__ import annotations

import sys

from prefect import flow

from flows import run_owned
from tasks.data import validate
from tasks.stages import check_params, fetch, image_folders, prepare
from tasks.workspace import claim_workspace, release_workspace


@flow(name="data", log_prints=False)
def data(root: str = ".", parent_run_id: str | None = None, force: bool = False) -> dict:
    """Check params, fetch raw files, verify checksums, write the prepared store.

    Args:
        root: the project root (holds dvc.yaml and params.yaml).
        parent_run_id: MLflow parent run (set by the `pipeline` flow).
        force: re-run the stages even if DVC finds nothing changed.

    Returns:
        {"ran": stages DVC actually ran, "verified": files checked per dataset}.
    """
    claim_workspace(root)  # re-entrant: inside `pipeline` this process holds it already
    try:
        # First: a params typo stops the flow before any stage (and DVC) removes an output.
        ran = check_params(root, parent_run_id, force)
        ran += fetch(root, parent_run_id, force)
        verified = validate(root)
        ran += image_folders(root, parent_run_id, force)
        ran += prepare(root, parent_run_id, force)
        return {"ran": ran, "verified": verified}
    finally:
        release_workspace(root)


if __name__ == "__main__":
    sys.exit(run_owned(data, "python -m flows.data"))
