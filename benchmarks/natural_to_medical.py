"""Natural images -> medical images: mini-ImageNet source, four medical targets (issue 12, part 6).

The mission's own scenario, scored episode by episode. Every learner is
trained by the pipeline's own code from `params.yaml` (only the step budgets
and the prepared store differ, by flags):

- `pretrain` stage core (`metatransfer.stages.pretrain.train`): supervised
  Baseline++ pre-training on the 64 mini-ImageNet training classes;
- `meta_train` stage core (`metatransfer.stages.meta_train.train_one`):
  ProtoNet from the pre-trained backbone (`meta_train.init: pretrain`),
  ProtoNet from a random init (`init: scratch`), ANIL from the pre-trained
  backbone, all on mini-ImageNet 5-way 5-shot episodes.

Methods scored on the same fixed episodes of each target's *test* split
(the pipeline's `episodes` sets: 15 queries per class, RetinaMNIST 10):

| name | what |
|---|---|
| scratch | random init trained on the support set (`scratch`, params' hparams) |
| baselinepp | pre-training only, Baseline++ `adapt` (new cosine head on frozen features) |
| protonet_scratch | ProtoNet meta-trained without pre-training, prototype classifier |
| protonet | pre-train + ProtoNet (P>M), prototype classifier |
| pmf | pre-train + ProtoNet + fine-tuning (P>M>F): the ProtoNet backbone with a prototype-initialised linear head fine-tuned on the episode's support (`training.finetune.finetune`, no validation data, `--pmf-steps` steps, the pipeline's fine-tuning augmentation) |
| anil | pre-train + ANIL (MAML family), its own `adapt` |

Each method gets a paired 95 % CI of its per-episode difference against
`scratch` and against `baselinepp`. The pipeline's method choice per target
(`finetune.select_method`) is made on 3-shot 3-query episodes of the target's
*val* split (RetinaMNIST's val split has 6 images of its rarest grade).

Usage (from the project root; one process at a time on a shared machine):

    .venv/bin/python benchmarks/natural_to_medical.py --quick        # 200 pretrain + 50 meta steps, 20 episodes
    .venv/bin/python benchmarks/natural_to_medical.py --pretrain-steps 2000 --meta-steps 300 --episodes 100
    .venv/bin/python benchmarks/natural_to_medical.py                # 600 episodes per (target, shot)

Trained learners are cached in `--work` (default /tmp/bench/n2m<size>); with
`--reuse` a later run scores them again without training. The store at
`--prepared` is made by the `prepare` stage's core from the mirror when it is
missing. Writes benchmarks/results/natural_to_medical[-quick].json, one MLflow
run per target in the "benchmarks" experiment, and prints markdown tables.
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
from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import load_learner, save_learner
from metatransfer.config import Params, PrepareParams, load_params
from metatransfer.data.store import SplitData, available, load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.learners import PRETRAIN_DIR, backbone_spec
from metatransfer.stages.meta_train import train_one
from metatransfer.stages.pretrain import train as pretrain_train
from metatransfer.training.finetune import FinetuneSettings, finetune, select_method

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "mini_imagenet"
# target -> (n_way, shots, n_query): all its classes; RetinaMNIST's rarest test grade has 20 images.
TARGETS = {"brain_tumor_mri": (4, (1, 5, 20), 15), "ham10000_mel_nv": (2, (1, 5, 20), 15),
           "breastmnist": (2, (1, 5, 20), 15), "retinamnist": (5, (1, 5, 10), 10)}
BASELINES = ("scratch", "baselinepp")
METHODS = ("scratch", "baselinepp", "protonet_scratch", "protonet", "pmf", "anil")
# meta-trained learners: name -> (algorithm, meta_train.init)
META = {"protonet": ("protonet", "pretrain"), "protonet_scratch": ("protonet", "scratch"), "anil": ("anil", "pretrain")}
log = logging.getLogger("natural_to_medical")


class PMF(nn.Module):
    """P>M>F at evaluation time: fine-tune the meta-trained backbone on each episode's support set.

    `adapt` is `metatransfer.training.finetune.finetune` (the pipeline's target
    fine-tuning: running statistics estimated on the support, head initialised
    from the prototypes, Adam on all layers) without validation data, so it
    runs exactly `settings.steps` steps; it returns the fine-tuned model.
    """

    transductive = False

    def __init__(self, learner: nn.Module, settings: FinetuneSettings, seed: int) -> None:
        super().__init__()
        self.learner = learner
        self.settings = settings
        self.seed = seed

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int,
              unlabeled_x: torch.Tensor | None = None) -> nn.Module:
        """The target model fine-tuned on the support set (eval mode)."""
        names = [f"class_{c}" for c in range(n_way)]
        return finetune(self.learner, support_x, support_y, None, None, names, self.settings, self.seed).model


def ensure_prepared(prepared: Path, image_size: int, params: Params) -> None:
    """Make the store (source + targets at `image_size`, 3 channels) with the prepare stage's core if missing."""
    need = {SOURCE: "meta_test", **{t: "test" for t in TARGETS}}
    have = available(prepared) if prepared.is_dir() else {}
    if all(s in have.get(d, []) for d, s in need.items()):
        return
    from metatransfer.data.prepare import prepare
    from metatransfer.data.fetch import fetch

    mirror = Path(params.data.mirror)
    mirror = mirror if mirror.is_absolute() else ROOT / mirror
    raw = prepared.parent / "raw"
    t0 = time.perf_counter()
    for name in need:
        fetch(name, raw, mirror)
    pp = params.prepare.model_copy(update=dict(image_size=image_size, channels=3, meta_val_classes=0))
    assert isinstance(pp, PrepareParams)
    prepare(pp, tuple(need), raw, prepared, params.seed)
    print(f"prepared {sorted(need)} at {image_size} px into {prepared} in {time.perf_counter() - t0:.0f} s", flush=True)


def timed(fn, *a, **kw) -> tuple[Any, float, float]:
    """(fn's result, wall seconds, process CPU seconds)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return out, time.perf_counter() - w0, time.process_time() - c0


def train_learners(params: Params, work: Path, reuse: bool,
                   needed: set[str] | None = None) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Pre-train, then meta-train the learners of `META` in `needed` (all: None); cached under `work/models`."""
    records_file = work / "training.json"
    records: dict[str, Any] = json.loads(records_file.read_text()) if reuse and records_file.exists() else {}
    learners: dict[str, nn.Module] = {}
    device = runtime.device_for(params)
    precision = runtime.precision_for(params)
    pre_dir = work / PRETRAIN_DIR
    if reuse and pre_dir.is_dir():
        learners["baselinepp"] = load_learner(pre_dir)
    else:
        (learner, result, n_classes), wall, cpu = timed(
            pretrain_train, params, work, device=device, autocast=lambda: runtime.autocast(device, precision))
        save_learner(learner, pre_dir, extra={"best_step": result.best_step, "source_classes": n_classes})
        learners["baselinepp"] = learner
        records["pretrain"] = {"steps": result.steps_done, "best_step": result.best_step,
                               "best_val_acc": round(result.best_val_acc, 4), "wall_s": round(wall, 1),
                               "cpu_s": round(cpu, 1), "curve": result.curve}
        print(f"  pretrain: {result.steps_done} steps, {wall:.0f} s wall / {cpu:.0f} s CPU, meta-val "
              f"{params.pretrain.n_way}-way {params.pretrain.k_shot}-shot centroid acc {result.best_val_acc:.4f} "
              f"(step {result.best_step})", flush=True)
    for name, (algorithm, init) in META.items():
        if needed is not None and name not in needed:
            continue
        folder = work / "models" / "meta" / name
        if reuse and folder.is_dir():
            learners[name] = load_learner(folder)
            continue
        p = params.model_copy(update=dict(meta_train=params.meta_train.model_copy(update=dict(init=init))))
        result, wall, cpu = timed(train_one, algorithm, p, work / "prepared_link", root=work)
        save_learner(result.learner, folder)
        learners[name] = result.learner
        records[name] = {"algorithm": algorithm, "init": init, "steps": result.steps_done,
                         "best_step": result.best_step, "best_val_acc": round(result.best_val_acc, 4),
                         "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "val_curve": result.val_curve}
        print(f"  meta-trained {name} ({algorithm}, init {init}): {result.steps_done} steps, {wall:.0f} s wall / "
              f"{cpu:.0f} s CPU, meta-val acc {result.best_val_acc:.4f} (step {result.best_step})", flush=True)
    records_file.write_text(json.dumps(records, indent=1))
    return learners, records


def score(models: dict[str, nn.Module], split: SplitData, n_way: int, k: int, n_query: int, n_episodes: int,
          seed: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-episode accuracies of every model on the same fixed episodes, and each model's wall seconds."""
    fixed = build_fixed_episodes(split, n_way, k, n_query, n_episodes, seed=seed)
    episodes = list(fixed.iter_episodes(split))
    accs, secs = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        accs[name] = episode_accuracies(model, episodes)  # type: ignore[arg-type]
        secs[name] = round(time.perf_counter() - t0, 1)
    return accs, secs


def main() -> None:
    """Train, score every (target, shot), choose per target, write and print the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 pretrain steps, 50 meta steps, 20 episodes, 10 val episodes")
    ap.add_argument("--image-size", type=int, default=32, help="prepare.image_size (32: the pipeline's; 84: the standard)")
    ap.add_argument("--prepared", default="", help="prepared store (default /tmp/bench/prepared<size>; made if missing)")
    ap.add_argument("--work", default="", help="where trained learners are cached (default /tmp/bench/n2m<size>)")
    ap.add_argument("--reuse", action="store_true", help="load the learners cached in --work instead of training")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="pretrain.steps (0: params.yaml's)")
    ap.add_argument("--meta-steps", type=int, default=0, help="meta_train.steps for every meta-learner (0: params.yaml's)")
    ap.add_argument("--pmf-steps", type=int, default=50, help="P>M>F fine-tuning steps per episode")
    ap.add_argument("--pmf-lr", type=float, default=0.0, help="P>M>F fine-tuning lr (0: finetune.lr of params.yaml)")
    ap.add_argument("--episodes", type=int, default=600, help="fixed test episodes per (target, shot)")
    ap.add_argument("--val-episodes", type=int, default=50, help="3-shot 3-query val-split episodes for the method choice")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"methods to score, from {list(METHODS)} (scratch and baselinepp are always scored)")
    ap.add_argument("--shots", default="", help="comma-separated shots to score (default: each target's own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default="")
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pretrain_steps = args.pretrain_steps or 200
        args.meta_steps = args.meta_steps or 50
        args.episodes, args.val_episodes = 20, 10
    targets = args.targets.split(",")
    methods = [m for m in METHODS if m in set(args.methods.split(",")) | set(BASELINES)]
    if set(args.methods.split(",")) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(set(args.methods.split(',')) - set(METHODS))}; choose from {list(METHODS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"--targets: unknown {unknown}; choose from {sorted(TARGETS)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    params = load_params(args.params)
    prepared = Path(args.prepared or f"/tmp/bench/prepared{args.image_size}").resolve()
    work = Path(args.work or f"/tmp/bench/n2m{args.image_size}").resolve()
    ensure_prepared(prepared, args.image_size, params)
    work.mkdir(parents=True, exist_ok=True)
    link = work / "prepared_link"  # train_one takes the store's path; stages.pretrain.train reads root/data.prepared_dir
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(prepared)
    params = params.model_copy(update=dict(
        data=params.data.model_copy(update=dict(prepared_dir="prepared_link")),
        prepare=params.prepare.model_copy(update=dict(image_size=args.image_size, channels=3)),
        pretrain=params.pretrain.model_copy(update=dict(steps=args.pretrain_steps or params.pretrain.steps,
                                     val_every=min(params.pretrain.val_every, args.pretrain_steps or 10**9))),
        meta_train=params.meta_train.model_copy(update=dict(steps=args.meta_steps or params.meta_train.steps,
                                       val_every=min(params.meta_train.val_every, args.meta_steps or 10**9))),
    ))
    f = params.finetune
    pmf_settings = FinetuneSettings(steps=args.pmf_steps, lr=args.pmf_lr or f.lr, batch_size=f.batch_size,
                                    train_layers="all", eval_every=max(1, args.pmf_steps), patience=0,
                                    device="cpu", precision=runtime.precision_for(params), augment=f.augment)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"natural_to_medical{'-quick' if args.quick else ''}.json")
    w_start, c_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0]
    print(f"natural_to_medical: {args.image_size} px, pretrain {params.pretrain.steps} steps, meta_train "
          f"{params.meta_train.steps} steps, {args.episodes} episodes, load {load_start:.2f}", flush=True)
    needed = {("protonet" if m == "pmf" else m) for m in methods}
    learners, training = train_learners(params, work, args.reuse, needed)
    torch.manual_seed(params.seed)
    scratch = build_algorithm("scratch", backbone_spec(params), params.meta_train.n_way,
                              params.meta_train.hparams.get("scratch"))
    models: dict[str, nn.Module] = {"scratch": scratch, "baselinepp": learners["baselinepp"]}
    for m in methods:
        if m == "pmf":
            models[m] = PMF(learners["protonet"], pmf_settings, params.seed)
        elif m not in models:
            models[m] = learners[m]
    w_eval, c_eval = time.perf_counter(), time.process_time()
    loads = [os.getloadavg()[0]]

    results: dict[str, Any] = {}
    for target in targets:
        n_way, shots, n_query = TARGETS[target]
        if args.shots:
            shots = tuple(int(k) for k in args.shots.split(",") if int(k) in shots)
        val = load_split(prepared, target, "val")
        test = load_split(prepared, target, "test")
        val_accs, _ = score(models, val, n_way, 3, 3, args.val_episodes, seed=params.seed + 1)
        chosen, reason = select_method({m: float(a.mean()) for m, a in val_accs.items()})
        print(f"{target}: chose {chosen}: {reason}", flush=True)
        per_shot: dict[str, Any] = {}
        for k in shots:
            accs, secs = score(models, test, n_way, k, n_query, args.episodes, seed=params.seed)
            rows: dict[str, Any] = {}
            for m, a in accs.items():
                ci = mean_ci(a)
                rows[m] = {"mean": round(100 * ci.mean, 2), "ci95": round(100 * ci.ci, 2), "eval_wall_s": secs[m]}
                for ref in BASELINES:
                    if ref != m:
                        d = paired_difference(a, accs[ref])
                        rows[m][f"vs_{ref}"] = {"mean": round(100 * d.mean, 2), "ci95": round(100 * d.ci, 2),
                                                "significant": d.excludes_zero()}
            per_shot[str(k)] = rows
            loads.append(os.getloadavg()[0])
            pm = rows["pmf" if "pmf" in rows else methods[-1]]
            print(f"  {target} {k}-shot ({sum(secs.values()):.0f} s): scratch {rows['scratch']['mean']:.2f}, "
                  f"baselinepp {rows['baselinepp']['mean']:.2f}, {'pmf' if 'pmf' in rows else methods[-1]} "
                  f"{pm['mean']:.2f} (vs scratch {pm['vs_scratch']['mean']:+.2f}±{pm['vs_scratch']['ci95']:.2f}, "
                  f"vs baselinepp {pm['vs_baselinepp']['mean']:+.2f}±{pm['vs_baselinepp']['ci95']:.2f}); chosen "
                  f"{chosen} {rows[chosen]['mean']:.2f}", flush=True)
        results[target] = {"n_way": n_way, "n_query": n_query, "chosen": chosen, "reason": reason,
                           "val_acc": {m: round(100 * float(a.mean()), 2) for m, a in val_accs.items()},
                           "shots": per_shot}
        # a run cut short still leaves every finished target
        out.with_suffix(".partial.json").write_text(json.dumps({"training": training, "targets": results}, indent=1))

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "load_avg_start": round(load_start, 2),
               "load_avg_eval": [round(x, 2) for x in loads], "load_avg_end": round(os.getloadavg()[0], 2)}
    command = (f"python benchmarks/natural_to_medical.py --image-size {args.image_size} "
               f"--pretrain-steps {params.pretrain.steps} --meta-steps {params.meta_train.steps} "
               f"--pmf-steps {args.pmf_steps} --episodes {args.episodes} --val-episodes {args.val_episodes}"
               f"{' --pmf-lr %g' % args.pmf_lr if args.pmf_lr else ''}{' --reuse' if args.reuse else ''}"
               f"{' --targets ' + args.targets if targets != list(TARGETS) else ''}"
               f"{' --methods ' + ','.join(methods) if methods != list(METHODS) else ''}"
               f"{' --shots ' + args.shots if args.shots else ''} --threads {args.threads} "
               f"--prepared {prepared} --work {work}")
    doc = {"command": command, "machine": machine,
           "wall_seconds": round(time.perf_counter() - w_start, 1), "cpu_seconds": round(time.process_time() - c_start, 1),
           "eval_wall_seconds": round(time.perf_counter() - w_eval, 1),
           "eval_cpu_seconds": round(time.process_time() - c_eval, 1),
           "image_size": args.image_size, "episodes": args.episodes,
           "episode_split": "target test split (15 queries per class, RetinaMNIST 10)",
           "pmf": {"steps": pmf_settings.steps, "lr": pmf_settings.lr, "batch_size": pmf_settings.batch_size,
                   "augment": pmf_settings.augment.model_dump(), "precision": pmf_settings.precision},
           "training": training, "targets": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.no_mlflow:
        log_to_mlflow(doc)
    print(markdown(doc))
    print(f"written: {out} ({doc['wall_seconds']:.0f} s wall, {doc['cpu_seconds']:.0f} s CPU)")


def log_to_mlflow(doc: dict[str, Any]) -> None:
    """One run per target: every method's accuracy and paired differences per shot, the choice and why."""
    import mlflow

    tracking.configure(ROOT, experiment="benchmarks")
    for target, res in doc["targets"].items():
        tags = {"benchmark": "natural_to_medical", "target": target, **tracking.standard_tags(ROOT)}
        with mlflow.start_run(run_name=f"natural_to_medical/{target}", tags=tags):
            tracking.log_params({"command": doc["command"], "chosen": res["chosen"], "reason": res["reason"],
                                 "image_size": doc["image_size"], "episodes": doc["episodes"],
                                 **{f"machine.{k}": v for k, v in doc["machine"].items() if k != "load_avg_eval"}})
            metrics = {}
            for k, rows in res["shots"].items():
                for m, r in rows.items():
                    metrics[f"acc/{m}/{k}shot"] = r["mean"]
                    metrics[f"ci95/{m}/{k}shot"] = r["ci95"]
                    for ref in BASELINES:
                        if f"vs_{ref}" in r:
                            metrics[f"diff_vs_{ref}/{m}/{k}shot"] = r[f"vs_{ref}"]["mean"]
            tracking.log_metrics(metrics)
            tracking.log_dict(res, f"natural_to_medical_{target}.json")


def markdown(doc: dict[str, Any]) -> str:
    """Per target: accuracy ± CI per shot, then the paired differences to scratch and Baseline++ (* = CI excludes 0)."""
    lines: list[str] = []
    for target, res in doc["targets"].items():
        shots = list(res["shots"])
        lines += [f"\n{target} ({res['n_way']}-way, {doc['episodes']} episodes; chosen by val episodes: "
                  f"{res['chosen']})\n",
                  "| method | " + " | ".join(f"{k}-shot" for k in shots) + " | " +
                  " | ".join(f"Δ scratch {k}" for k in shots) + " | " +
                  " | ".join(f"Δ baselinepp {k}" for k in shots) + " |",
                  "|---|" + "---:|" * (3 * len(shots))]
        for m in [m for m in METHODS if m in res["shots"][shots[0]]]:
            cells = [f"{res['shots'][k][m]['mean']:.2f} ± {res['shots'][k][m]['ci95']:.2f}" for k in shots]
            for ref in BASELINES:
                for k in shots:
                    d = res["shots"][k][m].get(f"vs_{ref}")
                    cells.append("–" if d is None else f"{d['mean']:+.2f} ± {d['ci95']:.2f}{'*' if d['significant'] else ''}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
