"""Val-split exploration (RESULTS.md section 5b): partial transfer (first j pre-trained blocks) vs scratch.

Reads the section 5 learners (/tmp/bench/n2m32) and the 32 px store (/tmp/scen/prepared32);
scratch's recipe with the first j Conv-4 blocks copied from the pre-trained (bpp<j>) or ProtoNet (pn<j>) backbone.
Usage: .venv/bin/python benchmarks/explore/n2m32_partial_transfer.py [variant,...]
"""
import sys, time, logging, copy, pathlib
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import numpy as np, torch
from metatransfer.algorithms import build_algorithm
from metatransfer.algorithms import _support_fit
from metatransfer.artifacts import load_learner
from metatransfer.config import load_params
from metatransfer.data.store import load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import paired_difference
from metatransfer.learners import backbone_spec
logging.basicConfig(level=logging.WARNING)
torch.set_num_threads(1)
P = "/tmp/scen/prepared32"; W = pathlib.Path("/tmp/bench/n2m32")
params = load_params(ROOT / "params.yaml")
params = params.model_copy(update=dict(prepare=params.prepare.model_copy(update=dict(image_size=32, channels=3))))
src = {"bpp": load_learner(W / "models/pretrain"), "pn": load_learner(W / "models/meta/protonet")}
def make(j, which="bpp", steps=25, lr=1e-3):
    hp = params.meta_train.hparams.get("scratch").model_copy(update=dict(steps=steps, lr=lr)) if False else None
    torch.manual_seed(0)
    s = build_algorithm("scratch", backbone_spec(params), 5, params.meta_train.hparams.get("scratch"))
    if j == 0: return s
    pre = src[which].backbone
    orig = s.initial_model
    def init(n_way):
        m = orig(n_way)
        enc_src = pre.encoder if hasattr(pre, "encoder") else pre.backbone.encoder
        for b in range(j):
            m.backbone.encoder[b].load_state_dict(enc_src[b].state_dict())
        return m
    s.initial_model = init
    return s
variants = {"scratch": make(0), "bpp1": make(1), "bpp2": make(2), "bpp3": make(3), "bpp4": make(4), "pn2": make(2, "pn"), "pn4": make(4, "pn")}
sel = sys.argv[1].split(",") if len(sys.argv) > 1 else list(variants)
T = {"brain_tumor_mri": (4, 5, 15), "ham10000_mel_nv": (2, 5, 15), "breastmnist": (2, 5, 10), }
for t, (n, k, q) in T.items():
    v = load_split(P, t, "val")
    eps = list(build_fixed_episodes(v, n, k, q, 30, seed=7).iter_episodes(v))
    accs = {}
    for name in sel:
        t0 = time.time(); accs[name] = episode_accuracies(variants[name], eps); dt = time.time() - t0
        d = paired_difference(accs[name], accs["scratch"]) if name != "scratch" else None
        print(f"{t} {k}-shot {name}: {100*accs[name].mean():.1f}" + (f" vs scratch {100*d.mean:+.1f}±{100*d.ci:.1f}" if d else "") + f" ({dt:.0f}s)", flush=True)
