"""The default pipeline's pre-training step (Conv-4, 32 px RGB, batch 64,
channels-last) at 1 and 2 threads, fp32 and bf16, each beside one busy
process that this script starts and stops, plus whether the trained bytes
depend on the thread count.

    python benchmarks/bench_oversubscription.py [--steps 20]

Prints ms/step per condition and a digest of the weights after 5 seeded
steps per (threads, precision): different digests mean the thread count is
part of what makes a run reproducible (runtime.threads is fixed by params,
never derived from the load).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import hashlib, json, sys, torch
from torch.utils.benchmark import Timer
from metatransfer.models import BackboneSpec, build_backbone
threads, bf16, steps = int(sys.argv[1]), sys.argv[2] == "bf16", int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
bb = build_backbone(BackboneSpec(name="conv4", in_channels=3, image_size=32, hidden=64))
m = torch.nn.Sequential(bb, torch.nn.Linear(bb.out_dim, 64)).to(memory_format=torch.channels_last)
opt = torch.optim.Adam(m.parameters())
g = torch.Generator().manual_seed(1)
def step():
    x = torch.rand(64, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 64, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(m(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(5):
    step()
digest = hashlib.sha256(b"".join(p.detach().contiguous().numpy().tobytes() for p in m.parameters())).hexdigest()[:16]
# Mean of `steps` steps in one block (after the Timer's own 2 untimed warm-up steps),
# at this worker's thread count (the Timer's default is 1).
seconds = Timer("step()", globals={"step": step}, num_threads=threads).timeit(number=steps).mean
print(json.dumps({"ms": 1000 * seconds, "digest_after_5": digest}))
"""

BUSY = "while True: pass"


def run(threads: int, precision: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), precision, str(steps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        rows = [(t, p, run(t, p, args.steps)) for p in ("fp32", "bf16") for t in (1, 2)]
    finally:
        busy.kill()
        busy.wait()
    print("| precision | threads | ms/step beside 1 busy process | weights digest after 5 steps |")
    print("|---|---|---|---|")
    for t, p, r in rows:
        print(f"| {p} | {t} | {r['ms']:.1f} | {r['digest_after_5']} |")


if __name__ == "__main__":
    main()
