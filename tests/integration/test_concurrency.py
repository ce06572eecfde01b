"""Eight processes log to one new sqlite MLflow store at the same moment, with
the meta_train stage's logging pattern (stage run, child run, params, a metric
per step): no "database is locked", no failed schema set-up, no lost row."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROCESSES = 8
STEPS = 60
PARAMS = 20
WORKER = """
import os, sys, time
from pathlib import Path
from metatransfer import tracking  # import first: the race starts at the same moment for all
root, index, steps, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
(go.parent / f"ready{index}").touch()  # the barrier: imports done, waiting for the others
while not go.exists():
    time.sleep(0.01)
with tracking.stage_run("meta_train", root, {f"p{j}": j for j in range(%d)}):
    with tracking.child_run(f"meta_train/worker{index}", tags={"worker": str(index)}):
        with tracking.metric_sink(max_entries=50) as sink:  # 120 entries: two writes at the bound, one on close
            for step in range(1, steps + 1):
                sink("meta_train/loss", 1.0 / step, step)
                sink("meta_train/query_acc", index + step / 1000, step)
        tracking.log_metrics({"val/best_acc": index / 10})
print("DONE", index)
""" % PARAMS


def test_eight_writers_on_a_new_store_lose_nothing(tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("METATRANSFER_PARENT_RUN_ID", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(i), str(STEPS), str(go)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(PROCESSES)
    ]
    # Barrier: release all writers together only once every one has imported,
    # however slow the machine, so the race on the new store is always exercised.
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(PROCESSES)):
        assert all(p.poll() is None for p in procs), "a worker died before the barrier"
        assert time.monotonic() < deadline, "workers did not reach the barrier in 240 s"
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"DONE {i}" in out, err[-3000:]
        assert "database is locked" not in err

    con = sqlite3.connect(tmp_path / "mlflow.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        per_metric = dict(con.execute("SELECT key, COUNT(*) FROM metrics GROUP BY key").fetchall())
        assert per_metric == {"meta_train/loss": PROCESSES * STEPS, "meta_train/query_acc": PROCESSES * STEPS,
                              "val/best_acc": PROCESSES}
        # Every worker's steps are all there, once each.
        rows = con.execute(
            "SELECT t.value, COUNT(DISTINCT m.step), COUNT(*) FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
            "WHERE t.key = 'worker' AND m.key = 'meta_train/query_acc' GROUP BY t.value"
        ).fetchall()
        assert sorted(rows) == [(str(i), STEPS, STEPS) for i in range(PROCESSES)]
        assert con.execute("SELECT COUNT(*) FROM params").fetchone()[0] == PROCESSES * PARAMS
        assert con.execute("SELECT COUNT(*) FROM experiments WHERE name = 'metatransfer'").fetchone()[0] == 1
        statuses = con.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall()
        assert statuses == [("FINISHED", 2 * PROCESSES)]
    finally:
        con.close()
