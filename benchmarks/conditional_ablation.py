"""Ablation of the conditional learner (issue 15 item 2): description vs none, attention vs mean.

Meta-trains the `conditional` learner on several source domains at once,
each with its task description, episodes drawn per source
(`training.sources.mixed_source_sampler` + `give_descriptions`, what the
meta_train stage does):

- mini_imagenet meta_train (natural photographs),
- omniglot_small (handwritten characters; prepared from the mirror into
  `--extra-store` if missing, a few seconds),
- brain_tumor_mri train and retinamnist train (medical training splits),

then scores held-out targets never seen in meta-training, each adapted with
its own description (`set_description`): ham10000_mel_nv and breastmnist
test splits, 2-way K-shot fixed episodes. Variants, all from the same seed
and the same source episodes:

| name | hparams |
|---|---|
| attn+desc | fusion attention, use_description true |
| attn-desc | fusion attention, use_description false |
| mean+desc | fusion mean, use_description true |
| mean-desc | fusion mean, use_description false |
| protonet | the plain ProtoNet (reference: no conditioning at all) |

Paired 95 % CIs (`evaluation.stats.paired_difference`, same episodes) of
attn+desc − attn-desc, mean+desc − mean-desc and attn+desc − mean+desc.

Usage (from the project root; one process at a time on a shared machine):

    nice -n 15 .venv/bin/python benchmarks/conditional_ablation.py --quick   # ~2-3 min on one core
    .venv/bin/python benchmarks/conditional_ablation.py --steps 3000 --episodes 600 --threads 2

`--prepared` (default: the pipeline's prepared store, `data/prepared`, 32 px
RGB) must hold mini_imagenet and the four medical datasets (`dvc repro
prepare`). Writes benchmarks/results/conditional_ablation[-quick].json and
prints a markdown table. No MLflow run: this is a smoke-level ablation tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.config import PrepareParams, load_params
from metatransfer.data.store import SplitData, available, load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.layout import Layout
from metatransfer.learners import backbone_spec
from metatransfer.training.meta_train import TrainSettings, meta_train
from metatransfer.training.sources import give_descriptions, mixed_source_sampler

ROOT = Path(__file__).resolve().parents[1]

# (dataset, split): the meta-training sources, with their descriptions.
SOURCES: dict[tuple[str, str], dict[str, str]] = {
    ("mini_imagenet", "meta_train"): {"domain": "natural photographs", "text": "objects animals everyday scenes"},
    ("omniglot_small", "meta_train"): {"domain": "handwritten characters", "text": "alphabet glyphs pen strokes"},
    ("brain_tumor_mri", "train"): {"modality": "MRI", "anatomy": "brain", "domain": "medical",
                                   "text": "axial slices tumour type grey scale scan"},
    ("retinamnist", "train"): {"modality": "fundus photography", "anatomy": "retina eye", "domain": "medical",
                               "text": "diabetic retinopathy severity grade colour image"},
}
# Held-out targets: test split, never meta-trained on; their words are partly new (hash buckets).
TARGETS: dict[str, dict[str, str]] = {
    "ham10000_mel_nv": {"modality": "dermoscopy", "anatomy": "skin", "domain": "medical",
                        "text": "melanoma versus naevus lesion colour image"},
    "breastmnist": {"modality": "ultrasound", "anatomy": "breast", "domain": "medical",
                    "text": "benign malignant tumour grey scale scan"},
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "attn+desc": ("conditional", {"fusion": "attention", "use_description": True}),
    "attn-desc": ("conditional", {"fusion": "attention", "use_description": False}),
    "mean+desc": ("conditional", {"fusion": "mean", "use_description": True}),
    "mean-desc": ("conditional", {"fusion": "mean", "use_description": False}),
    "protonet": ("protonet", {}),
}
PAIRS = (("attn+desc", "attn-desc"), ("mean+desc", "mean-desc"), ("attn+desc", "mean+desc"))


def ensure_omniglot(store: Path, image_size: int, params_file: Path) -> None:
    """Prepare omniglot_small (RGB, `image_size`) into `store` from the mirror when it is missing."""
    if store.is_dir() and "meta_train" in available(store).get("omniglot_small", []):
        return
    from metatransfer.data.fetch import fetch
    from metatransfer.data.prepare import prepare

    params = load_params(params_file)
    mirror = Path(params.data.mirror)
    mirror = mirror if mirror.is_absolute() else ROOT / mirror
    raw = store.parent / "raw"
    fetch("omniglot_small", raw, mirror)
    pp = PrepareParams(image_size=image_size, channels=3, omniglot_protocol="background_evaluation",
                       meta_val_classes=0)
    prepare(pp, ("omniglot_small",), raw, store, params.seed)


def load(stores: list[Path], dataset: str, split: str) -> SplitData:
    """The split from the first store that has it."""
    for store in stores:
        if store.is_dir() and split in available(store).get(dataset, []):
            return load_split(store, dataset, split)
    raise SystemExit(f"{dataset}/{split}: in none of {[str(s) for s in stores]}; run `dvc repro prepare` "
                     "(or pass --prepared)")


def main() -> None:
    """Meta-train each variant, score the held-out targets, print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 steps, 30 episodes per target: a smoke-level run")
    ap.add_argument("--steps", type=int, default=2000, help="meta-training steps per variant")
    ap.add_argument("--episodes", type=int, default=600, help="fixed test episodes per target")
    ap.add_argument("--n-way", type=int, default=4, help="ways of the source episodes")
    ap.add_argument("--k-shot", type=int, default=5, help="shots of source and target episodes")
    ap.add_argument("--n-query", type=int, default=5, help="queries per class (source and target)")
    ap.add_argument("--meta-batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--prepared", default="", help="store with mini_imagenet + medical (default: the pipeline's)")
    ap.add_argument("--extra-store", default="/tmp/bench/conditional_omniglot32", help="omniglot_small store")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.episodes = 60, 30
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    prepared = Path(args.prepared).resolve() if args.prepared else Layout.of(ROOT, params).prepared_dir
    extra = Path(args.extra_store)
    ensure_omniglot(extra, params.prepare.image_size, Path(args.params))
    stores = [prepared, extra]
    splits = [load(stores, d, s) for d, s in SOURCES]
    descriptions = list(SOURCES.values())
    spec = backbone_spec(params)
    settings = TrainSettings(steps=args.steps, meta_batch_size=args.meta_batch, meta_lr=args.lr,
                             val_every=args.steps, select_best=False)
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"conditional_ablation: {args.steps} steps x {len(VARIANTS)} variants, sources "
          f"{[d for d, _ in SOURCES]}, {args.n_way}-way {args.k_shot}-shot, {args.episodes} episodes/target, "
          f"{args.threads} thread(s), load {os.getloadavg()[0]:.2f}", flush=True)
    learners = {}
    for name, (algorithm, hp) in VARIANTS.items():
        sampler = mixed_source_sampler(splits, [1.0] * len(splits), args.n_way, args.k_shot, args.n_query,
                                       seed=params.seed, rotation_augment=False)
        torch.manual_seed(params.seed)
        learner = build_algorithm(algorithm, spec, args.n_way, hp, num_classes=sampler.num_classes)
        give_descriptions(learner, sampler, descriptions)
        val = [sampler.sample() for _ in range(2)]  # recorded only (select_best false): last weights kept
        w = time.perf_counter()
        result = meta_train(learner, sampler.sample, val, settings)
        learners[name] = result.learner
        print(f"  {name}: {result.steps_done} steps in {time.perf_counter() - w:.0f} s", flush=True)

    results: dict[str, Any] = {}
    for target, description in TARGETS.items():
        test = load(stores, target, "test")
        fixed = build_fixed_episodes(test, 2, args.k_shot, args.n_query, args.episodes, seed=params.seed + 2)
        episodes = list(fixed.iter_episodes(test))
        accs: dict[str, np.ndarray] = {}
        for name, learner in learners.items():
            if hasattr(learner, "set_description"):
                learner.set_description(description)
            accs[name] = episode_accuracies(learner, episodes)
        results[target] = {
            "acc": {n: dataclasses.asdict(mean_ci(a)) for n, a in accs.items()},
            "paired": {f"{a} - {b}": dataclasses.asdict(paired_difference(accs[a], accs[b])) for a, b in PAIRS},
        }
    doc = {"args": vars(args), "sources": [f"{d}/{s}" for d, s in SOURCES], "targets": list(TARGETS),
           "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
           "results": results}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"conditional_ablation{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    print(f"wrote {out} ({doc['wall_s']} s wall, {doc['cpu_s']} s CPU)")


def markdown(doc: dict[str, Any]) -> str:
    """The accuracy table (mean ± 95 % CI) and the paired differences, per held-out target."""
    names = list(VARIANTS)
    lines = ["| target (2-way, test) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for target, r in doc["results"].items():
        cells = [f"{100 * r['acc'][n]['mean']:.1f} ± {100 * r['acc'][n]['ci']:.1f}" for n in names]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "| target | " + " | ".join(f"{a} − {b}" for a, b in PAIRS) + " |", "|---" * (len(PAIRS) + 1) + "|"]
    for target, r in doc["results"].items():
        cells = [f"{100 * r['paired'][f'{a} - {b}']['mean']:+.1f} ± {100 * r['paired'][f'{a} - {b}']['ci']:.1f}"
                 for a, b in PAIRS]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
