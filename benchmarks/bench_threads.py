"""Meta-train step time vs threads and CPU contention, and what `runtime.threads` avoids.

    python benchmarks/bench_threads.py                 # ProtoNet and MAML, the table for RESULTS.md
    python benchmarks/bench_threads.py --steps 10 --algorithms protonet

Every measurement runs in a fresh worker process (this script with
`--worker`) whose torch intra-op threads and OMP/MKL_NUM_THREADS are set
before the first tensor op, as `metatransfer.runtime.apply` does in a stage.
Measured conditions, all in one run so their ratios share the machine's state:

- `idle`: the worker alone, at 1 and 2 threads;
- `+1 busy`: beside one competing CPU-bound process (a pure-Python spin loop
  this script starts and stops itself), at 1 and 2 threads;
- `2 procs x T`: two workers at once, each with T threads (2 x 2 on a 2-core
  machine is what happens when two stages or two jobs each size their thread
  pool to the whole machine: oversubscription; 2 x 1 is what a per-process
  `runtime.threads: 1` gives).

Ratios are against `idle, 1 thread` of the same algorithm. The step is the
pipeline's (5-way 1-shot, 15 queries, meta-batch 4, Conv-4 on 28x28 images;
random pixels: the arithmetic does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- worker
def worker(algorithm: str, threads: int, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Time `steps` meta-training steps (after `warmup`) in this process; returns ms per step."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch

    from metatransfer import runtime
    from metatransfer.algorithms import build_algorithm
    from metatransfer.data.store import SplitData
    from metatransfer.models import BackboneSpec
    from metatransfer.training.sources import mixed_source_sampler

    runtime.apply(runtime.RuntimeSettings(device=device, threads=threads, deterministic=False), warn_load=False)
    rng = np.random.default_rng(0)
    split = SplitData(dataset="synthetic", split="meta_train",
                      images=rng.integers(0, 256, (40 * 20, 1, 28, 28), dtype=np.uint8),
                      labels=np.repeat(np.arange(40), 20), class_names=tuple(f"c{i}" for i in range(40)))
    source = mixed_source_sampler([split], [1.0], 5, 1, 15, seed=0, rotation_augment=False)
    torch.manual_seed(0)
    dev = runtime.resolve_device(device)
    learner = build_algorithm(algorithm, BackboneSpec(name="conv4", in_channels=1, image_size=28, hidden=64), 5,
                              None, num_classes=source.num_classes).to(dev)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        batch = [source.sample() for _ in range(4)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        learner.meta_learn(batch)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return {"algorithm": algorithm, "threads": threads, "device": device, "ms_median": statistics.median(times),
            "ms_mean": statistics.fmean(times), "steps": steps}


def run_workers(algorithm: str, threads: int, n: int, steps: int, warmup: int, device: str = "cpu") -> list[dict[str, Any]]:
    """Start `n` workers at once; wait for all; return their results."""
    cmd = [sys.executable, str(HERE), "--worker", "--algorithms", algorithm, "--threads", str(threads),
           "--steps", str(steps), "--warmup", str(warmup), "--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode}):\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


class Spinner:
    """One competing CPU-bound process (a pure-Python busy loop) for the duration of a `with`."""

    def __enter__(self) -> Spinner:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)  # let it reach the run queue
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- main
def measure(algorithms: list[str], steps: dict[str, int], warmup: int) -> list[dict[str, Any]]:
    """Every condition of the module doc for every algorithm; rows with ms/step and ratios."""
    rows = []
    for algo in algorithms:
        s = steps[algo]
        base = None
        conditions = []
        for threads in (1, 2):
            conditions.append((f"idle, {threads} thread{'s' if threads > 1 else ''}", threads, 1, False))
        for threads in (1, 2):
            conditions.append((f"+1 busy process, {threads} thread{'s' if threads > 1 else ''}", threads, 1, True))
        for threads in (1, 2):
            conditions.append((f"2 processes x {threads} thread{'s' if threads > 1 else ''}", threads, 2, False))
        for label, threads, n, busy in conditions:
            if busy:
                with Spinner():
                    res = run_workers(algo, threads, n, s, warmup)
            else:
                res = run_workers(algo, threads, n, s, warmup)
            ms = statistics.fmean(r["ms_median"] for r in res)
            base = base if base is not None else ms
            # Throughput: steps per second of all workers together.
            rows.append({"algorithm": algo, "condition": label, "threads": threads, "processes": n,
                         "ms_per_step": round(ms, 1), "ratio_vs_idle_1t": round(ms / base, 2),
                         "steps_per_s_total": round(n * 1000 / ms, 2)})
            print(f"{algo:9s} {label:32s} {ms:8.1f} ms/step  x{ms / base:.2f}  "
                  f"{n * 1000 / ms:6.2f} steps/s total", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table for benchmarks/RESULTS.md."""
    lines = ["| algorithm | condition | ms / step (median) | × idle 1 thread | steps/s, all processes |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['condition']} | {r['ms_per_step']} | {r['ratio_vs_idle_1t']} | "
                     f"{r['steps_per_s_total']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry: see the module doc."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default="protonet,maml")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per worker (default: 30 ProtoNet, 8 MAML)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    if args.worker:
        print(json.dumps(worker(algorithms[0], args.threads, args.steps or 10, args.warmup, args.device)))
        return 0
    steps = {a: args.steps or (30 if a != "maml" else 8) for a in algorithms}
    load0 = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores {cores}, load average at start {load0:.2f}", flush=True)
    t0 = time.perf_counter()
    rows = measure(algorithms, steps, args.warmup)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}, {time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"cores": cores, "load_start": load0, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
