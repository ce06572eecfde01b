"""Progress display: mode choice, ETA arithmetic, log-mode cadence, the built-in bar."""

from __future__ import annotations

import io
import logging
import math

import pytest

from metatransfer import progress as prog
from metatransfer.progress import Progress, choose_mode, format_duration, format_metrics, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (59.4, "0:59"), (75, "1:15"), (3725, "1:02:05"),
                                           (math.nan, "?"), (math.inf, "?"), (-1, "?")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_metrics_rounds_floats_and_keeps_order() -> None:
    assert format_metrics({"loss": 0.512345, "acc": 0.8, "step": 7}) == "loss=0.5123 acc=0.8 step=7"


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prog.sys, "stdout", TTY())
    assert choose_mode(TTY(), {}) == "bar"
    assert choose_mode(TTY(), {"CI": "true"}) == "log"
    assert choose_mode(io.StringIO(), {}) == "log"  # bar stream captured
    assert choose_mode(TTY(), {"METATRANSFER_PROGRESS": "off", "CI": "true"}) == "off"
    assert choose_mode(io.StringIO(), {"METATRANSFER_PROGRESS": "bar"}) == "bar"
    monkeypatch.setattr(prog.sys, "stdout", io.StringIO())
    assert choose_mode(TTY(), {}) == "log"  # stdout redirected (DVC, Prefect, CI logs)


def test_log_mode_logs_every_step_of_percent_with_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    bar = Progress(100, "meta_train protonet", unit="step", mode="log", log_every_pct=25, clock=clock)
    with caplog.at_level(logging.INFO, logger="metatransfer.progress"):
        for i in range(100):
            clock.t += 1.0
            bar.update(1, acc=0.5 + i / 1000)
        bar.close()
        bar.close()  # idempotent
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[0] == "meta_train protonet: 25/100 step (25%), 0:25 elapsed, ETA 1:15, 1 step/s, acc=0.524"
    assert [ln.split(":")[1].split()[0] for ln in lines[:4]] == ["25/100", "50/100", "75/100", "100/100"]
    assert lines[4].endswith("done in 1:40")


def test_eta_is_capped_by_time_budget() -> None:
    clock = FakeClock()
    bar = Progress(1000, "x", mode="off", time_budget_s=30, clock=clock)
    clock.t += 10
    bar.update(10)
    assert bar.rate == pytest.approx(1.0)
    assert bar.eta == pytest.approx(20.0)  # 990 steps at 1/s, but only 20 s of budget left
    unbudgeted = Progress(1000, "x", mode="off", clock=clock)
    clock.t += 10
    unbudgeted.update(10)
    assert unbudgeted.eta == pytest.approx(990.0)
    assert math.isnan(Progress(None, "x", mode="off", clock=clock).eta)


def test_unknown_total_logs_by_time(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    bar = Progress(None, "scan", mode="log", log_every_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="metatransfer.progress"):
        for _ in range(25):
            clock.t += 1.0
            bar.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["scan: 10 it", "scan: 20 it"]


def test_builtin_bar_draws_throttled_and_ends_with_newline() -> None:
    clock = FakeClock()
    out = io.StringIO()
    bar = Progress(40, "finetune", mode="bar", stream=out, use_tqdm=False, clock=clock)
    for _ in range(20):  # the clock stands still: only the first update may draw
        bar.update(1, loss=0.25)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2
    assert text.endswith("\n")
    assert "|##########----------| finetune: 20/40 it (50%)" in text
    assert "loss=0.25" in text


def test_tqdm_bar_when_installed() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    with progress(3, "evaluate omniglot_test", unit="episode", mode="bar", stream=out) as bar:
        for _ in range(3):
            bar.update(1, acc=0.75)
    text = out.getvalue()
    assert "evaluate omniglot_test" in text and "3/3" in text and "acc=0.75" in text


def test_context_manager_closes_on_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="metatransfer.progress"):
        with pytest.raises(RuntimeError):
            with progress(10, "boom", mode="log") as bar:
                bar.update(3)
                raise RuntimeError("stop")
    assert caplog.records[-1].getMessage().startswith("boom: 3/10 it (30%)")
    assert "done in" in caplog.records[-1].getMessage()


def test_off_mode_prints_nothing(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.INFO, logger="metatransfer.progress"):
        with progress(5, "quiet", mode="off") as bar:
            bar.update(5, acc=1.0)
    assert caplog.records == [] and capsys.readouterr().err == ""
    assert bar.n == 5 and bar.metrics == {"acc": 1.0}


def test_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="progress mode must be one of"):
        Progress(1, "x", mode="fancy")


def test_update_to_after_resume_counts_only_this_run() -> None:
    clock = FakeClock()
    bar = Progress(1000, "meta_train", mode="off", clock=clock)
    clock.t += 10
    bar.update_to(401)  # resumed at step 400: the first step of this run is 401
    clock.t += 10
    bar.update_to(420)
    assert (bar.n, bar.initial) == (420, 400)
    assert bar.rate == pytest.approx(1.0)  # 20 steps in 20 s, not 420
    assert bar.eta == pytest.approx(580.0)


def test_progress_sink_moves_bar_and_forwards() -> None:
    seen: list[tuple[str, float, int]] = []
    bar = Progress(10, "finetune", mode="off")
    sink = prog.progress_sink(bar, "finetune/loss", lambda *a: seen.append(a))
    sink("finetune/val_acc", 0.5, 0)
    sink("finetune/loss", 1.25, 1)
    sink("finetune/loss", 1.0, 2)
    sink("finetune/val_acc", 0.625, 2)
    assert bar.n == 2 and bar.initial == 0
    assert bar.metrics == {"val_acc": 0.625, "loss": 1.0}
    assert seen == [("finetune/val_acc", 0.5, 0), ("finetune/loss", 1.25, 1), ("finetune/loss", 1.0, 2),
                    ("finetune/val_acc", 0.625, 2)]
