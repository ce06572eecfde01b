"""Conv-4 forward+backward+Adam step on CPU: fp32 vs channels-last vs bfloat16 autocast.

The data-path and kernel levers behind `meta_train.precision: bf16` and
`meta_train.channels_last: true`, measured without any algorithm around
them: one Conv-4 (64 channels, 28x28 grey) training step on a batch of
random images, for several batch sizes (an episode's image count: 60-way
1-shot 5-query is 360 images, 60-way 5-shot 5-query 600).

Usage: python benchmarks/bench_kernels.py [--threads 2] [--batches 150,300,360,600] [--min-run-time 2]
Prints ms per step and images/s per (variant, batch), and the load average.
Each cell is the median of `torch.utils.benchmark.Timer.blocked_autorange`
(at these step times a block is one step: the median of single steps).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from torch.utils.benchmark import Timer

from metatransfer.models import BackboneSpec, build_backbone

VARIANTS = {
    "fp32": (False, False),
    "channels-last": (True, False),
    "bf16": (False, True),
    "channels-last + bf16": (True, True),
}


def step_ms(batch: int, channels_last: bool, bf16: bool, min_run_time: float) -> float:
    """Median ms of one zero_grad + forward + loss + backward + Adam step after 3 warm-up steps.

    Steps are timed for at least `min_run_time` seconds at the current torch thread count.
    """
    torch.manual_seed(0)
    model = build_backbone(BackboneSpec(), track_running_stats=True).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 28, 28)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.float().pow(2).mean().backward()
        opt.step()

    for _ in range(3):  # Adam's state and the kernels' first-call costs stay out of the figure
        step()
    # The Timer sets its own thread count (default 1): keep the one main() chose.
    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return 1000 * timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    """Time every variant at every batch size and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="150,300,360,600")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed steps per cell (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    print("| variant | " + " | ".join(f"{b} images: ms (images/s)" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for name, (cl, bf16) in VARIANTS.items():
        cells = []
        for b in batches:
            ms = step_ms(b, cl, bf16, args.min_run_time)
            cells.append(f"{ms:.1f} ({1000 * b / ms:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
