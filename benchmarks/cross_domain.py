"""Cross-domain few-shot: meta-train on Omniglot (+ KMNIST), adapt to RetinaMNIST and BreastMNIST.

The seed scenario of the project. Every learner is meta-trained by the
pipeline's own code (`metatransfer.stages.meta_train.train_one`, the
`meta_train` section of params.yaml with its sources, episode shape and
hparams) on a wall-clock budget of `--minutes` per algorithm, then scored on
the same fixed target episodes as every other method:

- targets RetinaMNIST (5-way) and BreastMNIST (2-way), shots 1, 5, 10, 20,
  15 queries per class, `--episodes` episodes per (target, shot);
- the episodes come from the target's official *train* split: no method
  trains on target data (only the episode's support set is seen), and
  RetinaMNIST's rarest grade has 20 images in test but 66 in train, which
  20-shot + 15-query episodes need;
- `scratch` (random initialisation, fine-tuned on the support set; not
  meta-trained) and `baselinepp` (supervised pre-training on the source
  classes, cosine head fine-tuned on the support set; Chen et al. 2019) are
  the baselines; every method gets a paired 95 % CI of its per-episode
  difference against both;
- method choice per target as the pipeline makes it (`finetune.select_method`):
  by accuracy on `--val-episodes` 3-shot 3-query episodes of the target's
  *val* split (RetinaMNIST's val split holds 6 images of its rarest grade),
  with the reason printed and logged.

Usage (from the project root, after `dvc repro prepare`, nothing else running):

    .venv/bin/python benchmarks/cross_domain.py --quick     # 3 learners + 2 baselines, 0.5 min each, 30 episodes
    .venv/bin/python benchmarks/cross_domain.py --minutes 2 --episodes 100
    .venv/bin/python benchmarks/cross_domain.py             # every algorithm, 10 min each, 600 episodes (hours)

Writes benchmarks/results/cross_domain[-quick].json, one MLflow run per
target in the "benchmarks" experiment, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metatransfer import tracking
from metatransfer.algorithms import CATALOG, build_algorithm
from metatransfer.algorithms.base import MetaLearner
from metatransfer.config import SourceMixParams, load_params
from metatransfer.data.store import SplitData, available, load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.learners import backbone_spec
from metatransfer.stages.meta_train import train_one
from metatransfer.training.finetune import select_method

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"retinamnist": 5, "breastmnist": 2}  # target → n_way (all its classes)
SHOTS = (1, 5, 10, 20)
N_QUERY = 15
NOT_META_TRAINED = ("scratch",)
BASELINES = ("scratch", "baselinepp")


def learners(params: Any, prepared: Path, algorithms: list[str], minutes: float,
             args: argparse.Namespace) -> tuple[dict[str, MetaLearner], dict[str, dict[str, Any]]]:
    """Meta-train each algorithm with the pipeline's code; `scratch` is only built."""
    m = params.meta_train
    sources = tuple(SourceMixParams(dataset=d, weight=1.0) for d in args.sources.split(","))
    out: dict[str, MetaLearner] = {}
    records: dict[str, dict[str, Any]] = {}
    for algorithm in algorithms:
        if algorithm in NOT_META_TRAINED:
            torch.manual_seed(params.seed)
            out[algorithm] = build_algorithm(algorithm, backbone_spec(params), m.n_way, m.hparams.get(algorithm))
            records[algorithm] = {"meta_trained": False}
            continue
        mt = m.model_copy(update=dict(sources=sources, time_budget_s=minutes * 60, steps=10**9,
                                 precision=args.precision, channels_last=args.channels_last,
                                 lr_schedule=args.lr_schedule))
        p = params.model_copy(update=dict(meta_train=mt))
        t0 = time.perf_counter()
        result = train_one(algorithm, p, prepared)
        out[algorithm] = result.learner
        records[algorithm] = {"meta_trained": True, "steps": result.steps_done,
                              "train_seconds": round(result.train_seconds, 1),
                              "best_val_acc": round(result.best_val_acc, 4), "best_step": result.best_step}
        print(f"  meta-trained {algorithm}: {result.steps_done} steps in {time.perf_counter() - t0:.0f} s, "
              f"source val acc {result.best_val_acc:.4f}", flush=True)
    return out, records


def score(models: dict[str, MetaLearner], split: SplitData, n_way: int, k: int, n_query: int,
          n_episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Per-episode accuracies of every model on the same fixed episodes."""
    fixed = build_fixed_episodes(split, n_way, k, n_query, n_episodes, seed=seed)
    episodes = list(fixed.iter_episodes(split))
    return {name: episode_accuracies(model, episodes) for name, model in models.items()}


def main() -> None:
    """Train, score every (target, shot), select per target, write and print the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="protonet, fomaml, anil + baselines, 0.5 min, 30 episodes")
    ap.add_argument("--algorithms", default=",".join(CATALOG), help="comma-separated registry names")
    ap.add_argument("--minutes", type=float, default=10.0, help="meta-training budget per algorithm")
    ap.add_argument("--episodes", type=int, default=600, help="fixed target episodes per (target, shot)")
    ap.add_argument("--val-episodes", type=int, default=50, help="3-shot val-split episodes for method selection")
    ap.add_argument("--sources", default="omniglot,kmnist", help="source datasets (prepared meta_train splits)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction)
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", default=str(ROOT / "scenarios" / "characters.yaml"))
    ap.add_argument("--out", default="")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.algorithms, args.minutes, args.episodes, args.val_episodes = "protonet,fomaml,anil,scratch,baselinepp", 0.5, 30, 20
    algorithms = list(dict.fromkeys(args.algorithms.split(",") + list(BASELINES)))
    unknown = [a for a in algorithms if a not in CATALOG]
    if unknown:
        ap.error(f"--algorithms: unknown {unknown}; choose from {sorted(CATALOG)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    prepared = ROOT / params.data.prepared_dir
    have = available(prepared)
    need = {d: "meta_train" for d in args.sources.split(",")} | {t: "train" for t in TARGETS}
    missing = [f"{d}/{s}" for d, s in need.items() if s not in have.get(d, [])]
    if missing:
        raise SystemExit(f"{prepared}: prepared split(s) {missing} not found; run `dvc repro prepare` "
                         f"with {sorted(need)} in fetch.datasets first")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"cross_domain{'-quick' if args.quick else ''}.json")
    t_start = time.perf_counter()
    print(f"meta-training {len(algorithms)} methods, {args.minutes} min each, sources {args.sources}", flush=True)
    models, records = learners(params, prepared, algorithms, args.minutes, args)

    results: dict[str, Any] = {}
    for target, n_way in TARGETS.items():
        split = load_split(prepared, target, "train")
        val = load_split(prepared, target, "val")
        # RetinaMNIST's val split has 6 images of its rarest grade: 3-shot 3-query episodes.
        val_accs = score(models, val, n_way, 3, 3, args.val_episodes, seed=params.seed + 1)
        chosen, reason = select_method({m: float(a.mean()) for m, a in val_accs.items()})
        print(f"{target}: chose {chosen}: {reason}", flush=True)
        per_shot: dict[str, Any] = {}
        for k in SHOTS:
            t0 = time.perf_counter()
            accs = score(models, split, n_way, k, N_QUERY, args.episodes, seed=params.seed)
            rows = {}
            for m, a in accs.items():
                ci = mean_ci(a)
                rows[m] = {"mean": round(100 * ci.mean, 2), "ci95": round(100 * ci.ci, 2)}
                for ref in BASELINES:
                    if ref != m:
                        d = paired_difference(a, accs[ref])
                        rows[m][f"vs_{ref}"] = {"mean": round(100 * d.mean, 2), "ci95": round(100 * d.ci, 2),
                                                "significant": d.excludes_zero()}
            per_shot[str(k)] = rows
            best = max(rows, key=lambda m: rows[m]["mean"])
            print(f"  {target} {k}-shot ({time.perf_counter() - t0:.0f} s): best {best} {rows[best]['mean']:.2f}; "
                  f"scratch {rows['scratch']['mean']:.2f}, baselinepp {rows['baselinepp']['mean']:.2f}; "
                  f"chosen {chosen} {rows[chosen]['mean']:.2f}", flush=True)
        results[target] = {"n_way": n_way, "chosen": chosen, "reason": reason,
                           "val_acc": {m: round(100 * float(a.mean()), 2) for m, a in val_accs.items()},
                           "shots": per_shot}

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "load_avg_end": round(os.getloadavg()[0], 2)}
    command = (f"python benchmarks/cross_domain.py --algorithms {','.join(algorithms)} --minutes {args.minutes:g} "
               f"--episodes {args.episodes} --val-episodes {args.val_episodes} --sources {args.sources} "
               f"--precision {args.precision} {'--channels-last' if args.channels_last else '--no-channels-last'} "
               f"--lr-schedule {args.lr_schedule}")
    doc = {"command": command, "machine": machine, "wall_seconds": round(time.perf_counter() - t_start, 1),
           "episode_split": "target train split (15 queries per class)", "meta_train": records, "targets": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if not args.no_mlflow:
        log_to_mlflow(doc)
    print(markdown(doc))
    print(f"written: {out}")


def log_to_mlflow(doc: dict[str, Any]) -> None:
    """One run per target: every method's accuracy and paired differences per shot, the choice and why."""
    import mlflow

    tracking.configure(ROOT, experiment="benchmarks")
    for target, res in doc["targets"].items():
        tags = {"benchmark": "cross_domain", "target": target, **tracking.standard_tags(ROOT)}
        with mlflow.start_run(run_name=f"cross_domain/{target}", tags=tags):
            tracking.log_params({"command": doc["command"], "chosen": res["chosen"], "reason": res["reason"],
                                 **{f"machine.{k}": v for k, v in doc["machine"].items()}})
            metrics = {}
            for k, rows in res["shots"].items():
                for m, r in rows.items():
                    metrics[f"acc/{m}/{k}shot"] = r["mean"]
                    metrics[f"ci95/{m}/{k}shot"] = r["ci95"]
                    for ref in BASELINES:
                        if f"vs_{ref}" in r:
                            metrics[f"diff_vs_{ref}/{m}/{k}shot"] = r[f"vs_{ref}"]["mean"]
            tracking.log_metrics(metrics)
            tracking.log_dict(res, f"cross_domain_{target}.json")


def markdown(doc: dict[str, Any]) -> str:
    """Per target: accuracy ± CI per shot, then the paired difference to Baseline++ (* = CI excludes 0)."""
    lines: list[str] = []
    for target, res in doc["targets"].items():
        shots = list(res["shots"])
        methods = sorted(res["shots"][shots[0]], key=lambda m: -res["shots"][shots[-1]][m]["mean"])
        lines += [f"\n{target} ({res['n_way']}-way; chosen by val episodes: {res['chosen']})\n",
                  "| method | " + " | ".join(f"{k}-shot" for k in shots) + " | " +
                  " | ".join(f"Δ vs baselinepp {k}-shot" for k in shots) + " |",
                  "|---|" + "---:|" * (2 * len(shots))]
        for m in methods:
            cells = [f"{res['shots'][k][m]['mean']:.2f} ± {res['shots'][k][m]['ci95']:.2f}" for k in shots]
            diffs = []
            for k in shots:
                d = res["shots"][k][m].get("vs_baselinepp")
                diffs.append("–" if d is None else f"{d['mean']:+.2f} ± {d['ci95']:.2f}{'*' if d['significant'] else ''}")
            lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
