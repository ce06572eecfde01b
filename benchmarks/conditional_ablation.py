"""Ablation of the conditional learner (issue 15 item 2): description vs none, attention vs mean.

Meta-trains the `conditional` learner on several source domains at once,
each with its task description, episodes drawn per source
(`training.sources.mixed_source_sampler` + `give_descriptions`, what the
meta_train stage does):

- mini_imagenet meta_train (natural colour photographs),
- omniglot_small meta_train and kmnist (handwritten characters, cursive
  Japanese; each prepared from the mirror into its own store under
  `--extra-root` when missing, a few seconds: 32 px RGB like the pipeline),
- brain_tumor_mri train and retinamnist train (the medical training splits),

then scores held-out targets never meta-trained on, each adapted with its
own description (`set_description`), 2-way K-shot fixed episodes of their
test split: ham10000_mel_nv and breastmnist (new domains), and
mini_imagenet meta_test (new classes of a source domain: its description
is the source's). The descriptions share words between sources and targets
where that is honest ("colour photograph", "tumour grey scale scan"); the
target words no source uses are listed in the output (`unseen_words`): they
reach the learner only through hash buckets it never trained.

Variants, all from the same seed, the same backbone start (`--init`), the
same source episodes and the same test episodes:

| name | hparams |
|---|---|
| attn+desc | fusion attention, use_description true |
| attn-desc | fusion attention, use_description false |
| mean+desc | fusion mean, use_description true |
| mean-desc | fusion mean, use_description false |
| protonet | the plain ProtoNet, meta-trained the same way (no conditioning) |
| init-proto | `--init pretrain` only: ProtoNet on the start backbone, not meta-trained |

Paired 95 % CIs (`evaluation.stats.paired_difference`, same episodes) of
attn+desc − attn-desc, mean+desc − mean-desc, attn+desc − mean+desc,
attn+desc − protonet and protonet − init-proto (what meta-training itself adds).

`--init pretrain` (default) starts every variant's backbone from the default
pipeline's `pretrain` stage output (`models/pretrain`, read only; what
`meta_train.init: pretrain` does; it must match params.yaml's model and
prepare settings); `--init scratch` starts from the seeded random init.

Usage (from the project root; one process at a time on a shared machine):

    nice -n 15 .venv/bin/python benchmarks/conditional_ablation.py --quick   # smoke check, a few minutes
    .venv/bin/python benchmarks/conditional_ablation.py --steps 3000 --episodes 600 --threads 2

`--prepared` (default: the pipeline's prepared store, `data/prepared`, 32 px
RGB) must hold mini_imagenet and the four medical datasets (`dvc repro
prepare`). Writes benchmarks/results/conditional_ablation[-quick].json and
prints a markdown table; the file is rewritten after every variant (`complete`
false until the last), and `--summarise FILE` re-prints its tables. No MLflow
run: this is a benchmark, not a stage.
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
from metatransfer.algorithms.base import MetaLearner
from metatransfer.config import Params, PrepareParams, load_params
from metatransfer.data.store import SplitData, available, load_split
from metatransfer.descriptions import description_tokens
from metatransfer.episodes import Episode, build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.layout import Layout
from metatransfer.learners import backbone_spec, init_from_pretrain
from metatransfer.training.meta_train import TrainSettings, meta_train
from metatransfer.training.sources import give_descriptions, mixed_source_sampler

ROOT = Path(__file__).resolve().parents[1]

Description = dict[str, str]

# (dataset, split): the meta-training sources, with their descriptions.
SOURCES: dict[tuple[str, str], Description] = {
    ("mini_imagenet", "meta_train"): {"domain": "natural colour photograph",
                                      "text": "objects animals everyday scenes"},
    ("omniglot_small", "meta_train"): {"domain": "handwritten characters",
                                       "text": "alphabet glyphs pen strokes grey scale drawing"},
    ("kmnist", "meta_train"): {"domain": "handwritten characters",
                               "text": "cursive japanese kuzushiji hiragana grey scale drawing"},
    ("brain_tumor_mri", "train"): {"modality": "MRI", "anatomy": "brain", "domain": "medical",
                                   "text": "axial slices tumour type grey scale scan"},
    ("retinamnist", "train"): {"modality": "fundus photograph", "anatomy": "retina eye", "domain": "medical",
                               "text": "diabetic retinopathy severity grade colour image"},
}
# Held-out targets (dataset, split): never meta-trained on. The medical ones are new domains
# whose descriptions share some words with the sources; mini_imagenet/meta_test is new classes
# of a source domain (so its description is that source's, every word seen).
TARGETS: dict[tuple[str, str], Description] = {
    ("ham10000_mel_nv", "test"): {"modality": "dermoscopy photograph", "anatomy": "skin", "domain": "medical",
                                  "text": "melanoma versus naevus lesion colour image"},
    ("breastmnist", "test"): {"modality": "ultrasound", "anatomy": "breast", "domain": "medical",
                              "text": "benign malignant tumour grey scale scan"},
    ("mini_imagenet", "meta_test"): SOURCES[("mini_imagenet", "meta_train")],
}
# name -> (algorithm, hparams, meta-trained?)
# Ordered so a run cut short (results are written after every variant) keeps the main contrasts.
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "init-proto": ("protonet", {}, False),
    "attn+desc": ("conditional", {"fusion": "attention", "use_description": True}, True),
    "attn-desc": ("conditional", {"fusion": "attention", "use_description": False}, True),
    "protonet": ("protonet", {}, True),
    "mean+desc": ("conditional", {"fusion": "mean", "use_description": True}, True),
    "mean-desc": ("conditional", {"fusion": "mean", "use_description": False}, True),
}
PAIRS = (("attn+desc", "attn-desc"), ("mean+desc", "mean-desc"), ("attn+desc", "mean+desc"),
         ("attn+desc", "protonet"), ("protonet", "init-proto"))
# Source datasets the pipeline's store may lack: prepared from the mirror, one store each.
EXTRA_DATASETS = ("omniglot_small", "kmnist")


def ensure_extra(root: Path, dataset: str, image_size: int, params_file: Path) -> Path:
    """The store `root/<dataset>` holding `dataset` (RGB, `image_size`), prepared from the mirror if missing.

    One store per dataset, because `prepare` replaces its output folder as a whole.
    """
    store = root / dataset
    if store.is_dir() and dataset in available(store):
        return store
    from metatransfer.data.fetch import fetch
    from metatransfer.data.prepare import prepare

    params = load_params(params_file)
    mirror = Path(params.data.mirror)
    mirror = mirror if mirror.is_absolute() else ROOT / mirror
    raw = root / "raw"
    fetch(dataset, raw, mirror)
    pp = PrepareParams(image_size=image_size, channels=3, omniglot_protocol="background_evaluation",
                       meta_val_classes=0)
    prepare(pp, (dataset,), raw, store, params.seed)
    return store


def load(stores: list[Path], dataset: str, split: str) -> SplitData:
    """The split from the first store that has it."""
    for store in stores:
        if store.is_dir() and split in available(store).get(dataset, []):
            return load_split(store, dataset, split)
    raise SystemExit(f"{dataset}/{split}: in none of {[str(s) for s in stores]}; run `dvc repro prepare` "
                     "(or pass --prepared)")


def unseen_words(target: Description, sources: list[Description]) -> list[str]:
    """The words of a target description that no source description uses (each once, in order)."""
    seen = {w for d in sources for w in description_tokens(d)}
    return list(dict.fromkeys(w for w in description_tokens(target) if w not in seen))


def target_episodes(args: argparse.Namespace, params: Params, stores: list[Path]) -> dict[str, list[Episode]]:
    """Each target's fixed 2-way K-shot test episodes (seed + 2), built once and shared by every variant."""
    out: dict[str, list[Episode]] = {}
    for target, split in TARGETS:
        test = load(stores, target, split)
        fixed = build_fixed_episodes(test, 2, args.k_shot, args.n_query, args.episodes, seed=params.seed + 2)
        out[f"{target}/{split}"] = list(fixed.iter_episodes(test))
    return out


def train_variant(name: str, args: argparse.Namespace, params: Params, splits: list[SplitData]) -> MetaLearner:
    """Build one variant from the seed and start, meta-train it on the shared source episodes."""
    algorithm, hp, trained = VARIANTS[name]
    # A fresh sampler with the same seed per variant: every variant sees the same episodes.
    sampler = mixed_source_sampler(splits, [1.0] * len(splits), args.n_way, args.k_shot, args.n_query,
                                   seed=params.seed, rotation_augment=False)
    torch.manual_seed(params.seed)
    learner = build_algorithm(algorithm, backbone_spec(params), args.n_way, hp, num_classes=sampler.num_classes)
    if args.init == "pretrain":
        init_from_pretrain(learner, Layout.of(ROOT, params).root)
    give_descriptions(learner, sampler, list(SOURCES.values()))
    if not trained:
        return learner
    settings = TrainSettings(steps=args.steps, meta_batch_size=args.meta_batch, meta_lr=args.lr,
                             val_every=args.steps, select_best=False)
    val = [sampler.sample() for _ in range(2)]  # recorded only (select_best false): last weights kept
    w, c = time.perf_counter(), time.process_time()
    result = meta_train(learner, sampler.sample, val, settings)
    print(f"  {name}: {result.steps_done} steps in {time.perf_counter() - w:.0f} s wall, "
          f"{time.process_time() - c:.0f} s CPU, load {os.getloadavg()[0]:.2f}", flush=True)
    return result.learner


def score_variant(name: str, learner: MetaLearner, episodes: dict[str, list[Episode]]) -> dict[str, list[float]]:
    """One variant's per-episode accuracies on each target, adapted with the target's description."""
    w = time.perf_counter()
    accs: dict[str, list[float]] = {}
    for (target, split), description in TARGETS.items():
        if hasattr(learner, "set_description"):
            learner.set_description(description)
        accs[f"{target}/{split}"] = episode_accuracies(learner, episodes[f"{target}/{split}"]).tolist()
    print(f"  {name}: scored {sum(len(e) for e in episodes.values())} episodes in "
          f"{time.perf_counter() - w:.0f} s", flush=True)
    return accs


def summarise(per_episode: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per target: its description, unseen words, mean ± CI per variant and the paired differences."""
    sources = list(SOURCES.values())
    results: dict[str, Any] = {}
    for (target, split), description in TARGETS.items():
        key = f"{target}/{split}"
        accs = {n: np.asarray(v[key]) for n, v in per_episode.items()}
        results[key] = {
            "description": description,
            "unseen_words": unseen_words(description, sources),
            "acc": {n: dataclasses.asdict(mean_ci(a)) for n, a in accs.items()},
            "paired": {f"{a} - {b}": dataclasses.asdict(paired_difference(accs[a], accs[b]))
                       for a, b in PAIRS if a in accs and b in accs},
        }
    return results


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
    ap.add_argument("--init", choices=("pretrain", "scratch"), default="pretrain",
                    help="backbone start: the pipeline's models/pretrain (read only) or the seeded random init")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--prepared", default="", help="store with mini_imagenet + medical (default: the pipeline's)")
    ap.add_argument("--extra-root", default="/tmp/bench/conditional32",
                    help="folder of one prepared store per extra source (omniglot_small, kmnist)")
    ap.add_argument("--out", default="")
    ap.add_argument("--summarise", default="", metavar="JSON",
                    help="only re-print the tables of a results file (recomputed from its per-episode accuracies)")
    args = ap.parse_args()
    if args.summarise:
        doc = json.loads(Path(args.summarise).read_text())
        print(markdown({**doc, "results": summarise(doc["per_episode"])}))
        return
    if args.quick:
        args.steps, args.episodes = 60, 30
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    prepared = Path(args.prepared).resolve() if args.prepared else Layout.of(ROOT, params).prepared_dir
    extra = [ensure_extra(Path(args.extra_root), d, params.prepare.image_size, Path(args.params))
             for d in EXTRA_DATASETS]
    stores = [prepared, *extra]
    splits = [load(stores, d, s) for d, s in SOURCES]
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()
    print(f"conditional_ablation: {args.steps} steps x {len(VARIANTS)} variants, init {args.init}, sources "
          f"{[f'{d}/{s}' for d, s in SOURCES]}, {args.n_way}-way {args.k_shot}-shot, {args.episodes} "
          f"episodes/target, {args.threads} thread(s), load {load0[0]:.2f}", flush=True)
    episodes = target_episodes(args, params, stores)
    default_out = ROOT / "benchmarks" / "results" / f"conditional_ablation{'-quick' if args.quick else ''}.json"
    out = Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_episode: dict[str, dict[str, list[float]]] = {}
    # init-proto (not meta-trained) only with the pre-trained start: on a random backbone it says nothing.
    names = [n for n, (_, _, trained) in VARIANTS.items() if trained or args.init == "pretrain"]
    for name in names:
        per_episode[name] = score_variant(name, train_variant(name, args, params, splits), episodes)
        # Written after every variant, so a run cut short still leaves the variants it finished.
        doc = {"args": vars(args), "sources": [f"{d}/{s}" for d, s in SOURCES],
               "source_descriptions": {f"{d}/{s}": v for (d, s), v in SOURCES.items()},
               "targets": [f"{d}/{s}" for d, s in TARGETS], "complete": len(per_episode) == len(names),
               "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
               "load_start": [round(x, 2) for x in load0], "load_end": [round(x, 2) for x in os.getloadavg()],
               "results": summarise(per_episode), "per_episode": per_episode}
        out.write_text(json.dumps(doc) + "\n")
    print(markdown(doc))
    print(f"wrote {out} ({doc['wall_s']} s wall, {doc['cpu_s']} s CPU)")


def markdown(doc: dict[str, Any]) -> str:
    """The accuracy table (mean ± 95 % CI), the paired differences and the unseen words, per target."""
    names = [n for n in VARIANTS if any(n in r["acc"] for r in doc["results"].values())]
    lines = ["| target (2-way) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for target, r in doc["results"].items():
        cells = [f"{100 * r['acc'][n]['mean']:.1f} ± {100 * r['acc'][n]['ci']:.1f}" for n in names]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    pairs = [f"{a} - {b}" for a, b in PAIRS if any(f"{a} - {b}" in r["paired"] for r in doc["results"].values())]
    if pairs:  # none yet in a run cut short before both members of a pair finished
        lines += ["", "| target | " + " | ".join(p.replace(" - ", " − ") for p in pairs) + " |",
                  "|---" * (len(pairs) + 1) + "|"]
        for target, r in doc["results"].items():
            cells = [f"{100 * r['paired'][p]['mean']:+.1f} ± {100 * r['paired'][p]['ci']:.1f}" for p in pairs]
            lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "| target | words no source uses |", "|---|---|"]
    for target, r in doc["results"].items():
        lines.append(f"| {target} | {', '.join(r['unseen_words']) or '(none)'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
