"""What a stage records on its active MLflow run (params, metrics, tags, artifacts, datasets), and
reports/run_facts.json, the run-specific facts kept out of DVC's outputs."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from metatransfer import layout
from metatransfer.io import write_json_atomic

# Run-specific facts of the latest stage runs (MLflow run ids, model URIs,
# registered versions, wall seconds): they change on every run, so they live
# here and in MLflow, never in a DVC output (whose bytes must not churn).
RUN_FACTS_PATH = layout.RUN_FACTS


def log_params(params: dict[str, Any]) -> None:
    """Log flattened params (values stringified, MLflow's 6000-char limit respected)."""
    import mlflow

    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def metric_sink():
    """A (name, value, step) callback that logs to the active run, batching nothing."""
    import mlflow

    def sink(name: str, value: float, step: int) -> None:
        mlflow.log_metric(name, float(value), step=int(step))

    return sink


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log several metrics at once to the active run."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Set tags on the active run (values stringified; MLflow's 5000-char limit respected)."""
    import mlflow

    mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file or folder to the active run."""
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dataset(name: str, path: str, digest: str, context: str) -> None:
    """Log a DVC-tracked input as an MLflow dataset whose digest is its DVC md5."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=(digest or "unknown")[:36]), context=context)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """Attach a JSON document to the active run."""
    import mlflow

    mlflow.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


def record_run_facts(root: str | Path, stage: str, facts: dict[str, Any]) -> Path:
    """Merge `facts` into the `stage` entry of reports/run_facts.json (not a DVC output).

    Args:
        root: project root.
        stage: the stage name (top-level key).
        facts: JSON-able run-specific facts; keys replace the stage's old ones.

    Returns:
        The file's path.
    """
    path = Path(root) / RUN_FACTS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:  # stages of parallel runs may write at once
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            data = read_run_facts(root)
            data[stage] = {**(data.get(stage) or {}), **facts}
            write_json_atomic(path, data)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return path


def read_run_facts(root: str | Path) -> dict[str, Any]:
    """reports/run_facts.json as a dict ({} when missing or damaged: it is informative only)."""
    path = Path(root) / RUN_FACTS_PATH
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}
