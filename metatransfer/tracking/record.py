"""What a stage records on its active MLflow run (params, metrics, tags, artifacts, datasets), and
reports/run_facts.json, the run-specific facts kept out of DVC's outputs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock

from metatransfer import layout
from metatransfer.io import write_json_atomic

log = logging.getLogger(__name__)

# Run-specific facts of the latest stage runs (MLflow run ids, model URIs,
# registered versions, wall seconds): they change on every run, so they live
# here and in MLflow, never in a DVC output (whose bytes must not churn).
RUN_FACTS_PATH = layout.RUN_FACTS


def log_params(params: dict[str, Any]) -> None:
    """Log flattened params (values stringified, MLflow's 6000-char limit respected)."""
    import mlflow

    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


# MLflow refuses a log_batch request of more metrics than this (mlflow.utils.validation.MAX_METRICS_PER_BATCH).
MAX_METRICS_PER_BATCH = 1000


class MetricBatch:
    """A `(name, value, step)` metric sink that writes to one MLflow run in batches.

    A `log_metric` call is one store transaction (≈ 6 ms on sqlite, benchmarks/RESULTS.md
    section 9); one `log_batch` of up to 1000 metrics costs about as much. Entries are
    buffered, each with the time it was produced as its timestamp, and written when
    `max_entries` are pending, when `max_seconds` have passed since the last write (so
    the UI follows a long run and a SIGKILL loses at most that much), and on `close`.
    Use it as a context manager: the buffer is written on the way out even when the
    body raised, so a failed training run keeps the metrics it logged.
    """

    def __init__(self, run_id: str, max_entries: int = MAX_METRICS_PER_BATCH, max_seconds: float = 5.0) -> None:
        """Args:
            run_id: the MLflow run every entry goes to.
            max_entries: write when this many entries are pending (1..1000; 1 writes every entry at once).
            max_seconds: write at the first entry this long after the last write.
        """
        from mlflow import MlflowClient

        if not 1 <= max_entries <= MAX_METRICS_PER_BATCH:
            raise ValueError(f"metric sink: max_entries must be 1..{MAX_METRICS_PER_BATCH} (MLflow's "
                             f"log_batch limit), found {max_entries}")
        if not max_seconds > 0:
            raise ValueError(f"metric sink: max_seconds must be > 0, found {max_seconds}")
        self.run_id, self.max_entries, self.max_seconds = run_id, max_entries, max_seconds
        self._client = MlflowClient()
        self._pending: list[tuple[str, float, int, int]] = []  # (name, value, timestamp ms, step)
        self._last_write = time.monotonic()
        self._closed = False

    def __call__(self, name: str, value: float, step: int) -> None:
        """Buffer one metric value at `step` (written at the bound, after max_seconds, or on close)."""
        if self._closed:
            raise RuntimeError(f"metric {name!r} at step {step}: the metric sink of run {self.run_id} is closed; "
                               "log through a sink opened with `with tracking.metric_sink() as sink:`")
        self._pending.append((name, float(value), time.time_ns() // 1_000_000, int(step)))
        if len(self._pending) >= self.max_entries or time.monotonic() - self._last_write >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries to the run in one `log_batch` (none: no call)."""
        from mlflow.entities import Metric

        # Taken off first: if the write fails, the error propagates once and the entries are not written twice.
        pending, self._pending = self._pending, []
        self._last_write = time.monotonic()
        if pending:
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in pending])

    def close(self) -> None:
        """Write what is pending; later entries are refused."""
        self._closed = True
        self.flush()

    def __enter__(self) -> MetricBatch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # the body's exception is the one to report: a failed write must not replace it
            self.close()
        except Exception as write_error:  # noqa: BLE001
            log.warning("metric sink of run %s: the last metrics could not be written (%s) while %s propagates",
                        self.run_id, write_error, type(exc).__name__)


def metric_sink(max_entries: int = MAX_METRICS_PER_BATCH, max_seconds: float = 5.0) -> MetricBatch:
    """A batching `(name, value, step)` metric sink for the active MLflow run (see `MetricBatch`).

    Close it (`with tracking.metric_sink() as sink:`) or entries still pending are lost.

    Args:
        max_entries: write when this many entries are pending (1..1000).
        max_seconds: write at the first entry this long after the last write.

    Returns:
        The sink, bound to the run active now.

    Raises:
        RuntimeError: no MLflow run is active.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("tracking.metric_sink(): no MLflow run is active; open one first "
                           "(`with tracking.stage_run(...)` or `tracking.child_run(...)`)")
    return MetricBatch(run.info.run_id, max_entries, max_seconds)


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
    with FileLock(path.with_name(path.name + ".lock")):  # stages of parallel runs may write at once
        data = read_run_facts(root)
        data[stage] = {**(data.get(stage) or {}), **facts}
        write_json_atomic(path, data)
    return path


def read_run_facts(root: str | Path) -> dict[str, Any]:
    """reports/run_facts.json as a dict ({} when missing or damaged: it is informative only)."""
    path = Path(root) / RUN_FACTS_PATH
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}
