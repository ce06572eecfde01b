"""tracking.metric_sink: the batching step-metric sink, on a real sqlite MLflow store.

Every entry arrives with its exact (name, value, step); a write happens at the
bound and not before; what was buffered when the body raised is still written."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from metatransfer import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh sqlite store (never the project's), made once: its schema takes seconds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(tracking.PARENT_ENV, raising=False)
        root = tmp_path_factory.mktemp("mlflow")
        tracking.configure(root)
        yield root


@pytest.fixture
def client(store: Path) -> Iterator[object]:
    """An MlflowClient on the test store; every test logs to runs of its own."""
    import mlflow

    tracking.configure(store)  # again: another module's test may have pointed MLflow elsewhere
    yield mlflow.MlflowClient()
    while mlflow.active_run() is not None:  # a failed test must not leave its run active for the next
        mlflow.end_run()


def history(client, run_id: str, name: str) -> list[tuple[str, float, int]]:
    """(name, value, step) of every logged value of `name`, in step order."""
    return [(m.key, m.value, m.step) for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]


def test_every_entry_of_every_step_arrives_exactly(client) -> None:
    import mlflow

    steps = 1200  # 2,400 entries: two writes at the 1000-entry bound, one on close
    with mlflow.start_run() as run, tracking.metric_sink() as sink:
        for step in range(1, steps + 1):
            sink("meta_train/loss", 1.0 / step, step)
            sink("meta_train/query_acc", step % 7 / 7, step)
    assert history(client, run.info.run_id, "meta_train/loss") == [
        ("meta_train/loss", 1.0 / s, s) for s in range(1, steps + 1)]
    assert history(client, run.info.run_id, "meta_train/query_acc") == [
        ("meta_train/query_acc", s % 7 / 7, s) for s in range(1, steps + 1)]
    # the latest value (what the runs table shows) is the last step's, as with a call per metric
    assert client.get_run(run.info.run_id).data.metrics == {"meta_train/loss": 1.0 / steps,
                                                            "meta_train/query_acc": steps % 7 / 7}


def test_a_write_happens_at_the_bound_and_not_before(client) -> None:
    import mlflow

    with mlflow.start_run() as run:
        sink = tracking.metric_sink(max_entries=5, max_seconds=3600)
        for step in range(4):
            sink("m", float(step), step)
        assert history(client, run.info.run_id, "m") == []  # 4 < 5 pending: nothing written yet
        sink("m", 4.0, 4)
        assert len(history(client, run.info.run_id, "m")) == 5  # the 5th entry writes the batch
        for step in range(5, 12):
            sink("m", float(step), step)
        assert len(history(client, run.info.run_id, "m")) == 10  # second write at 10, 11 and 12 pending
        sink.close()
        assert history(client, run.info.run_id, "m") == [("m", float(s), s) for s in range(12)]
        with pytest.raises(RuntimeError, match="'m' at step 12: the metric sink of run .* is closed"):
            sink("m", 12.0, 12)


def test_a_write_happens_after_max_seconds(client) -> None:
    import mlflow

    with mlflow.start_run() as run, tracking.metric_sink(max_seconds=0.2) as sink:
        sink("m", 1.0, 1)
        assert history(client, run.info.run_id, "m") == []
        time.sleep(0.3)
        sink("m", 2.0, 2)  # the first entry after max_seconds writes both
        assert history(client, run.info.run_id, "m") == [("m", 1.0, 1), ("m", 2.0, 2)]


def test_an_exception_in_the_body_still_writes_the_buffer(client) -> None:
    import mlflow

    with mlflow.start_run() as run:
        with pytest.raises(ZeroDivisionError):
            with tracking.metric_sink(max_entries=1000) as sink:
                for step in range(1, 31):
                    sink("pretrain/loss", 10.0 / step, step)
                1 / 0  # training fails after 30 buffered entries
        assert history(client, run.info.run_id, "pretrain/loss") == [("pretrain/loss", 10.0 / s, s) for s in range(1, 31)]


def test_timestamps_are_when_each_value_was_produced(client) -> None:
    import mlflow

    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    with mlflow.start_run() as run, tracking.metric_sink() as sink:
        before_1 = now_ms()
        sink("m", 1.0, 1)
        after_1 = now_ms()
        time.sleep(0.05)
        before_2 = now_ms()
        sink("m", 2.0, 2)
        after_2 = now_ms()
        time.sleep(0.05)  # the write on close comes later still: its time must not be the entries'
    first, second = sorted(client.get_metric_history(run.info.run_id, "m"), key=lambda m: m.step)
    assert before_1 <= first.timestamp <= after_1 < before_2 <= second.timestamp <= after_2


def test_refuses_bad_bounds_and_no_active_run(client) -> None:
    import mlflow

    with pytest.raises(RuntimeError, match="no MLflow run is active"):
        tracking.metric_sink()
    with mlflow.start_run():
        with pytest.raises(ValueError, match=r"max_entries must be 1\.\.1000 .* found 1001"):
            tracking.metric_sink(max_entries=1001)
        with pytest.raises(ValueError, match="max_seconds must be > 0, found 0"):
            tracking.metric_sink(max_seconds=0)
