"""Progress of long loops (meta-training, fine-tuning, evaluation): a tqdm meter with ETA and the
running metrics.

At a terminal it is tqdm's live bar. When stdout or stderr is not a terminal
(`dvc repro` or Prefect capturing the output, a log file) or `CI=true`, the
same meter goes to the logger `metatransfer.progress` instead: one record
every `log_every_pct` percent of the total and a closing one ("... done in
01:40"), never a carriage return per refresh.

    with progress(total=steps, desc="meta_train protonet", unit="step") as bar:
        for step in range(steps):
            ...
            bar.update(1, loss=loss, acc=acc)

`METATRANSFER_PROGRESS=bar|log|off` overrides the choice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

MODES = ("bar", "log", "off")
ENV_MODE = "METATRANSFER_PROGRESS"
# The meter of a log record: counts, percentage, elapsed, ETA, rate, then the metrics.
LOG_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, ETA {remaining}, "
              "{rate_fmt}{postfix}")
_log = logging.getLogger(__name__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or fake streams
        return False


def choose_mode(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> str:
    """Which display to use: "bar" at an interactive terminal, "log" otherwise.

    Args:
        stream: where a bar would be drawn (default sys.stderr).
        environ: the environment to consult (default os.environ).

    Returns:
        "bar", "log" or "off". $METATRANSFER_PROGRESS wins when set to one of
        these; CI=true, or stdout or `stream` not being a terminal, gives "log".
    """
    env = os.environ if environ is None else environ
    forced = (env.get(ENV_MODE) or "").strip().lower()
    if forced in MODES:
        return forced
    if _truthy(env.get("CI")):
        return "log"
    stream = sys.stderr if stream is None else stream
    return "bar" if _isatty(sys.stdout) and _isatty(stream) else "log"


class _LogLines:
    """The file tqdm writes to in log mode: each meter it prints becomes one log record."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        line = " ".join(text.split())  # tqdm starts a meter with "\r" and pads it with spaces
        if line:
            self.logger.info("%s", line)
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""


class Progress(tqdm):
    """A tqdm meter that also shows the latest metrics and, in log mode, logs instead of drawing.

    Args:
        total: number of units expected.
        desc: what is running, e.g. "finetune retinamnist/protonet".
        unit: the unit's name in messages ("step", "episode", ...).
        mode: "bar", "log" or "off" (see `choose_mode`).
        stream: where the bar is drawn (default sys.stderr).
        log_every_pct: in "log" mode, one record per this many percent of `total`.
        time_budget_s: the loop stops after this many seconds at the latest
            (meta-training's time guard): what is left of it is shown as `budget_left`.
        logger: where "log" records go (default this module's logger).
        clock: seconds, for tests with a fake clock (default tqdm's, `time.time`).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        mode: str = "log",
        stream: TextIO | None = None,
        log_every_pct: float = 10.0,
        time_budget_s: float | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        if log_every_pct <= 0:
            raise ValueError(f"log_every_pct must be > 0, got {log_every_pct}")
        self.mode = mode
        self.metrics: dict[str, Any] = {}
        self.time_budget_s = time_budget_s
        self._logger = logger or _log
        if mode == "log":
            # A record per `log_every_pct` % of the total whatever the speed: no refresh by time
            # (mininterval 0), none forced by tqdm's monitor thread (maxinterval inf), none at the
            # start (delay), and the average rate of this run rather than a moving one (smoothing 0).
            options: dict[str, Any] = dict(
                file=_LogLines(self._logger), bar_format=LOG_FORMAT, leave=False, delay=1e-9,
                miniters=max(1.0, total * log_every_pct / 100), mininterval=0.0, maxinterval=math.inf, smoothing=0.0)
        else:
            options = dict(file=stream or sys.stderr, dynamic_ncols=True, leave=True, disable=mode == "off")
        super().__init__(total=total, desc=desc, unit=unit, **options)
        if self.disable:
            self.initial = 0  # tqdm keeps only n and total for a disabled bar; update_to reads this
        if clock is not None:
            self._time = clock
            self.start_t = self.last_print_t = clock()

    def update(self, n: float = 1, **metrics: Any) -> bool | None:
        """Advance by `n` units and remember the latest metrics (shown after the meter).

        Args:
            n: units done since the last call.
            **metrics: running values to show, e.g. loss=0.41, acc=0.87.

        Returns:
            True when the meter was drawn or logged.
        """
        self.metrics.update(metrics)
        if self.disable:  # "off" (or closed): keep counting, show nothing
            self.n += n
            return None
        shown = dict(self.metrics)
        if self.time_budget_s is not None:
            shown["budget_left"] = self.format_interval(max(self.time_budget_s - (self._time() - self.start_t), 0.0))
        if shown:
            self.set_postfix(shown, refresh=False)
        return super().update(n)

    def update_to(self, position: int, **metrics: Any) -> None:
        """Move to an absolute position, e.g. a training loop's 1-based step number.

        A loop resumed from a checkpoint reports s+1 as its first step: the s
        steps done before count as already done, not towards this run's rate/ETA.

        Args:
            position: units done in total.
            **metrics: running values to show.
        """
        if self.n == 0 and position > 1:
            self.n = self.last_print_n = self.initial = position - 1
        self.update(position - self.n, **metrics)

    def set_metrics(self, **metrics: Any) -> None:
        """Change the shown metrics without advancing (e.g. after a validation pass)."""
        self.update(0, **metrics)

    def close(self) -> None:
        """Finish: the final bar, or in log mode a closing record with the total time. Safe to call twice."""
        # getattr: tqdm's __del__ also calls this on an object whose __init__ refused its arguments.
        if getattr(self, "mode", None) == "log" and not getattr(self, "disable", True):
            meter = " ".join(str(self).split())
            self._logger.info("%s done in %s", meter, self.format_interval(self._time() - self.start_t))
        super().close()


def progress_sink(
    bar: Progress,
    step_metric: str,
    sink: Callable[[str, float, int], None] | None = None,
    show: dict[str, str] | None = None,
) -> Callable[[str, float, int], None]:
    """A metric sink `(name, value, step)` that also moves `bar` (then forwards to `sink`).

    For loops that report through a metric sink rather than a step callback
    (fine-tuning): `step_metric` (logged once per step) moves the bar to its step.

    Args:
        bar: the progress handle.
        step_metric: the metric name logged every step, e.g. "finetune/loss".
        sink: the sink to forward every call to (e.g. MLflow's), or None.
        show: metric name -> short label shown with the bar (default: the part after the last "/").

    Returns:
        The combined sink.
    """

    def combined(name: str, value: float, step: int) -> None:
        label = (show or {}).get(name, name.rsplit("/", 1)[-1])
        if name == step_metric:
            bar.update_to(step, **{label: value})
        elif show is None or name in show:
            bar.set_metrics(**{label: value})
        if sink is not None:
            sink(name, value, step)

    return combined


@contextlib.contextmanager
def progress(
    total: int,
    desc: str,
    unit: str = "it",
    mode: str | None = None,
    stream: TextIO | None = None,
    log_every_pct: float = 10.0,
    time_budget_s: float | None = None,
    logger: logging.Logger | None = None,
) -> Iterator[Progress]:
    """A progress display for one loop, closed when the block ends (also on errors).

    Args:
        total: units expected.
        desc: what is running; starts every line.
        unit: the unit's name ("step", "episode").
        mode: "bar", "log" or "off"; None chooses with `choose_mode` (terminal -> bar,
            CI or captured output -> log).
        stream: where a bar is drawn (default sys.stderr).
        log_every_pct: in log mode, one record per this many percent (default 10).
        time_budget_s: an upper bound on the loop's run time (what is left is shown).
        logger: where log-mode records go.

    Yields:
        The `Progress` handle: call `.update(n, **metrics)`.
    """
    bar = Progress(total, desc, unit=unit, mode=mode or choose_mode(stream), stream=stream,
                   log_every_pct=log_every_pct, time_budget_s=time_budget_s, logger=logger)
    try:
        yield bar
    finally:
        bar.close()
