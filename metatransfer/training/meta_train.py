"""The meta-training loop shared by every algorithm.

The loop owns what algorithms should not each re-implement: the outer
optimizer step, the step budget (and an optional wall-clock guard: a run it
ends is marked `budget_hit="time"` and logged as a WARNING, never silently),
the validation curve on fixed meta-val episodes every `val_every` steps with
best-model selection, and numerical-fault recovery
(a non-finite loss, gradient or updated weight skips the step and restores
the last finite state; K consecutive faults stop the run with a clear error:
the check and the rollback state are in `metatransfer.training.faults`),
and crash-safe checkpoints (see `metatransfer.training.checkpoint`): with a
`CheckpointConfig`, the full training state is saved every N steps and a
re-run resumes from the newest checkpoint, ending with the same weights as an
uninterrupted run (on CPU, with the step budget; a run cut by the time guard
is wall-clock-dependent and therefore not).

Faults are detected in the step that produced them: an inner-loop blow-up
(MAML with an absurd inner learning rate) makes the adapted weights, hence
the query loss and the meta-gradient, non-finite in that same step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from metatransfer import runtime
from metatransfer.algorithms.base import Hparams, MetaLearner, learning_rate_keys
from metatransfer.config import LR_SCHEDULES, PRECISIONS
from metatransfer.episodes import Episode
from metatransfer.errors import MetatransferError
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.training.checkpoint import (
    CheckpointConfig,
    ResumableSampler,
    load_latest,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metatransfer.training import distributed
from metatransfer.training.distributed import DistContext
from metatransfer.training.faults import LastGood, NumericalFaultError, all_finite

log = logging.getLogger(__name__)

MetricSink = Callable[[str, float, int], None]
"""Receives (metric name, value, step), e.g. an MLflow logger."""


@dataclass(frozen=True)
class TrainSettings:
    """Budget and schedule of one meta-training run.

    `steps` is the budget. `time_budget_s` is an optional guard (inf or 0: off):
    when it ends the run first, the result says so (`TrainResult.budget_hit`).
    """

    steps: int
    meta_batch_size: int
    meta_lr: float
    val_every: int
    time_budget_s: float = math.inf
    max_consecutive_faults: int = 5
    grad_clip: float = 10.0
    # "constant", or "cosine": the outer learning rate follows a half cosine
    # from meta_lr to 0 over the step budget (steps done / steps), so the
    # schedule, like the weights, does not depend on the machine's speed.
    lr_schedule: str = "constant"
    # Benchmarks that compare methods at equal wall time (benchmarks/omniglot.py)
    # anneal over whichever of steps and time_budget_s ends first instead.
    anneal_over_time: bool = False
    # "fp32", "bf16" or "fp16": the meta-training step runs under autocast
    # (metatransfer.runtime.autocast; weights, optimizer and evaluation stay float32).
    precision: str = "fp32"
    # Train with 4-D weights in channels-last layout (faster oneDNN kernels on
    # CPU); the returned learner is converted back to the default layout.
    channels_last: bool = False
    # Also validate when this many seconds passed since the last validation
    # (0: by `val_every` steps only). Benchmarks only (time-to-accuracy curves):
    # the pipeline validates by steps so that its curve is reproducible.
    val_every_s: float = 0.0
    # False: the validation curve is only recorded, the last weights are kept
    # (when the validation episodes must not choose the model, e.g. a benchmark
    # that draws them from the test classes).
    select_best: bool = True

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise MetatransferError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, found {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise MetatransferError(f"precision must be one of {list(PRECISIONS)}, found {self.precision!r}")



def time_guard(settings: TrainSettings) -> float:
    """The wall-clock guard in seconds (inf when off: `time_budget_s` inf, 0 or negative)."""
    t = settings.time_budget_s
    return t if math.isfinite(t) and t > 0 else math.inf


def budget_fraction(settings: TrainSettings, step: int, seconds: float) -> float:
    """How much of the run's budget is spent, in [0, 1]: steps done / steps.

    With `anneal_over_time` (benchmarks) the larger of the step and time fractions.
    """
    frac = step / settings.steps if settings.steps > 0 else 1.0
    if settings.anneal_over_time and math.isfinite(time_guard(settings)):
        frac = max(frac, seconds / time_guard(settings))
    return min(max(frac, 0.0), 1.0)


def lr_factor(settings: TrainSettings, step: int, seconds: float) -> float:
    """The multiplier of every base learning rate at this point of the run (1.0 when constant)."""
    if settings.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * budget_fraction(settings, step, seconds)))


@dataclass
class TrainResult:
    """What a run produced (the learner holds the best-validation weights)."""

    learner: MetaLearner
    steps_done: int
    seconds: float
    best_val_acc: float
    best_step: int
    faults: int
    history: list[dict[str, float]] = field(default_factory=list)
    val_curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None  # the checkpoint step this run resumed from, if any
    train_seconds: float = 0.0  # `seconds` without the time spent validating
    # "" when the step budget ended the run; "time" when the wall-clock guard
    # did (fewer steps than asked: the weights depend on the machine's speed).
    budget_hit: str = ""
    # Per-episode accuracies of the best validation (the weights the learner
    # holds): the evidence of the learner quality gate (metatransfer.registry).
    best_val_episode_accs: list[float] = field(default_factory=list)


def make_optimizer(learner: MetaLearner, lr: float) -> torch.optim.Optimizer:
    """The outer optimizer: the algorithm's own `outer_optimizer(lr)` if it has one, else Adam."""
    own = getattr(learner, "outer_optimizer", None)
    if callable(own):
        return own(lr)
    return torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=lr)


def meta_train(
    learner: MetaLearner,
    sample_episode: Callable[[], Episode],
    val_episodes: Sequence[Episode],
    settings: TrainSettings,
    sink: MetricSink | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    checkpoint: CheckpointConfig | None = None,
    clock: Callable[[], float] = time.perf_counter,
    dist_ctx: DistContext | None = None,
) -> TrainResult:
    """Meta-train `learner` on sampled source episodes; keep the best meta-val weights.

    Args:
        learner: the algorithm (its parameters are θ), freshly built with the
            same seed when resuming.
        sample_episode: returns one source episode per call (seeded sampler);
            a `ResumableSampler` when its position must survive a restart
            through the source's own state, else it is wrapped (replay).
        val_episodes: fixed meta-val episodes; evaluated every `val_every`
            steps and at the end; empty disables selection (last weights kept).
        settings: steps (the budget), meta-batch size, outer lr, optional time guard.
        sink: optional metric logger (name, value, step).
        on_step: optional callback(step, loss, acc), e.g. a progress bar.
        checkpoint: optional; save every `checkpoint.every` steps and at the
            end, and resume from the newest matching checkpoint in its folder.
        clock: seconds (monotonic); tests pass a fake one to test the time guard by steps.
        dist_ctx: the process group of a distributed run (`distributed.init_from_env()`);
            None: one process. Each rank trains on its share of every meta-batch
            and the meta-gradients are all-reduced; only rank 0 validates, logs
            and writes checkpoints (see `metatransfer.training.distributed`).

    Returns:
        TrainResult; `learner` is left with the best-validation weights and on
        the device it was given on (the caller chooses it: `runtime.device_for`).

    Raises:
        NumericalFaultError: `max_consecutive_faults` non-finite steps in a row.
        CheckpointError: the checkpoint to resume from is altered or unsafe.
    """
    emit = sink or (lambda name, value, step: None)
    if dist_ctx is not None:
        distributed.check_settings(learner, settings.meta_batch_size, dist_ctx, settings.anneal_over_time)
        if not dist_ctx.is_main:
            emit = lambda name, value, step: None  # noqa: E731  (rank 0 logs)
    sampler = sample_episode if isinstance(sample_episode, ResumableSampler) else ResumableSampler(sample_episode)
    if settings.channels_last:
        learner.to(memory_format=torch.channels_last)
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = make_optimizer(learner, settings.meta_lr)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    device = next((p.device for p in params), torch.device("cpu"))
    guard = time_guard(settings)
    result = TrainResult(learner, 0, 0.0, -1.0, 0, 0)
    best_state: dict[str, torch.Tensor] | None = None
    step, elapsed, finished = 0, 0.0, False
    val_spent = 0.0  # seconds spent validating: not charged to the time budget

    resumed = None
    if checkpoint is not None:
        # Distributed: rank 0 cleans the folder (leftovers, another fingerprint) before the others read it.
        resumed = load_latest(checkpoint) if dist_ctx is None else dist_ctx.main_first(lambda: load_latest(checkpoint))
    if resumed is not None:
        st = resumed.state
        learner.load_state_dict(st["learner"])
        load_optimizer_state(optimizer, st["optimizer"])
        best_state = st["best"]
        step, elapsed, finished = int(st["step"]), float(st["seconds"]), bool(st["final"])
        val_spent = float(st.get("val_seconds", 0.0))
        result.best_val_acc, result.best_step, result.faults = float(st["best_val_acc"]), int(st["best_step"]), int(st["faults"])
        result.history, result.val_curve = list(st["history"]), list(st["val_curve"])
        result.resumed_from = step
        result.budget_hit = str(st.get("budget_hit", ""))
        result.best_val_episode_accs = list(st.get("best_val_episode_accs", []))
        sampler.restore(st["sampler"])
        set_rng_state(st["rng"])  # last: restoring the sampler by replay must not disturb it
        log.info("%s: resumed from checkpoint %s (step %d%s)", learner.name, resumed.path, step, ", finished" if finished else "")
    start = clock() - elapsed
    last_val = clock()
    last_good = LastGood(learner, optimizer)
    consecutive = 0

    def train_seconds() -> float:
        """Wall seconds of training so far, validation excluded (what the time budget counts)."""
        return clock() - start - val_spent

    def snapshot(final: bool) -> None:
        if checkpoint is None:
            return
        if dist_ctx is not None:
            if dist_ctx.is_main:
                write(final)
            dist_ctx.barrier()  # the others go on once rank 0's checkpoint is on disk
            return
        write(final)

    def write(final: bool) -> None:
        save_checkpoint(checkpoint, step, {
            "learner": learner.state_dict(), "optimizer": optimizer_state(optimizer), "best": best_state,
            "best_val_acc": result.best_val_acc, "best_step": result.best_step, "faults": result.faults,
            "step": step, "seconds": clock() - start, "val_seconds": val_spent, "final": final,
            "history": result.history, "val_curve": result.val_curve, "budget_hit": result.budget_hit,
            "best_val_episode_accs": result.best_val_episode_accs,
            "sampler": sampler.state(), "rng": rng_state(),
        })

    def validate(step: int) -> None:
        nonlocal best_state, last_val, val_spent
        began = clock()
        if not val_episodes or (dist_ctx is not None and not dist_ctx.is_main):  # rank 0 validates
            last_val = began
            return
        accs = episode_accuracies(learner, val_episodes)
        acc = float(np.mean(accs))
        last_val = clock()
        val_spent += last_val - began
        # "seconds": training time when these weights were reached (validation excluded).
        result.val_curve.append({"step": step, "acc": acc, "seconds": train_seconds()})
        emit("val/acc", acc, step)
        if acc > result.best_val_acc:
            result.best_val_acc, result.best_step = acc, step
            result.best_val_episode_accs = [float(a) for a in accs]
            if settings.select_best:
                best_state = copy.deepcopy(learner.state_dict())

    while not finished and step < settings.steps:
        out_of_time = train_seconds() >= guard
        if dist_ctx is not None and math.isfinite(guard):
            out_of_time = dist_ctx.agree(out_of_time, device)  # rank 0's clock decides for all
        if out_of_time:
            result.budget_hit = "time"
            break
        learner.train()
        episodes = [sampler() for _ in range(settings.meta_batch_size)]
        if dist_ctx is not None:
            episodes = dist_ctx.shard(episodes)  # every rank draws the whole meta-batch: samplers stay in step
        if settings.lr_schedule != "constant":
            factor = lr_factor(settings, step, train_seconds())
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(device, settings.precision), distributed.synced_batchnorm(learner, dist_ctx):
            out = learner.meta_learn(episodes)
        if dist_ctx is not None:
            out = distributed.reduce_meta_gradient(params, out, len(episodes), settings.meta_batch_size, dist_ctx)
        # Gradients are checked before the optimizer step, so a bad one never reaches the weights.
        ok = math.isfinite(out.loss) and all_finite([p.grad for p in params])
        if ok:
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            # Finite gradients can still overflow a weight (a huge step size in an
            # algorithm's own optimizer): caught here, before it is kept.
            ok = all_finite(params)
        if not ok:
            result.faults += 1
            consecutive += 1
            # Also undoes what the faulty forward pass changed (BatchNorm running statistics).
            last_good.restore()
            emit("meta_train/nonfinite_skips", float(result.faults), step)
            log.warning("step %d: non-finite loss, gradient or weight (loss %s); step skipped, last finite state restored",
                        step + 1, out.loss)
            if consecutive >= settings.max_consecutive_faults:
                # Keys read off the algorithm's Hparams model: the hint never names one that does not exist.
                rates = learning_rate_keys(learner.name, getattr(learner, "hparams_class", Hparams))
                raise NumericalFaultError(
                    f"{learner.name}: {consecutive} consecutive steps with a non-finite loss, gradient or "
                    f"weight (last loss {out.loss}) at step {step + 1}; {result.faults} skipped in total "
                    f"(limit meta_train.max_consecutive_faults={settings.max_consecutive_faults}). Lower the "
                    f"learning rates ({', '.join(rates)}) and re-run."
                )
            continue
        consecutive = 0
        step += 1
        last_good.save()
        result.history.append({"step": step, "loss": out.loss, "acc": out.acc})
        emit("meta_train/loss", out.loss, step)
        emit("meta_train/query_acc", out.acc, step)
        if on_step is not None:
            on_step(step, out.loss, out.acc)
        due = step % settings.val_every == 0 or (
            settings.val_every_s > 0 and clock() - last_val >= settings.val_every_s
        )
        if dist_ctx is not None and settings.val_every_s > 0:
            due = dist_ctx.agree(due, device)  # rank 0's clock decides for all
        if due:
            validate(step)
        if checkpoint is not None and checkpoint.every > 0 and step % checkpoint.every == 0:
            snapshot(final=False)

    if not result.val_curve or result.val_curve[-1]["step"] != step:
        validate(step)
    if not finished:
        snapshot(final=True)  # a re-run after a kill later in the stage skips this algorithm
    if best_state is not None:
        learner.load_state_dict(best_state)
    if settings.channels_last:
        learner.to(memory_format=torch.contiguous_format)
    result.steps_done = step
    result.seconds = clock() - start
    result.train_seconds = train_seconds()
    if result.budget_hit:
        log.warning("%s: the wall-clock guard (time_budget_s=%g) ended meta-training after %d of %d steps: "
                    "the weights depend on the machine's speed and load, not only on the params; remove the "
                    "guard or raise it to reproduce", learner.name, settings.time_budget_s, step, settings.steps)
    if dist_ctx is None or dist_ctx.is_main:  # the other ranks do not validate
        log.info(
            "%s: %d steps in %.1f s, best val acc %.4f at step %d, %d skipped faults",
            learner.name, step, result.seconds, result.best_val_acc, result.best_step, result.faults,
        )
    return result
