"""Score a saved pre-trained learner as a nearest-centroid (ProtoNet) classifier on mini-ImageNet test episodes.

RESULTS.md section 6: the prototype classifier on the pre-trained backbone with
no meta-training steps (Chen et al. 2021's "Classifier-Baseline" evaluation),
on the same 600 fixed 5-way test episodes per shot as benchmarks/mini_imagenet.py
(seed params.seed, 15 queries per class).

Usage: .venv/bin/python benchmarks/explore/score_mini_imagenet_centroid.py LEARNER_DIR [--prepared DIR] [--episodes 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from metatransfer.algorithms import build_algorithm  # noqa: E402
from metatransfer.artifacts import load_learner  # noqa: E402
from metatransfer.config import load_params  # noqa: E402
from metatransfer.data.store import load_split  # noqa: E402
from metatransfer.episodes import build_fixed_episodes  # noqa: E402
from metatransfer.evaluation.episodic import episode_accuracies  # noqa: E402
from metatransfer.evaluation.stats import mean_ci  # noqa: E402
from metatransfer.learners import copy_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("learner")
    ap.add_argument("--prepared", default="/tmp/bench/prepared84")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    pre = load_learner(Path(args.learner))
    torch.manual_seed(params.seed)
    proto = build_algorithm("protonet", pre.backbone_spec, 5, params.meta_train.hparams.get("protonet"))
    copy_backbone(pre.backbone, proto.backbone, "pretrain -> protonet (no meta-training)")
    proto.eval()
    test = load_split(Path(args.prepared), "mini_imagenet", "meta_test")
    out = {}
    for k in (1, 5):
        fixed = build_fixed_episodes(test, 5, k, 15, args.episodes, seed=params.seed)
        t0 = time.perf_counter()
        ci = mean_ci(episode_accuracies(proto, fixed.iter_episodes(test)))
        out[str(k)] = {"mean": round(100 * ci.mean, 2), "ci95": round(100 * ci.ci, 2),
                       "eval_wall_s": round(time.perf_counter() - t0, 1)}
        print(f"test 5-way {k}-shot centroid on {args.learner}: {100 * ci.mean:.2f} ± {100 * ci.ci:.2f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"learner": args.learner, "episodes": args.episodes, "test": out}, indent=1))


if __name__ == "__main__":
    main()
