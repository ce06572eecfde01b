"""Progress of long loops (meta-training, fine-tuning, evaluation) with ETA and a
running metric.

At a terminal it draws a bar (tqdm when installed, else a one-line bar of
its own); in CI (`CI=true`), under DVC/Prefect with output captured, or in any
process whose stdout is not a terminal it stays quiet and logs one line every
`log_every_pct` percent instead, so log files get a handful of readable lines
rather than thousands of carriage returns.

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
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

MODES = ("bar", "log", "off")
ENV_MODE = "METATRANSFER_PROGRESS"
_log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """`M:SS` below an hour, `H:MM:SS` above; `?` for an unknown (NaN/inf/negative) duration.

    Args:
        seconds: a duration in seconds.

    Returns:
        The formatted duration, e.g. 75 -> "1:15", 3725 -> "1:02:05".
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """`k=v` pairs separated by spaces; floats with 4 significant digits.

    Args:
        metrics: name -> value (numbers or anything printable).

    Returns:
        e.g. {"loss": 0.51234, "acc": 0.8} -> "loss=0.5123 acc=0.8".
    """
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


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


class Progress:
    """The handle `progress()` yields: counts, timing, ETA and the last metrics.

    Args:
        total: number of units expected (None when unknown: no percentage/ETA).
        desc: what is running, e.g. "finetune retinamnist/protonet".
        unit: the unit's name in messages ("step", "episode", ...).
        mode: "bar", "log" or "off" (see `choose_mode`).
        stream: where the bar is drawn (default sys.stderr).
        log_every_pct: in "log" mode, one line per this many percent.
        log_every_s: in "log" mode with an unknown total, one line per this many seconds.
        time_budget_s: the loop stops after this many seconds at the latest
            (meta-training's time budget): the ETA never exceeds what is left of it.
        logger: where "log" lines go (default this module's logger).
        use_tqdm: draw the bar with tqdm when it is importable.
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        mode: str = "log",
        stream: TextIO | None = None,
        log_every_pct: float = 10.0,
        log_every_s: float = 30.0,
        time_budget_s: float | None = None,
        logger: logging.Logger | None = None,
        use_tqdm: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
        if log_every_pct <= 0:
            raise ValueError(f"log_every_pct must be > 0, got {log_every_pct}")
        self.total = total if total is None or total > 0 else None
        self.desc = desc
        self.unit = unit
        self.mode = mode
        self.stream = sys.stderr if stream is None else stream
        self.log_every_pct = log_every_pct
        self.log_every_s = log_every_s
        self.time_budget_s = time_budget_s
        self.logger = logger or _log
        self.n = 0
        self.initial = 0  # units done before this run (a resumed loop); not counted in the rate
        self.metrics: dict[str, Any] = {}
        self._clock = clock
        self._start = clock()
        self._last_logged_bucket = 0
        self._last_log_time = self._start
        self._last_draw = -math.inf
        self._closed = False
        self._tqdm = None
        if mode == "bar" and use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:  # not installed: our own bar below
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream,
                                  dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------ figures
    @property
    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self._start

    @property
    def rate(self) -> float:
        """Units per second so far in this run (0 before the first update)."""
        el = self.elapsed
        done = self.n - self.initial
        return done / el if el > 0 and done > 0 else 0.0

    @property
    def eta(self) -> float:
        """Estimated seconds left: remaining units / rate, capped by the time budget; NaN if unknown."""
        est = math.nan
        if self.total is not None and self.rate > 0:
            est = max(self.total - self.n, 0) / self.rate
        if self.time_budget_s is not None:
            left = max(self.time_budget_s - self.elapsed, 0.0)
            est = left if math.isnan(est) else min(est, left)
        return est

    def line(self) -> str:
        """The one-line summary used in log mode and by the built-in bar."""
        if self.total is not None:
            pct = 100.0 * self.n / self.total
            head = f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%)"
        else:
            head = f"{self.desc}: {self.n} {self.unit}"
        tail = f"{format_duration(self.elapsed)} elapsed, ETA {format_duration(self.eta)}, {self.rate:.3g} {self.unit}/s"
        metrics = format_metrics(self.metrics)
        return f"{head}, {tail}" + (f", {metrics}" if metrics else "")

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, **metrics: Any) -> None:
        """Advance by `n` units and remember the latest metrics (shown with the bar/log line).

        Args:
            n: units done since the last call.
            **metrics: running values to show, e.g. loss=0.41, acc=0.87.
        """
        self.n += n
        if metrics:
            self.metrics.update(metrics)
        if self.mode == "off":
            return
        if self.mode == "log":
            self._maybe_log()
        elif self._tqdm is not None:
            if metrics:
                post = dict(self.metrics)
                if self.time_budget_s is not None:
                    post["budget_left"] = format_duration(max(self.time_budget_s - self.elapsed, 0.0))
                self._tqdm.set_postfix_str(format_metrics(post), refresh=False)
            self._tqdm.update(n)
        else:
            self._draw()

    def update_to(self, position: int, **metrics: Any) -> None:
        """Move to an absolute position, e.g. a training loop's 1-based step number.

        A loop resumed from a checkpoint reports s+1 as its first step: the s
        steps done before count as already done, not towards this run's rate/ETA.

        Args:
            position: units done in total.
            **metrics: running values to show.
        """
        if self.n == 0 and position > 1:
            self.n = self.initial = position - 1
            if self._tqdm is not None:
                self._tqdm.n = self._tqdm.last_print_n = self._tqdm.initial = self.initial
        self.update(position - self.n, **metrics)

    def set_metrics(self, **metrics: Any) -> None:
        """Change the shown metrics without advancing (e.g. after a validation pass)."""
        self.update(0, **metrics)

    def _maybe_log(self) -> None:
        if self.total is not None:
            bucket = int(100.0 * self.n / self.total // self.log_every_pct)
            if bucket > self._last_logged_bucket:
                self._last_logged_bucket = bucket
                self.logger.info("%s", self.line())
        else:
            now = self._clock()
            if now - self._last_log_time >= self.log_every_s:
                self._last_log_time = now
                self.logger.info("%s", self.line())

    def _draw(self, final: bool = False) -> None:
        now = self._clock()
        # Redraw at most 10 times a second: a fast loop would otherwise spend its time printing.
        if not final and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        bar = ""
        if self.total is not None:
            filled = int(20 * min(self.n / self.total, 1.0))
            bar = "|" + "#" * filled + "-" * (20 - filled) + "| "
        self.stream.write("\r" + bar + self.line() + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Finish: final bar/log line with the total time. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "off":
            return
        if self.mode == "log":
            self.logger.info("%s done in %s", self.line(), format_duration(self.elapsed))
        elif self._tqdm is not None:
            self._tqdm.close()
        else:
            self._draw(final=True)
            self.stream.write("\n")
            self.stream.flush()


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
    total: int | None,
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
        total: units expected (None when unknown).
        desc: what is running; starts every line.
        unit: the unit's name ("step", "episode").
        mode: "bar", "log" or "off"; None chooses with `choose_mode` (terminal -> bar,
            CI or captured output -> log).
        stream: where a bar is drawn (default sys.stderr).
        log_every_pct: in log mode, one line per this many percent (default 10).
        time_budget_s: an upper bound on the loop's run time (caps the ETA).
        logger: where log-mode lines go.

    Yields:
        The `Progress` handle: call `.update(n, **metrics)`.
    """
    bar = Progress(total, desc, unit=unit, mode=mode or choose_mode(stream), stream=stream,
                   log_every_pct=log_every_pct, time_budget_s=time_budget_s, logger=logger)
    try:
        yield bar
    finally:
        bar.close()
