"""Val-split exploration (RESULTS.md section 5b): P>M>F fine-tuning settings vs scratch at 32 px.

Reads the section 5 learners (/tmp/bench/n2m32, made by natural_to_medical.py) and the 32 px
store (/tmp/scen/prepared32); scores 30 fixed val-split episodes per target; prints one line per variant.
Usage: .venv/bin/python benchmarks/explore/n2m32_finetune_lr.py [variant,...]
"""
import sys, time, logging
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks")); sys.path.insert(0, str(ROOT))
import numpy as np, torch
from natural_to_medical import PMF
from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import load_learner
from metatransfer.config import load_params, AugmentParams
from metatransfer.data.store import load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.learners import backbone_spec
from metatransfer.training.finetune import FinetuneSettings
logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(1)
P = "/tmp/scen/prepared32"; W = "/tmp/bench/n2m32"
params = load_params(ROOT / "params.yaml")
import pathlib
params = params.model_copy(update=dict(prepare=params.prepare.model_copy(update=dict(image_size=32, channels=3))))
bpp = load_learner(pathlib.Path(W) / "models/pretrain"); pn = load_learner(pathlib.Path(W) / "models/meta/protonet")
torch.manual_seed(0)
scratch = build_algorithm("scratch", backbone_spec(params), 5, params.meta_train.hparams.get("scratch"))
aug = params.finetune.augment
def S(lr, steps, augment=True, bs=40):
    return FinetuneSettings(steps=steps, lr=lr, batch_size=bs, train_layers="all", eval_every=steps, patience=0,
                            device="cpu", precision="bf16", augment=aug if augment else AugmentParams(enabled=False))
variants = dict(
    scratch=scratch, baselinepp=bpp,
    pmf_1e3=PMF(pn, S(1e-3, 50), 0), pmf_1e2=PMF(pn, S(1e-2, 50), 0), pmf_1e2_noaug=PMF(pn, S(1e-2, 50, False), 0),
    pmf_3e3_100=PMF(pn, S(3e-3, 100), 0), ft_bpp_1e2=PMF(bpp, S(1e-2, 50), 0), ft_bpp_3e3_100=PMF(bpp, S(3e-3, 100), 0))
sel = sys.argv[1].split(",") if len(sys.argv) > 1 else list(variants)
T = {"brain_tumor_mri": (4, 5, 15), "ham10000_mel_nv": (2, 5, 15), "breastmnist": (2, 5, 10), "retinamnist": (5, 3, 3)}
for t, (n, k, q) in T.items():
    v = load_split(P, t, "val")
    eps = list(build_fixed_episodes(v, n, k, q, 30, seed=7).iter_episodes(v))
    accs = {}
    for name in sel:
        t0 = time.time(); accs[name] = episode_accuracies(variants[name], eps); dt = time.time() - t0
        d = paired_difference(accs[name], accs["scratch"]) if name != "scratch" else None
        print(f"{t} {k}-shot {name}: {100*accs[name].mean():.1f}" + (f" vs scratch {100*d.mean:+.1f}±{100*d.ci:.1f}" if d else "") + f" ({dt:.0f}s)", flush=True)
