"""mini-ImageNet 5-way 1-shot / 5-shot, Conv-4 at 84x84 RGB, beside the published numbers (issue 12, part 6).

Standard protocol (Vinyals et al. 2016; Ravi & Larochelle 2017 split; Snell
et al. 2017): 64 meta-train classes, 16 meta-val, 20 meta-test; 600 fixed
test episodes per shot, 15 queries per class, mean accuracy ± 95 % CI.

Training uses the library's own pieces, budgeted by steps:

- optional supervised pre-training on the 64 training classes
  (`metatransfer.training.pretrain.pretrain`, Baseline++ head, the `pretrain`
  section of params.yaml: batch 64, Adam, cosine, augmentation), `--pretrain-steps`;
  the pre-trained learner is also scored as `baselinepp` (its own `adapt`);
- then each meta-learner (`--algorithms`, default ProtoNet and ANIL) starts
  from that backbone (`metatransfer.learners.copy_backbone`) or from a random
  init, and is meta-trained by `metatransfer.training.meta_train.meta_train`
  (`--steps`; ProtoNet may train with more ways, `--train-way`, as Snell et
  al. did with 20/30-way episodes; the MAML family trains 5-way);
- levers as flags: `--precision bf16`, `--channels-last`, `--train-way`,
  `--pretrain-steps`.

One model per algorithm is trained on `--train-shot`-shot episodes and scored
at both 1 and 5 shots (Snell et al. trained one model per shot).

Time-to-accuracy: every `--val-every` steps, accuracy on `--val-episodes`
fixed 5-way 5-shot meta-val episodes (the best state is kept: meta-val classes
are disjoint from the test classes), with the process CPU seconds and wall
seconds of training at that point (validation time excluded; pre-training
time included for learners that start from it). CPU seconds are the budget
measure ("60 minutes of CPU training"); wall time depends on the machine's load.

Usage (from the project root; one process at a time on a shared machine):

    .venv/bin/python benchmarks/mini_imagenet.py --quick          # minutes: 100 + 50 steps, 50 episodes
    .venv/bin/python benchmarks/mini_imagenet.py --pretrain-steps 2000 --steps 1000 --train-way 20
    .venv/bin/python benchmarks/mini_imagenet.py --steps 20000 --pretrain-steps 0   # paper-like, no pre-training (hours)

The 84 px store (`--prepared`, default /tmp/bench/prepared84) is made by the
prepare stage's core from the mirror when missing (~50 s). Writes
benchmarks/results/mini_imagenet[-quick].json, one MLflow run per learner in
the "benchmarks" experiment, and prints a markdown table.
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
from torch import nn

from metatransfer import runtime, tracking
from metatransfer.algorithms import CATALOG, build_algorithm
from metatransfer.config import Params, load_params
from metatransfer.data.store import available, load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.learners import backbone_spec, copy_backbone
from metatransfer.stages.pretrain import settings_of
from metatransfer.training.meta_train import TrainSettings, meta_train
from metatransfer.training.pretrain import pretrain
from metatransfer.training.sources import mixed_source_sampler

ROOT = Path(__file__).resolve().parents[1]
DATASET = "mini_imagenet"
SHOTS = (1, 5)
N_QUERY = 15
# 84x84 Conv-4 (Snell et al. 2017; Finn et al. 2017; Chen et al. 2019), 5-way 1-shot / 5-shot.
PUBLISHED = {"Matching Networks (Vinyals et al. 2016)": (43.56, 55.31), "MAML (Finn et al. 2017)": (48.70, 63.11),
             "ProtoNet (Snell et al. 2017)": (49.42, 68.20), "RelationNet (Sung et al. 2018)": (50.44, 65.32),
             "Baseline++ (Chen et al. 2019)": (48.24, 66.43)}
TARGET = {"protonet": (45.0, 62.0)}  # issue 12: within 60 minutes of CPU training


class Clock:
    """Metric sink recording, at each validation, the training CPU and wall seconds (validation excluded)."""

    def __init__(self, offset_cpu: float = 0.0, offset_wall: float = 0.0) -> None:
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        self.offset_cpu, self.offset_wall = offset_cpu, offset_wall
        self.val_cpu = self.val_wall = 0.0
        self.step_cpu, self.step_wall = self.c0, self.w0
        self.curve: list[dict[str, float]] = []

    def __call__(self, name: str, value: float, step: int) -> None:
        if name.endswith("/loss"):  # emitted after each training step, before its validation
            self.step_cpu, self.step_wall = time.process_time(), time.perf_counter()
        elif name == "val/acc":
            self.val_cpu += time.process_time() - self.step_cpu
            self.val_wall += time.perf_counter() - self.step_wall
            self.curve.append({"step": step, "acc": round(100 * value, 2),
                               "cpu_s": round(self.offset_cpu + self.step_cpu - self.c0 - self.val_cpu_before(), 1),
                               "wall_s": round(self.offset_wall + self.step_wall - self.w0 - self.val_wall_before(), 1)})
            self._last = (self.val_cpu, self.val_wall)

    def val_cpu_before(self) -> float:
        return getattr(self, "_last", (0.0, 0.0))[0]

    def val_wall_before(self) -> float:
        return getattr(self, "_last", (0.0, 0.0))[1]

    def train_cpu(self) -> float:
        """Training CPU seconds so far (validation excluded, offset included)."""
        return self.offset_cpu + time.process_time() - self.c0 - self.val_cpu

    def train_wall(self) -> float:
        """Training wall seconds so far (validation excluded, offset included)."""
        return self.offset_wall + time.perf_counter() - self.w0 - self.val_wall


def ensure_prepared(prepared: Path, image_size: int, params: Params) -> None:
    """Make the mini-ImageNet store at `image_size` with the prepare stage's core if missing."""
    if all(s in (available(prepared) if prepared.is_dir() else {}).get(DATASET, [])
           for s in ("meta_train", "meta_val", "meta_test")):
        return
    from metatransfer.data.prepare import prepare
    from metatransfer.data.fetch import fetch

    mirror = Path(params.data.mirror)
    mirror = mirror if mirror.is_absolute() else ROOT / mirror
    t0 = time.perf_counter()
    fetch(DATASET, prepared.parent / "raw", mirror)
    pp = params.prepare.model_copy(update=dict(image_size=image_size, channels=3, meta_val_classes=0))
    prepare(pp, (DATASET,), prepared.parent / "raw", prepared, params.seed)
    print(f"prepared {DATASET} at {image_size} px into {prepared} in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    """Pre-train (optional), meta-train each algorithm, score 600 test episodes per shot, write and print."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 pretrain + 50 meta steps, 50 test episodes")
    ap.add_argument("--algorithms", default="protonet,anil", help="comma-separated registry names")
    ap.add_argument("--steps", type=int, default=1000, help="meta-training steps per algorithm")
    ap.add_argument("--pretrain-steps", type=int, default=2000, help="pre-training steps (0: meta-train from scratch)")
    ap.add_argument("--pretrain-batch", type=int, default=0, help="pre-training batch size (0: params.yaml's)")
    ap.add_argument("--train-way", type=int, default=20, help="ProtoNet training ways (MAML family: always 5)")
    ap.add_argument("--train-shot", type=int, default=5)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--meta-batch", type=int, default=1)
    ap.add_argument("--val-every", type=int, default=100, help="steps between meta-val points of the curve")
    ap.add_argument("--val-episodes", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=600, help="fixed test episodes per shot")
    ap.add_argument("--score-pretrain", default=True, action=argparse.BooleanOptionalAction,
                    help="also score the pre-trained learner (Baseline++ adapt) on the test episodes")
    ap.add_argument("--image-size", type=int, default=84)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepared", default="")
    ap.add_argument("--save", default="", help="folder to save each trained learner in (save_learner), e.g. to score it again")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default="")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.pretrain_steps, args.episodes, args.val_episodes, args.val_every = \
            min(args.steps, 50), min(args.pretrain_steps, 100), 50, 20, 25
    algorithms = args.algorithms.split(",")
    unknown = [a for a in algorithms if a not in CATALOG]
    if unknown:
        ap.error(f"--algorithms: unknown {unknown}; choose from {sorted(CATALOG)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    params = params.model_copy(update=dict(prepare=params.prepare.model_copy(update=dict(image_size=args.image_size,
                                                                    channels=3))))
    prepared = Path(args.prepared or f"/tmp/bench/prepared{args.image_size}").resolve()
    ensure_prepared(prepared, args.image_size, params)
    train = load_split(prepared, DATASET, "meta_train")
    val = load_split(prepared, DATASET, "meta_val")
    test = load_split(prepared, DATASET, "meta_test")
    fixed_val = build_fixed_episodes(val, 5, 5, N_QUERY, args.val_episodes, seed=params.seed + 1)
    val_episodes = [fixed_val.materialise(i, val) for i in range(args.val_episodes)]
    spec = backbone_spec(params)
    device = torch.device("cpu")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"mini_imagenet{'-quick' if args.quick else ''}.json")
    w_start, c_start = time.perf_counter(), time.process_time()
    loads = [os.getloadavg()[0]]
    print(f"mini_imagenet: {args.image_size} px, pretrain {args.pretrain_steps} steps, meta {args.steps} steps, "
          f"{args.episodes} test episodes, {args.threads} threads, load {loads[0]:.2f}", flush=True)

    learners: dict[str, nn.Module] = {}
    records: dict[str, Any] = {}
    pre = None
    pre_clock = Clock()
    if args.pretrain_steps > 0:
        p = params.pretrain
        p = p.model_copy(update=dict(steps=args.pretrain_steps, batch_size=args.pretrain_batch or p.batch_size,
                                val_every=args.val_every, channels_last=args.channels_last))
        torch.manual_seed(params.seed)
        pre = build_algorithm("baselinepp", spec, 5, None, num_classes=len(train.class_names))
        result = pretrain(pre.backbone, pre.head, [train.images], [train.labels], val_episodes, settings_of(p),
                          params.seed, device=device, autocast=lambda: runtime.autocast(device, args.precision),
                          sink=pre_clock)
        learners["baselinepp"] = pre
        records["baselinepp"] = {"stage": "pretrain", "steps": result.steps_done, "best_step": result.best_step,
                                 "batch_size": p.batch_size, "best_val_acc": round(100 * result.best_val_acc, 2),
                                 "train_cpu_s": round(pre_clock.train_cpu(), 1),
                                 "train_wall_s": round(pre_clock.train_wall(), 1), "curve": pre_clock.curve}
        loads.append(os.getloadavg()[0])
        print(f"  pretrain: {result.steps_done} steps, {pre_clock.train_cpu():.0f} CPU s / "
              f"{pre_clock.train_wall():.0f} wall s, meta-val 5-shot {100 * result.best_val_acc:.2f}", flush=True)

    for algorithm in algorithms:
        way = args.train_way if algorithm in ("protonet", "matchingnet", "relationnet", "tadam") else 5
        hp = params.meta_train.hparams.get(algorithm)
        torch.manual_seed(params.seed)
        learner = build_algorithm(algorithm, spec, way, hp, num_classes=len(train.class_names))
        if pre is not None:
            copy_backbone(pre.backbone, learner.backbone, f"pretrain -> {algorithm}")
        sampler = mixed_source_sampler([train], [1.0], way, args.train_shot, N_QUERY, params.seed, False)
        settings = TrainSettings(steps=args.steps, meta_batch_size=args.meta_batch, meta_lr=args.meta_lr,
                                 val_every=args.val_every, lr_schedule="cosine", precision=args.precision,
                                 channels_last=args.channels_last)
        clock = Clock(pre_clock.train_cpu() if pre is not None else 0.0,
                      pre_clock.train_wall() if pre is not None else 0.0)
        result = meta_train(learner, sampler.sample, val_episodes, settings, sink=clock)
        learners[algorithm] = result.learner
        records[algorithm] = {"stage": "meta_train", "init": "pretrain" if pre is not None else "scratch",
                              "train_way": way, "train_shot": args.train_shot, "steps": result.steps_done,
                              "best_step": result.best_step, "best_val_acc": round(100 * result.best_val_acc, 2),
                              "train_cpu_s": round(clock.train_cpu(), 1), "train_wall_s": round(clock.train_wall(), 1),
                              "curve": clock.curve}
        loads.append(os.getloadavg()[0])
        print(f"  {algorithm} ({way}-way {args.train_shot}-shot): {result.steps_done} steps, total training "
              f"{clock.train_cpu():.0f} CPU s / {clock.train_wall():.0f} wall s, meta-val 5-shot "
              f"{100 * result.best_val_acc:.2f} (step {result.best_step})", flush=True)

    if args.save:
        from metatransfer.artifacts import save_learner

        for name, learner in learners.items():
            save_learner(learner, Path(args.save) / name)
    scores: dict[str, Any] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".partial.json").write_text(json.dumps({"training": records, "test": scores}, indent=1))
    for k in SHOTS:
        fixed = build_fixed_episodes(test, 5, k, N_QUERY, args.episodes, seed=params.seed)
        accs: dict[str, np.ndarray] = {}
        for name, learner in learners.items():
            if name == "baselinepp" and not args.score_pretrain:
                continue
            t0 = time.perf_counter()
            # episodes read lazily per learner: 600 episodes of 84 px float32 images would hold 4-5 GB
            accs[name] = episode_accuracies(learner, fixed.iter_episodes(test))  # type: ignore[arg-type]
            ci = mean_ci(accs[name])
            scores.setdefault(name, {})[str(k)] = {"mean": round(100 * ci.mean, 2), "ci95": round(100 * ci.ci, 2),
                                                   "eval_wall_s": round(time.perf_counter() - t0, 1)}
            print(f"  test {k}-shot {name}: {100 * ci.mean:.2f} ± {100 * ci.ci:.2f}", flush=True)
        names = list(accs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                d = paired_difference(accs[a], accs[b])
                scores[a][str(k)][f"vs_{b}"] = {"mean": round(100 * d.mean, 2), "ci95": round(100 * d.ci, 2),
                                                "significant": d.excludes_zero()}
        loads.append(os.getloadavg()[0])
        # a run cut short still leaves the training curves and every finished shot
        out.with_suffix(".partial.json").write_text(json.dumps({"training": records, "test": scores}, indent=1))

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "load_avg": [round(x, 2) for x in loads]}
    command = (f"python benchmarks/mini_imagenet.py --algorithms {args.algorithms} --steps {args.steps} "
               f"--pretrain-steps {args.pretrain_steps} --train-way {args.train_way} --train-shot {args.train_shot} "
               f"--meta-lr {args.meta_lr:g} --val-every {args.val_every} --val-episodes {args.val_episodes} "
               f"--episodes {args.episodes} --precision {args.precision} "
               f"{'--channels-last' if args.channels_last else '--no-channels-last'} --threads {args.threads}"
               f"{' --pretrain-batch %d' % args.pretrain_batch if args.pretrain_batch else ''}"
               f"{'' if args.score_pretrain else ' --no-score-pretrain'}")
    doc = {"command": command, "machine": machine, "image_size": args.image_size, "episodes": args.episodes,
           "n_query": N_QUERY, "wall_seconds": round(time.perf_counter() - w_start, 1),
           "cpu_seconds": round(time.process_time() - c_start, 1), "training": records, "test": scores,
           "published": {k: {"1": v[0], "5": v[1]} for k, v in PUBLISHED.items()},
           "target": {k: {"1": v[0], "5": v[1]} for k, v in TARGET.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.no_mlflow:
        log_to_mlflow(doc)
    print(markdown(doc))
    print(f"written: {out} ({doc['wall_seconds']:.0f} s wall, {doc['cpu_seconds']:.0f} s CPU)")


def log_to_mlflow(doc: dict[str, Any]) -> None:
    """One run per learner: test accuracy per shot, training CPU/wall seconds, the curve by step."""
    import mlflow

    tracking.configure(ROOT, experiment="benchmarks")
    for name, rec in doc["training"].items():
        tags = {"benchmark": "mini_imagenet", "method": name, **tracking.standard_tags(ROOT)}
        with mlflow.start_run(run_name=f"mini_imagenet/{name}", tags=tags):
            tracking.log_params({"command": doc["command"], "image_size": doc["image_size"],
                                 "episodes": doc["episodes"], **{k: v for k, v in rec.items() if k != "curve"},
                                 **{f"machine.{k}": v for k, v in doc["machine"].items() if k != "load_avg"}})
            metrics = {}
            for k, r in doc["test"].get(name, {}).items():
                metrics[f"eval/acc_mean/{k}shot"] = r["mean"]
                metrics[f"eval/acc_ci95/{k}shot"] = r["ci95"]
            tracking.log_metrics(metrics)
            for point in rec["curve"]:
                mlflow.log_metrics({"val/acc": point["acc"], "val/cpu_s": point["cpu_s"],
                                    "val/wall_s": point["wall_s"]}, step=int(point["step"]))


def markdown(doc: dict[str, Any]) -> str:
    """Test accuracy ± CI beside the published table, then the time-to-accuracy curves."""
    lines = ["\n| method | 5-way 1-shot | 5-way 5-shot | training | CPU s | wall s |", "|---|---:|---:|---|---:|---:|"]
    for name, rec in doc["training"].items():
        s = doc["test"].get(name)
        if s is None:
            lines.append(f"| {name} (this run) | not scored | not scored | pretrain {rec['steps']} steps | "
                         f"{rec['train_cpu_s']:.0f} | {rec['train_wall_s']:.0f} |")
            continue
        how = (f"pretrain {rec['steps']} steps" if rec["stage"] == "pretrain" else
               f"{rec['init']} init + {rec['steps']} steps {rec['train_way']}-way {rec['train_shot']}-shot")
        lines.append(f"| {name} (this run) | {s['1']['mean']:.2f} ± {s['1']['ci95']:.2f} | "
                     f"{s['5']['mean']:.2f} ± {s['5']['ci95']:.2f} | {how} | {rec['train_cpu_s']:.0f} | "
                     f"{rec['train_wall_s']:.0f} |")
    for name, v in doc["published"].items():
        lines.append(f"| {name} | {v['1']:.2f} | {v['5']:.2f} | published | – | – |")
    lines.append("\ntime to accuracy (meta-val 5-way 5-shot %, training CPU s / wall s):")
    for name, rec in doc["training"].items():
        lines.append(f"- {name}: " + ", ".join(f"step {p['step']}: {p['acc']:.1f} ({p['cpu_s']:.0f}/{p['wall_s']:.0f})"
                                              for p in rec["curve"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
