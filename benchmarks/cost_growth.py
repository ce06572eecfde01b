"""How cost grows: per-unit costs of each pipeline part, measured as ratios within one run (issue 14, item 6).

Measures, with the project's own library functions on real mini-ImageNet
files from the dataset mirror (first 5 classes of each csv split, prepared at
32 px, 3 channels, in a temporary folder):

(a) prepare: wall time of `metatransfer.data.prepare.prepare` for three slice
    sizes (about 100 / 200 / 400 images; `fetch` timed apart), fitted as a
    fixed part + seconds per image;
(b) meta-train: `metatransfer.training.meta_train.meta_train`, ProtoNet,
    Conv-4 at 32 px, 5-way 1-shot 15-query, meta-batch 1 / 2 / 4 at the same
    steps, and meta-batch 2 at 1x and 2x the steps (linearity in steps);
(c) evaluate: `metatransfer.evaluation.episodic.episode_accuracies` of the
    ProtoNet learner on 10 / 20 / 40 fixed 5-way 5-shot episodes of the
    slice's meta_test split;
(d) MLflow logging: `metatransfer.tracking.metric_sink(max_entries=1)` (one call per metric,
    as meta_train logged before the sink batched) and `log_metrics` (one batch) of 100 / 1000 metrics to
    a fresh sqlite store (`tracking.configure` on a temporary folder, WAL), and
    the same calls to a null sink;
(e) distributed meta-training: the same ProtoNet steps and meta-batch 4 in 1
    process vs 2 processes (`metatransfer.training.distributed`, gloo on
    loopback, started with torch.multiprocessing as
    tests/integration/test_distributed.py does), 1 thread per process.

Repetitions of each part are interleaved (the order reverses on odd
repetitions) so that a change of the machine's load hits every size alike;
each part reports the median per condition and ratios to its smallest
condition. What 2 Dask workers buy is not re-measured here: see
benchmarks/RESULTS.md, section 8.

Usage (from the project root, with `-m`: the mirror slices come from
tests/slices.py, which is not installed and needs the root on sys.path):

    nice -n 10 python -m benchmarks.cost_growth --quick   # < 6 min on one busy core
    python -m benchmarks.cost_growth                      # more steps, episodes and repetitions

Writes benchmarks/results/cost_growth[-quick].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = ROOT.parent / "shared" / "datasets"
SIZE = 32
N_WAY, K_SHOT, N_QUERY = 5, 1, 15


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _interleaved(conditions: list[Any], reps: int) -> list[Any]:
    """Each condition `reps` times, in order on even repetitions and reversed on odd ones."""
    order: list[Any] = []
    for r in range(reps):
        order.extend(conditions if r % 2 == 0 else list(reversed(conditions)))
    return order


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x over all repetitions: (a, b)."""
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


# ---------------------------------------------------------------------------- (a) prepare

def bench_prepare(mirror: Path, tmp: Path, per_class: list[int], reps: int) -> tuple[dict[str, Any], Path]:
    """Prepare slices of `per_class` images per class (5 classes x 3 csv splits); return rows and the largest store."""
    from tests.slices import slice_mini_imagenet  # the project root is on sys.path: run with -m

    from metatransfer.config import PrepareParams
    from metatransfer.data.fetch import fetch
    from metatransfer.data.prepare import prepare

    params = PrepareParams(image_size=SIZE, channels=3, omniglot_protocol="background_evaluation", meta_val_classes=0)
    raws: dict[int, Path] = {}
    fetch_s: dict[int, float] = {}
    for k in per_class:
        slim = slice_mini_imagenet(tmp / f"mirror{k}", mirror, n_classes=5, per_class=k)
        assert all(len(v) == 5 for v in slim.values()), slim
        t0 = time.perf_counter()
        fetch("mini_imagenet", tmp / f"raw{k}", tmp / f"mirror{k}")
        fetch_s[k] = time.perf_counter() - t0
        raws[k] = tmp / f"raw{k}"
    walls: dict[int, list[float]] = {k: [] for k in per_class}
    images: dict[int, int] = {}
    prepare(params, ("mini_imagenet",), raws[per_class[0]], tmp / "warm", seed=0)  # imports, first-call costs
    for k in _interleaved(per_class, reps):
        out = tmp / f"prepared{k}"
        t0 = time.perf_counter()
        report = prepare(params, ("mini_imagenet",), raws[k], out, seed=0)
        walls[k].append(time.perf_counter() - t0)
        images[k] = report.n_images
    xs = [images[k] for k in per_class for _ in walls[k]]
    ys = [w for k in per_class for w in walls[k]]
    fixed, per_image = _fit(xs, ys)
    base = statistics.median(walls[per_class[0]])
    rows = [{"images": images[k], "wall_s": statistics.median(walls[k]), "all_s": walls[k],
             "x_smallest": statistics.median(walls[k]) / base, "fetch_s": fetch_s[k]} for k in per_class]
    return {"rows": rows, "fixed_s": fixed, "s_per_image": per_image}, tmp / f"prepared{per_class[-1]}"


# ---------------------------------------------------------------------------- (b) meta-train

def _learner(seed: int = 0):
    from metatransfer.algorithms import build_algorithm
    from metatransfer.models import BackboneSpec

    torch.manual_seed(seed)
    return build_algorithm("protonet", BackboneSpec(name="conv4", in_channels=3, image_size=SIZE, hidden=64), N_WAY)


def _train(prepared: Path, steps: int, meta_batch: int, dist_ctx: Any = None):
    """One ProtoNet meta-training run of `steps` steps on the slice's meta_train split; (seconds, learner)."""
    from metatransfer.data.store import load_split
    from metatransfer.episodes import EpisodeSampler
    from metatransfer.training.meta_train import TrainSettings, meta_train

    sampler = EpisodeSampler(load_split(prepared, "mini_imagenet", "meta_train"), n_way=N_WAY, k_shot=K_SHOT,
                             n_query=N_QUERY, seed=0)
    learner = _learner()
    settings = TrainSettings(steps=steps, meta_batch_size=meta_batch, meta_lr=1e-3, val_every=steps + 1,
                             select_best=False)
    t0 = time.perf_counter()
    meta_train(learner, sampler.sample, [], settings, dist_ctx=dist_ctx)
    return time.perf_counter() - t0, learner


def bench_meta_train(prepared: Path, steps: int, reps: int) -> tuple[dict[str, Any], Any]:
    """Seconds per step vs meta-batch (1, 2, 4 at `steps`) and vs steps (meta-batch 2 at `steps` and 2x)."""
    conditions = [(steps, 1), (steps, 2), (steps, 4), (2 * steps, 2)]
    _train(prepared, 2, 1)  # warm-up: first-call costs of the kernels
    walls: dict[tuple[int, int], list[float]] = {c: [] for c in conditions}
    learner = None
    for c in _interleaved(conditions, reps):
        s, learner = _train(prepared, *c)
        walls[c].append(s)
    base = statistics.median(walls[conditions[0]]) / conditions[0][0]
    rows = []
    for st, mb in conditions:
        med = statistics.median(walls[(st, mb)])
        rows.append({"steps": st, "meta_batch": mb, "wall_s": med, "all_s": walls[(st, mb)], "s_per_step": med / st,
                     "s_per_episode": med / st / mb, "x_step_mb1": med / st / base})
    xs = [mb for st, mb in conditions[:3] for _ in walls[(st, mb)]]
    ys = [w / st for st, mb in conditions[:3] for w in walls[(st, mb)]]
    fixed, per_episode = _fit(xs, ys)
    steps_ratio = statistics.median(walls[conditions[3]]) / statistics.median(walls[conditions[1]])
    return {"rows": rows, "step_fixed_s": fixed, "s_per_episode": per_episode,
            "wall_ratio_2x_steps": steps_ratio}, learner


# ---------------------------------------------------------------------------- (c) evaluate

def bench_evaluate(prepared: Path, learner: Any, counts: list[int], reps: int) -> dict[str, Any]:
    """Seconds of `episode_accuracies` for the first n of a fixed list of 5-way 5-shot 15-query episodes."""
    from metatransfer.data.store import load_split
    from metatransfer.episodes import EpisodeSampler
    from metatransfer.evaluation.episodic import episode_accuracies

    sampler = EpisodeSampler(load_split(prepared, "mini_imagenet", "meta_test"), n_way=5, k_shot=5, n_query=15, seed=1)
    episodes = [sampler.sample() for _ in range(max(counts))]
    episode_accuracies(learner, episodes[:2])  # warm-up
    walls: dict[int, list[float]] = {n: [] for n in counts}
    for n in _interleaved(counts, reps):
        t0 = time.perf_counter()
        accs = episode_accuracies(learner, episodes[:n])
        walls[n].append(time.perf_counter() - t0)
        assert len(accs) == n
    fixed, per_episode = _fit([n for n in counts for _ in walls[n]], [w for n in counts for w in walls[n]])
    base = statistics.median(walls[counts[0]])
    rows = [{"episodes": n, "wall_s": statistics.median(walls[n]), "all_s": walls[n],
             "s_per_episode": statistics.median(walls[n]) / n, "x_smallest": statistics.median(walls[n]) / base}
            for n in counts]
    return {"rows": rows, "fixed_s": fixed, "s_per_episode": per_episode}


# ---------------------------------------------------------------------------- (d) MLflow

def bench_mlflow(tmp: Path, counts: list[int], reps: int) -> dict[str, Any]:
    """Seconds to log n metrics one call each (metric_sink), as one batch (log_metrics), and to a null sink."""
    from metatransfer import tracking

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the temporary store, never the project's
    store = tmp / "mlflow"
    store.mkdir()
    t0 = time.perf_counter()
    tracking.configure(store)
    setup_s = time.perf_counter() - t0

    def null(name: str, value: float, step: int) -> None:
        return None

    def per_call(sink: Callable[[str, float, int], None], n: int) -> float:
        t = time.perf_counter()
        for i in range(n):
            sink(f"m{i % 10}", float(i), i // 10)
        return time.perf_counter() - t

    def batch(n: int, rep: int) -> float:
        t = time.perf_counter()
        for start in range(0, n, 1000):  # MLflow takes at most 1000 metrics per batch
            tracking.log_metrics({f"b{i}": float(i) for i in range(start, min(n, start + 1000))}, step=rep)
        return time.perf_counter() - t

    walls: dict[tuple[str, int], list[float]] = {}
    with tracking.child_run("cost_growth"):
        # max_entries=1: a write per metric, what the sink did before it batched (RESULTS §9)
        with tracking.metric_sink(max_entries=1) as sink:
            sink("warm", 0.0, 0)
            for i, n in enumerate(_interleaved(counts, reps)):
                walls.setdefault(("null", n), []).append(per_call(null, n))
                walls.setdefault(("metric_sink", n), []).append(per_call(sink, n))
                walls.setdefault(("log_metrics", n), []).append(batch(n, i))
    rows = []
    for kind in ("null", "metric_sink", "log_metrics"):
        for n in counts:
            med = statistics.median(walls[(kind, n)])
            rows.append({"how": kind, "metrics": n, "wall_s": med, "all_s": walls[(kind, n)], "ms_per_metric": 1e3 * med / n})
    return {"rows": rows, "configure_s": setup_s, "store_mb": (store / "mlflow.db").stat().st_size / 2**20}


# ---------------------------------------------------------------------------- (e) torchrun-style ranks

def _rank(rank: int, world: int, port: int, prepared: str, steps: int, meta_batch: int, out: str) -> None:
    """One rank (or the single process when world == 1): train, write its seconds to `out`."""
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    ctx = None
    if world > 1:
        from metatransfer.training import distributed

        os.environ.update(distributed.spawn_env(rank, world, port))
        ctx = distributed.init_from_env()
    try:
        seconds, _ = _train(Path(prepared), steps, meta_batch, dist_ctx=ctx)
    finally:
        if ctx is not None:
            distributed.shutdown()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"train_s": seconds, "process_s": time.perf_counter() - t_start}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_ranks(prepared: Path, tmp: Path, steps: int, meta_batch: int, reps: int) -> dict[str, Any]:
    """Wall seconds of the same steps and meta-batch in 1 process vs 2 gloo ranks (spawned, 1 thread each)."""
    import torch.multiprocessing as mp

    walls: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for i, world in enumerate(_interleaved([1, 2], reps)):
        out = tmp / f"ranks{i}"
        out.mkdir()
        t0 = time.perf_counter()
        mp.spawn(_rank, args=(world, _free_port(), str(prepared), steps, meta_batch, str(out)), nprocs=world, join=True)
        spawn_s = time.perf_counter() - t0
        r0 = json.loads((out / "rank0.json").read_text())
        walls[world].append({"train_s": r0["train_s"], "spawn_s": spawn_s})
    rows = []
    for world in (1, 2):
        train = statistics.median(w["train_s"] for w in walls[world])
        spawn = statistics.median(w["spawn_s"] for w in walls[world])
        rows.append({"processes": world, "steps": steps, "meta_batch": meta_batch, "train_s": train, "spawn_total_s": spawn,
                     "s_per_step": train / steps, "all": walls[world]})
    rows[1]["x_one_process"] = rows[1]["train_s"] / rows[0]["train_s"]
    rows[0]["x_one_process"] = 1.0
    return {"rows": rows}


# ---------------------------------------------------------------------------- report

def table(res: dict[str, Any]) -> str:
    """The markdown table of every measured part."""
    lines = ["| part | condition | median wall s | per unit | × smallest condition |", "|---|---|---:|---:|---:|"]
    p = res["prepare"]
    for r in p["rows"]:
        lines.append(f"| (a) prepare 32 px | {r['images']} images (fetch {r['fetch_s']:.2f} s apart) | {r['wall_s']:.2f} | "
                     f"{1e3 * r['wall_s'] / r['images']:.1f} ms/image | {r['x_smallest']:.2f} |")
    lines.append(f"| (a) fit | wall = a + b × images | | a = {p['fixed_s']:.2f} s, b = {1e3 * p['s_per_image']:.2f} ms/image | |")
    m = res["meta_train"]
    for r in m["rows"]:
        lines.append(f"| (b) meta-train ProtoNet | {r['steps']} steps × meta-batch {r['meta_batch']} | {r['wall_s']:.2f} | "
                     f"{1e3 * r['s_per_step']:.0f} ms/step, {1e3 * r['s_per_episode']:.0f} ms/episode | {r['x_step_mb1']:.2f} (per step) |")
    lines.append(f"| (b) fit | s/step = a + b × meta-batch | | a = {1e3 * m['step_fixed_s']:.0f} ms, b = "
                 f"{1e3 * m['s_per_episode']:.0f} ms/episode | 2× steps: {m['wall_ratio_2x_steps']:.2f}× wall |")
    e = res["evaluate"]
    for r in e["rows"]:
        lines.append(f"| (c) evaluate ProtoNet 5-way 5-shot | {r['episodes']} episodes | {r['wall_s']:.2f} | "
                     f"{1e3 * r['s_per_episode']:.0f} ms/episode | {r['x_smallest']:.2f} |")
    lines.append(f"| (c) fit | wall = a + b × episodes | | a = {e['fixed_s']:.2f} s, b = {1e3 * e['s_per_episode']:.0f} ms/episode | |")
    f = res["mlflow"]
    batch = {r["metrics"]: r["wall_s"] for r in f["rows"] if r["how"] == "log_metrics"}
    for r in f["rows"]:
        x = r["wall_s"] / batch[r["metrics"]]
        lines.append(f"| (d) MLflow sqlite, {r['how']} | {r['metrics']} metrics | {r['wall_s']:.4f} | "
                     f"{1e3 * r['ms_per_metric']:.2f} µs/metric | {x:.3g} (× one log_metrics batch) |")
    d = res["ranks"]
    for r in d["rows"]:
        lines.append(f"| (e) meta-train, gloo ranks | {r['processes']} process(es), {r['steps']} steps × meta-batch "
                     f"{r['meta_batch']} | {r['train_s']:.2f} (spawn to join {r['spawn_total_s']:.1f}) | "
                     f"{1e3 * r['s_per_step']:.0f} ms/step | {r['x_one_process']:.2f} |")
    lines.append("| (f) 2 Dask workers | shrunk pipeline | | | see RESULTS section 8 |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the five parts, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2-3 repetitions (< 6 min on one busy core)")
    ap.add_argument("--mirror", default=os.environ.get("METATRANSFER_MIRROR") or str(DEFAULT_MIRROR))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (ranks: 1 each)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary stores")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cost_growth[-quick].json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.quick:
        per_class, reps, steps, counts, metric_counts, rank_steps = [7, 14, 27], 3, 10, [10, 20, 40], [100, 1000], 10
    else:
        per_class, reps, steps, counts, metric_counts, rank_steps = [14, 27, 54], 5, 30, [25, 50, 100], [100, 1000, 5000], 30
    res: dict[str, Any] = {"command": " ".join(sys.argv), "quick": args.quick, "threads": args.threads,
                           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "load_start": _load()}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cost_growth-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        res["prepare"], prepared = bench_prepare(Path(args.mirror), tmp, per_class, reps)
        res["prepare"]["part_s"] = time.perf_counter() - t
        res["load_after_prepare"] = _load()
        t = time.perf_counter()
        res["meta_train"], learner = bench_meta_train(prepared, steps, max(2, reps - 1))
        res["meta_train"]["part_s"] = time.perf_counter() - t
        res["load_after_meta_train"] = _load()
        t = time.perf_counter()
        res["evaluate"] = bench_evaluate(prepared, learner, counts, reps)
        res["evaluate"]["part_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res["mlflow"] = bench_mlflow(tmp, metric_counts, max(2, reps - 1))
        res["mlflow"]["part_s"] = time.perf_counter() - t
        res["load_after_mlflow"] = _load()
        t = time.perf_counter()
        res["ranks"] = bench_ranks(prepared, tmp, rank_steps, 4, max(2, reps - 1))
        res["ranks"]["part_s"] = time.perf_counter() - t
    res["dask"] = "not re-measured: benchmarks/RESULTS.md section 8 (shrunk pipeline, in-process vs 2 workers x 1 thread)"
    res["total_s"] = time.perf_counter() - t_all
    res["load_end"] = _load()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cost_growth{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"load average start {res['load_start']}, end {res['load_end']}; total {res['total_s']:.0f} s; {out}")
    print(table(res))


if __name__ == "__main__":
    main()
