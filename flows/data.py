"""The `data` flow: fetch, validate, prepare (the same code as `dvc repro prepare`)."""

from __future__ import annotations

from prefect import flow

from tasks.data import validate
from tasks.stages import fetch, prepare


@flow(name="data", log_prints=False)
def data(root: str = ".", parent_run_id: str | None = None, force: bool = False) -> dict:
    """Fetch raw files, verify checksums, write the prepared store.

    Args:
        root: the project root (holds dvc.yaml and params.yaml).
        parent_run_id: MLflow parent run (set by the `pipeline` flow).
        force: re-run the stages even if DVC finds nothing changed.

    Returns:
        {"ran": stages DVC actually ran, "verified": files checked per dataset}.
    """
    ran = fetch(root, parent_run_id, force)
    verified = validate(root)
    ran += prepare(root, parent_run_id, force)
    return {"ran": ran, "verified": verified}


if __name__ == "__main__":
    data()
