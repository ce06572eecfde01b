"""Benchmark: 2,000 step-metric entries (2 metrics x 1,000 steps) into a fresh sqlite MLflow store:
one mlflow.log_metric call each (the old tracking.metric_sink) vs the batching
tracking.metric_sink() (log_batch at 1000 pending + close). Interleaved repetitions,
order reversed on odd ones; a fresh run per timing; only the ratio within this run is meant to be read."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from metatransfer import tracking

STEPS, REPS = 1000, int(sys.argv[1]) if len(sys.argv) > 1 else 2


def per_call() -> float:
    with mlflow.start_run() as run:
        t = time.perf_counter()
        for step in range(1, STEPS + 1):
            mlflow.log_metric("meta_train/loss", 1.0 / step, step=step)
            mlflow.log_metric("meta_train/query_acc", step / STEPS, step=step)
        wall = time.perf_counter() - t
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "meta_train/loss")) == STEPS
    return wall


def batched() -> float:
    with mlflow.start_run() as run:
        t = time.perf_counter()
        with tracking.metric_sink() as sink:
            for step in range(1, STEPS + 1):
                sink("meta_train/loss", 1.0 / step, step)
                sink("meta_train/query_acc", step / STEPS, step)
        wall = time.perf_counter() - t  # includes the writes on the bound and on close
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "meta_train/loss")) == STEPS
    return wall


def main() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    print("load average at start:", os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tracking.configure(Path(tmp))
        print(f"fresh store set-up: {time.perf_counter() - t:.1f} s")
        walls: dict[str, list[float]] = {"per_call": [], "batched": []}
        for rep in range(REPS):
            order = (per_call, batched) if rep % 2 == 0 else (batched, per_call)
            for fn in order:
                walls[fn.__name__].append(fn())
        for name, w in walls.items():
            med = statistics.median(w)
            print(f"{name:9s} 2000 entries: median {med:.3f} s ({1e3 * med / (2 * STEPS):.3f} ms/entry), all {[round(x, 3) for x in w]}")
        print(f"per-call / batched: {statistics.median(walls['per_call']) / statistics.median(walls['batched']):.1f}x")
    print("load average at end:", os.getloadavg())


if __name__ == "__main__":
    main()
