"""Cost of one meta-training step and of one evaluation episode, per algorithm (CPU).

Usage (from the project root):

    .venv/bin/python benchmarks/bench_algorithms.py [--quick] [--threads 2]
        [--algorithms maml,protonet] [--meta-batch 1] [--maml-tasks 32]

Episode shape: 5-way 1-shot 15-query, 28x28 grey, Conv-4 hidden 64
(`BackboneSpec()`), real Omniglot images from `data/prepared` (meta_train,
rotation augmentation on; evaluation episodes from meta_test).

Prints, then sums up in markdown tables:

1. the floor: a plain Conv-4 + linear head forward+backward (cross-entropy)
   over the 80 images of one episode, median ms per step;
2. per registered algorithm: the median time of one meta-training step
   (`zero_grad` + `meta_learn(meta_batch episodes)`, no optimizer step), its
   ratio to the floor per episode, episodes/s, and the peak-RSS increase over
   the warm-up and timed steps (each algorithm runs in its own fresh
   subprocess, so `ru_maxrss` peaks do not carry over between algorithms);
3. second-order MAML over a meta-batch of 32 tasks (1 inner step) against a
   plain `torch.func` loop written here, alternating in one process (seconds
   per meta-batch), with a check that both give the same meta-gradient, and
   the peak RSS of each in its own subprocess;
4. per algorithm: the median time of one evaluation episode (`adapt` on the
   support set + `predict` on the 75 queries) at 5-way 1-shot and 5-shot,
   which sizes the `evaluate` stage.

Learners are freshly initialised (not meta-trained): every algorithm here
does a fixed amount of work per step or per episode, so the weights do not
change the timings. Every figure is the median over repetitions after a
warm-up; the load average is printed because other processes on the cores
change these figures a lot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metatransfer.algorithms import CATALOG, build_algorithm
from metatransfer.data.store import SplitData, load_split
from metatransfer.episodes import Episode, EpisodeSampler
from metatransfer.errors import DataError
from metatransfer.models import BackboneSpec, build_backbone

ROOT = Path(__file__).resolve().parents[1]
N_WAY, K_SHOT, N_QUERY = 5, 1, 15
EVAL_SHOTS = (1, 5)
# 964 Omniglot background characters x 4 rotations (the brief's figure; the
# meta_train split itself holds fewer when meta_val classes are held out).
DEFAULT_NUM_CLASSES = 3856
RESULT_MARK = "RESULT "


@dataclass(frozen=True)
class Budget:
    """How long each measurement runs: warm-up calls, then reps until `max_reps` or `seconds`."""

    warmup: int
    min_reps: int
    max_reps: int
    seconds: float


TRAIN = {"quick": Budget(1, 2, 10, 1.5), "full": Budget(3, 5, 50, 10.0)}
EVAL = {"quick": Budget(1, 2, 5, 1.0), "full": Budget(2, 3, 30, 8.0)}
# Meta-batch-32 MAML vs the reference: (pairs of alternated timings).
MAML_PAIRS = {"quick": 2, "full": 5}


# --------------------------------------------------------------------------- helpers
def maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux); False where unsupported.

    `ru_maxrss` is a high-water mark: without a reset, the peaks of data
    loading (the images, their pre-rotated copies) would hide smaller peaks
    of the steps. Writing 5 to /proc/self/clear_refs resets it (Linux >= 4.0).
    """
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def time_calls(fn: Callable[[int], object], budget: Budget) -> list[float]:
    """Seconds per call of fn(i) after `budget.warmup` untimed calls.

    Args:
        fn: the work; receives the call index (to rotate through inputs).
        budget: warm-up count, repetition bounds and time budget.

    Returns:
        One duration per timed call.
    """
    return time_interleaved([fn], budget)[0]


def time_interleaved(fns: Sequence[Callable[[int], object]], budget: Budget) -> list[list[float]]:
    """Time several functions call by call in turn (A B A B ...), each warmed up first.

    Interleaving makes a change in the load of the machine hit every function
    alike, so ratios between them stay meaningful on a shared machine.

    Args:
        fns: the works; each receives the call index.
        budget: warm-up count (per function), repetition bounds and time budget
            (for all functions together).

    Returns:
        One list of durations per function, in the order of `fns`.
    """
    for fn in fns:
        for i in range(budget.warmup):
            fn(i)
    out: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    i = budget.warmup
    while len(out[0]) < budget.max_reps and (
        len(out[0]) < budget.min_reps or time.perf_counter() - start < budget.seconds
    ):
        for fn, times in zip(fns, out, strict=True):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        i += 1
    return out


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and count of a list of durations, in ms."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "n": int(ms.size)}


def synthetic_split(name: str, n_classes: int, per_class: int, seed: int) -> SplitData:
    """Random uint8 28x28 images, used only when the prepared store is missing."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_classes * per_class, 1, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    names = tuple(f"synthetic/{name}/{c:04d}" for c in range(n_classes))
    return SplitData("synthetic", name, images, labels, names)


def load_data(prepared: Path) -> tuple[SplitData, SplitData]:
    """(meta_train split, evaluation split); synthetic when the store is missing."""
    if not (prepared / "omniglot" / "manifest.parquet").is_file():
        return synthetic_split("meta_train", 964, 20, 0), synthetic_split("meta_test", 659, 20, 1)
    train = load_split(prepared, "omniglot", "meta_train")
    try:
        test = load_split(prepared, "omniglot", "meta_test")
    except DataError:  # a store without meta_test: time the evaluation on meta_train
        test = train
    return train, test


def episode_pool(sampler: EpisodeSampler, n: int) -> list[Episode]:
    """Pre-sample n episodes so that sampling stays out of the timings."""
    return [sampler.sample() for _ in range(n)]


# --------------------------------------------------------------------------- reference MAML
class ReferenceNet(nn.Module):
    """Conv-4 (per-batch BatchNorm) + linear head; same parameter names as MAML's `Classifier`."""

    def __init__(self, spec: BackboneSpec, n_way: int) -> None:
        super().__init__()
        self.backbone = build_backbone(spec, track_running_stats=False)
        self.head = nn.Linear(self.backbone.out_dim, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_way)."""
        return self.head(self.backbone(x))


def reference_maml_step(model: nn.Module, episodes: Sequence[Episode], inner_lr: float) -> float:
    """One second-order MAML meta-gradient, the plain way: all task graphs, one backward.

    Args:
        model: the network θ (its `.grad` are overwritten).
        episodes: the meta-batch.
        inner_lr: inner SGD step size (one inner step).

    Returns:
        The mean query loss.
    """
    params = dict(model.named_parameters())
    for p in params.values():
        p.grad = None
    losses = []
    for ep in episodes:
        support_loss = F.cross_entropy(functional_call(model, params, (ep.support_x,)), ep.support_y)
        grads = torch.autograd.grad(support_loss, tuple(params.values()), create_graph=True)
        fast = {k: p - inner_lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
        losses.append(F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y))
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss.detach())


# --------------------------------------------------------------------------- workers
def levers(spec: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast when `--fast` (the trainer's `precision: bf16`), else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(spec.get("fast")))


def floor_step(train: SplitData, spec: dict[str, Any]) -> Callable[[int], None]:
    """The floor: zero_grad + Conv-4 + linear forward + cross-entropy + backward on 80 images."""
    sampler = EpisodeSampler(train, N_WAY, K_SHOT, N_QUERY, seed=0, rotation_augment=True)
    batches = [
        (torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y]))
        for ep in episode_pool(sampler, 8)
    ]
    backbone = build_backbone(BackboneSpec(), track_running_stats=True)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, N_WAY)).train()
    if spec.get("fast"):
        model.to(memory_format=torch.channels_last)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        model.zero_grad(set_to_none=True)
        with levers(spec):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    return step


def worker_floor(spec: dict[str, Any], train: SplitData) -> dict[str, Any]:
    """Time the floor alone and its peak-RSS increase."""
    step = floor_step(train, spec)
    peak_reset = reset_peak_rss()
    rss0 = maxrss_mib()
    times = time_calls(step, TRAIN[spec["mode"]])
    return {"train": summary(times), "rss_before_mib": rss0, "peak_reset": peak_reset, "rss_peak_mib": maxrss_mib()}


def worker_algorithm(spec: dict[str, Any], train: SplitData, test: SplitData) -> dict[str, Any]:
    """Meta-train step and evaluation-episode timings of one algorithm."""
    name, mb = spec["algorithm"], spec["meta_batch"]
    sampler = EpisodeSampler(train, N_WAY, K_SHOT, N_QUERY, seed=0, rotation_augment=True)
    pool = episode_pool(sampler, max(8, mb))
    for ep in pool:
        if ep.classes is not None and int(ep.classes.max()) >= spec["num_classes"]:
            raise SystemExit(
                f"episode class id {int(ep.classes.max())} >= --num-classes {spec['num_classes']}; "
                "raise --num-classes"
            )
    torch.manual_seed(0)
    learner = build_algorithm(name, BackboneSpec(), N_WAY, None, num_classes=spec["num_classes"])
    learner.train()
    if spec.get("fast"):
        learner.to(memory_format=torch.channels_last)

    def step(i: int) -> None:
        batch = [pool[(i * mb + j) % len(pool)] for j in range(mb)]
        learner.zero_grad(set_to_none=True)
        with levers(spec):
            learner.meta_learn(batch)

    budget = TRAIN[spec["mode"]]
    # Memory first, the algorithm alone: its warm-up steps reach the peak of
    # its steps; the floor (timed next, interleaved) must not add to it.
    peak_reset = reset_peak_rss()
    rss0 = maxrss_mib()
    for i in range(budget.warmup):
        step(i)
    rss1 = maxrss_mib()
    floor = floor_step(train, spec)
    for i in range(budget.warmup):
        floor(i)
    # Both are warm now: interleave without a second warm-up.
    train_times, floor_times = time_interleaved([step, floor], replace(budget, warmup=0))
    out: dict[str, Any] = {
        "train": summary(train_times),
        "floor": summary(floor_times),
        "rss_before_mib": rss0, "peak_reset": peak_reset,
        "rss_peak_mib": rss1,
        "params": sum(p.numel() for p in learner.parameters()),
    }

    learner.eval()
    for shots in EVAL_SHOTS:
        eval_sampler = EpisodeSampler(test, N_WAY, shots, N_QUERY, seed=1)
        eval_pool = episode_pool(eval_sampler, 4)

        def episode(i: int, eval_pool: list[Episode] = eval_pool) -> None:
            ep = eval_pool[i % len(eval_pool)]
            unlabeled = ep.query_x if learner.transductive else None
            predictor = learner.adapt(ep.support_x, ep.support_y, ep.n_way, unlabeled_x=unlabeled)
            with torch.no_grad():
                predictor(ep.query_x)

        out[f"eval_{shots}shot"] = summary(time_calls(episode, EVAL[spec["mode"]]))
    return out


def maml_pair(spec: dict[str, Any], train: SplitData) -> tuple[Any, ReferenceNet, list[list[Episode]]]:
    """A MAML learner, a reference net with the same weights, and meta-batches of `maml_tasks`."""
    tasks = spec["maml_tasks"]
    sampler = EpisodeSampler(train, N_WAY, K_SHOT, N_QUERY, seed=0, rotation_augment=True)
    batches = [episode_pool(sampler, tasks) for _ in range(2)]
    torch.manual_seed(0)
    maml = build_algorithm("maml", BackboneSpec(), N_WAY, {"inner_steps": 1})
    maml.train()
    ref = ReferenceNet(BackboneSpec(), N_WAY)
    ref.load_state_dict(maml.model.state_dict())
    ref.train()
    return maml, ref, batches


def worker_maml_compare(spec: dict[str, Any], train: SplitData) -> dict[str, Any]:
    """Alternate MAML and reference meta-batches; check their meta-gradients agree."""
    maml, ref, batches = maml_pair(spec, train)
    lr = maml.hparams.inner_lr

    def run_maml(i: int) -> None:
        maml.zero_grad(set_to_none=True)
        maml.meta_learn(batches[i % 2])

    def run_ref(i: int) -> None:
        reference_maml_step(ref, batches[i % 2], lr)

    # Same weights, same meta-batch: the two meta-gradients must agree.
    run_maml(0)
    run_ref(0)
    ref_grads = dict(ref.named_parameters())
    worst = 0.0
    for name, p in maml.model.named_parameters():
        g_ref = ref_grads[name].grad
        scale = float(g_ref.abs().max()) or 1.0
        worst = max(worst, float((p.grad - g_ref).abs().max()) / scale)

    times: dict[str, list[float]] = {"maml": [], "ref": []}
    for i in range(MAML_PAIRS[spec["mode"]]):
        # ABBA order so that a drifting load hits both alike.
        order = [("maml", run_maml), ("ref", run_ref)]
        for key, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn(i)
            times[key].append(time.perf_counter() - t0)
    return {
        "maml": summary(times["maml"]),
        "ref": summary(times["ref"]),
        "grad_max_rel_diff": worst,
    }


def worker_maml_memory(spec: dict[str, Any], train: SplitData) -> dict[str, Any]:
    """Peak RSS increase of one meta-batch of `spec['variant']` (maml or ref)."""
    maml, ref, batches = maml_pair(spec, train)
    peak_reset = reset_peak_rss()
    rss0 = maxrss_mib()
    if spec["variant"] == "maml":
        maml.zero_grad(set_to_none=True)
        maml.meta_learn(batches[0])
    else:
        reference_maml_step(ref, batches[0], maml.hparams.inner_lr)
    return {"rss_before_mib": rss0, "peak_reset": peak_reset, "rss_peak_mib": maxrss_mib()}


def run_worker(spec: dict[str, Any]) -> None:
    """Entry of a measurement subprocess: print one RESULT line of JSON."""
    torch.set_num_threads(spec["threads"])
    train, test = load_data(Path(spec["prepared"]))
    load = os.getloadavg()[0]
    kind = spec["kind"]
    if kind == "floor":
        out = worker_floor(spec, train)
    elif kind == "algorithm":
        out = worker_algorithm(spec, train, test)
    elif kind == "maml_compare":
        out = worker_maml_compare(spec, train)
    else:
        out = worker_maml_memory(spec, train)
    out["load_start"] = load
    out["load_end"] = os.getloadavg()[0]
    print(RESULT_MARK + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent
def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; return its result or {'error': ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def fmt_ms(s: dict[str, float] | None) -> str:
    """'median [q1-q3]' in ms, or '-' when missing."""
    if not s:
        return "-"
    return f"{s['median_ms']:.1f} [{s['q1_ms']:.1f}-{s['q3_ms']:.1f}]"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run one subprocess per measurement, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a minute or two)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--algorithms",
        default=",".join(CATALOG),
        help="comma-separated registry names (default: all registered)",
    )
    parser.add_argument("--meta-batch", type=int, default=1, help="episodes per meta-train step")
    parser.add_argument(
        "--maml-tasks", type=int, default=32, help="tasks per meta-batch in the MAML vs reference part (0 skips it)"
    )
    parser.add_argument("--num-classes", type=int, default=DEFAULT_NUM_CLASSES,
                        help="global classes of the supervised baselines' head (default 3856)")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--fast", action="store_true",
                        help="bfloat16 autocast + channels-last weights in the training steps "
                             "(meta_train.precision: bf16, channels_last: true)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return

    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATALOG]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; valid: {', '.join(CATALOG)}")
    if args.meta_batch < 1 or args.threads < 1:
        parser.error("--meta-batch and --threads must be >= 1")
    mode = "quick" if args.quick else "full"
    base = {"mode": mode, "threads": args.threads, "prepared": str(args.prepared.resolve()),
            "meta_batch": args.meta_batch, "num_classes": args.num_classes,
            "maml_tasks": args.maml_tasks, "fast": args.fast}

    if not (args.prepared / "omniglot" / "manifest.parquet").is_file():
        print(f"WARNING: {args.prepared / 'omniglot'} is not prepared: run `dvc repro prepare` first. "
              "Timing on SYNTHETIC random images of the same shape instead.", flush=True)
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
               f"threads {args.threads}")
    load_start = os.getloadavg()
    print(f"machine: {machine}", flush=True)
    print(f"mode {mode}; episode {N_WAY}-way {K_SHOT}-shot {N_QUERY}-query 28x28x1, Conv-4 hidden 64; "
          f"meta-batch {args.meta_batch}; {'bf16 autocast + channels-last' if args.fast else 'fp32'}; num_classes {args.num_classes}; "
          f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    t_all = time.perf_counter()

    floor = spawn({**base, "kind": "floor"})
    if "error" in floor:
        raise SystemExit(f"floor measurement failed: {floor['error']}")
    floor_ms = floor["train"]["median_ms"]
    print(f"floor (Conv-4 + linear fwd+bwd, 80 images): {fmt_ms(floor['train'])} ms, "
          f"n={floor['train']['n']}, load {floor['load_start']:.2f}", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        r = spawn({**base, "kind": "algorithm", "algorithm": name})
        results[name] = r
        if "error" in r:
            print(f"{name}: FAILED {r['error']}", flush=True)
            continue
        print(f"{name}: step {fmt_ms(r['train'])} ms (n={r['train']['n']}), "
              f"floor beside it {fmt_ms(r['floor'])} ms, "
              f"eval 1-shot {fmt_ms(r['eval_1shot'])} ms, 5-shot {fmt_ms(r['eval_5shot'])} ms, "
              f"peak RSS +{r['rss_peak_mib'] - r['rss_before_mib']:.0f} MiB, "
              f"load {r['load_start']:.2f}->{r['load_end']:.2f}, {time.perf_counter() - t0:.0f} s",
              flush=True)

    cmp_: dict[str, Any] | None = None
    mem: dict[str, dict[str, Any]] = {}
    if args.maml_tasks > 0:
        cmp_ = spawn({**base, "kind": "maml_compare"})
        for variant in ("maml", "ref"):
            mem[variant] = spawn({**base, "kind": "maml_memory", "variant": variant})
        if "error" in cmp_:
            print(f"MAML vs reference: FAILED {cmp_['error']}", flush=True)
        else:
            print(f"MAML x{args.maml_tasks} tasks: algorithm {fmt_ms(cmp_['maml'])} ms, "
                  f"reference {fmt_ms(cmp_['ref'])} ms, meta-gradient max rel. diff "
                  f"{cmp_['grad_max_rel_diff']:.1e}, load {cmp_['load_start']:.2f}", flush=True)

    # ------------------------------------------------------------------ tables
    print()
    print(f"## Meta-train step and evaluation episode, {N_WAY}-way {K_SHOT}-shot {N_QUERY}-query "
          f"(meta-batch {args.meta_batch}), {mode} mode")
    print()
    print(f"Machine: {machine}. Load average at start {load_start[0]:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}. Data: {load_data_description(args.prepared)}.")
    print("Times: median [quartiles] in ms. Floor: zero_grad + Conv-4 + linear forward + "
          "cross-entropy + backward on the 80 images of one episode, re-timed in each row's "
          "process, interleaved step by step with the algorithm's steps; x floor = "
          "(step time / meta-batch) / that floor. Peak RSS: ru_maxrss increase over the "
          "warm-up steps, the algorithm alone in a fresh process "
          f"({peak_note(results.values())}). Eval: adapt on the support "
          "set + predict the 75 queries. Load: 1-min load average when the row started.")
    print()
    print("| algorithm | meta-train step ms | floor ms | x floor | episodes/s | peak RSS +MiB | "
          "eval 1-shot ms | eval 5-shot ms | reps (step/1/5) | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| floor alone | {fmt_ms(floor['train'])} | - | 1.00 | "
          f"{1e3 / floor_ms:.1f} | {floor['rss_peak_mib'] - floor['rss_before_mib']:.0f} | - | - | "
          f"{floor['train']['n']} | {floor['load_start']:.2f} |")
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        step_ms = r["train"]["median_ms"]
        local_floor = r["floor"]["median_ms"]
        print(f"| {name} | {fmt_ms(r['train'])} | {local_floor:.1f} | "
              f"{step_ms / args.meta_batch / local_floor:.2f} | "
              f"{args.meta_batch * 1e3 / step_ms:.1f} | {r['rss_peak_mib'] - r['rss_before_mib']:.0f} | "
              f"{fmt_ms(r['eval_1shot'])} | {fmt_ms(r['eval_5shot'])} | "
              f"{r['train']['n']}/{r['eval_1shot']['n']}/{r['eval_5shot']['n']} | "
              f"{r['load_start']:.2f} |")
    if cmp_ is not None and "error" not in cmp_:
        print()
        print(f"## Second-order MAML, meta-batch {args.maml_tasks} tasks, 1 inner step "
              f"(alternated in one process, {cmp_['maml']['n']} runs each)")
        print()
        print("| implementation | s per meta-batch (median [quartiles]) | episodes/s | peak RSS +MiB |")
        print("|---|---:|---:|---:|")
        labels = {"maml": "metatransfer MAML (one backward per task)",
                  "ref": "reference torch.func loop (one backward for all tasks)"}
        for key in ("maml", "ref"):
            s = cmp_[key]
            m = mem.get(key, {})
            rss = f"{m['rss_peak_mib'] - m['rss_before_mib']:.0f}" if "rss_peak_mib" in m else "-"
            print(f"| {labels[key]} | {s['median_ms'] / 1e3:.2f} [{s['q1_ms'] / 1e3:.2f}-"
                  f"{s['q3_ms'] / 1e3:.2f}] | {args.maml_tasks * 1e3 / s['median_ms']:.1f} | {rss} |")
        print()
        print(f"Meta-gradients agree: max |g_maml - g_ref| / max |g_ref| over parameters = "
              f"{cmp_['grad_max_rel_diff']:.1e}.")
    print()
    print(f"Total wall time {time.perf_counter() - t_all:.0f} s.")


def peak_note(results: Any) -> str:
    """Say whether the RSS peaks were reset before the steps (else they are lower bounds)."""
    if all(r.get("peak_reset", False) for r in results if "error" not in r):
        return "peak reset to the current RSS via /proc/self/clear_refs before the steps"
    return "peak NOT reset on this OS: the figure is a lower bound hidden by earlier peaks"


def load_data_description(prepared: Path) -> str:
    """One line naming the data the workers timed on."""
    if not (prepared / "omniglot" / "manifest.parquet").is_file():
        return "SYNTHETIC random images (data/prepared missing: run `dvc repro prepare` first)"
    return "omniglot meta_train (train steps, rotation augmentation) and meta_test (eval) from data/prepared"


if __name__ == "__main__":
    main()
