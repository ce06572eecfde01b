"""Progress display (tqdm): mode choice, log-mode cadence and lines, resume, the bar, the metric sink."""

from __future__ import annotations

import io
import logging

import pytest

from metatransfer import progress as prog
from metatransfer.progress import Progress, choose_mode, progress

LOGGER = "metatransfer.progress"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prog.sys, "stdout", TTY())
    assert choose_mode(TTY(), {}) == "bar"
    assert choose_mode(TTY(), {"CI": "true"}) == "log"
    assert choose_mode(io.StringIO(), {}) == "log"  # bar stream captured
    assert choose_mode(TTY(), {"METATRANSFER_PROGRESS": "off", "CI": "true"}) == "off"
    assert choose_mode(io.StringIO(), {"METATRANSFER_PROGRESS": "bar"}) == "bar"
    monkeypatch.setattr(prog.sys, "stdout", io.StringIO())
    assert choose_mode(TTY(), {}) == "log"  # stdout redirected (DVC, Prefect, CI logs)


def test_log_mode_logs_every_step_of_percent_with_eta_and_a_closing_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    bar = Progress(100, "meta_train protonet", unit="step", mode="log", log_every_pct=25, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for i in range(100):
            clock.t += 1.0
            bar.update(1, acc=0.5 + i / 1000)
        bar.close()
        bar.close()  # idempotent
    lines = records(caplog)
    assert len(lines) == 5
    assert lines[0] == "meta_train protonet: 25/100 step (25%), 00:25 elapsed, ETA 01:15, 1.00step/s, acc=0.524"
    assert [ln.split(": ")[1].split()[0] for ln in lines] == ["25/100", "50/100", "75/100", "100/100", "100/100"]
    assert lines[4] == ("meta_train protonet: 100/100 step (100%), 01:40 elapsed, ETA 00:00, 1.00step/s, acc=0.599 "
                        "done in 01:40")


def test_log_mode_line_count_is_bounded_and_has_no_carriage_returns(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = Progress(1000, "finetune t/m", unit="step", mode="log", clock=clock)
        for step in range(1, 1001):
            clock.t += 0.001
            bar.update_to(step, loss=1.0 / step)
        bar.close()
    lines = records(caplog)
    assert len(lines) == 11  # one per 10 % of 1000 steps, then the closing line
    assert [ln.split(": ")[1].split()[0] for ln in lines[:10]] == [f"{100 * k}/1000" for k in range(1, 11)]
    assert not any("\r" in ln or "\n" in ln or "  " in ln for ln in lines)
    assert lines[-1].startswith("finetune t/m: 1000/1000 step (100%), ") and " loss=0.001 done in " in lines[-1]


def test_a_resumed_loop_counts_only_this_run_and_shows_the_time_budget_left(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = Progress(1000, "meta_train", unit="step", mode="log", time_budget_s=30, clock=clock)
        clock.t += 10
        bar.update_to(401, loss=2.0)  # resumed at step 400: the first step of this run is 401
        clock.t += 10
        bar.update_to(420, loss=1.5)
        assert (bar.n, bar.initial) == (420, 400)
        assert records(caplog) == []  # 20 steps: less than 10 % of the total
        bar.close()
    # 20 steps in 20 s (not 420): 1 step/s, 580 steps left; 10 s of the 30 s budget left.
    assert records(caplog) == ["meta_train: 420/1000 step (42%), 00:20 elapsed, ETA 09:40, 1.00step/s, "
                               "loss=1.5, budget_left=00:10 done in 00:20"]


def test_context_manager_closes_on_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with pytest.raises(RuntimeError):
            with progress(10, "boom", mode="log", log_every_pct=50) as bar:
                bar.update(3)
                raise RuntimeError("stop")
    (line,) = records(caplog)
    assert line.startswith("boom: 3/10 it (30%), ") and " done in " in line


def test_off_mode_and_the_env_switch_print_nothing(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with progress(5, "quiet", mode="off") as bar:
            bar.update(5, acc=1.0)
        monkeypatch.setenv("METATRANSFER_PROGRESS", "off")
        with progress(4, "switched off", stream=TTY()) as switched:
            switched.update_to(4, acc=0.5)
        monkeypatch.setenv("METATRANSFER_PROGRESS", "log")
        with progress(2, "switched to log", stream=TTY()) as logged:
            logged.update(2)
    assert records(caplog)[0].startswith("switched to log: 2/2 it (100%)") and len(records(caplog)) == 2
    assert capsys.readouterr().err == ""
    assert bar.n == 5 and bar.metrics == {"acc": 1.0}  # counted all the same
    assert switched.mode == "off" and switched.n == 4


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="progress mode must be one of"):
        Progress(1, "x", mode="fancy")
    with pytest.raises(ValueError, match="log_every_pct must be > 0, got 0"):
        Progress(1, "x", log_every_pct=0)


def test_bar_mode_draws_a_throttled_tqdm_bar_with_metrics_and_ends_with_newline() -> None:
    clock = FakeClock()
    out = io.StringIO()
    bar = Progress(40, "finetune", unit="step", mode="bar", stream=out, clock=clock)
    for _ in range(20):  # the clock stands still: no redraw before tqdm's 0.1 s interval
        bar.update(1, loss=0.25)
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2  # drawn when opened and when closed
    assert text.endswith("\n")
    assert "finetune:  50%|" in text and "| 20/40 [" in text and "loss=0.25" in text


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
