"""Episodes per second of EpisodeSampler on real Omniglot (background set, 28x28).

Usage (from the project root):

    .venv/bin/python benchmarks/bench_sampler.py [--npz PATH] [--episodes N] [--threads 1 2]

Loads the background set (964 characters x 20 drawings, 105x105 bool with
True = background), inverts it so ink is bright, resizes to 28x28 with
torch's area interpolation, and times `sample()` (including the uint8 →
float32 conversion) for 5-way 1-shot 15-query with rotation off and on, and
20-way 5-shot 15-query for comparison, for each torch thread count. Prints
one line per setting and the load average (other processes on the cores
change these figures a lot).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from metatransfer.data.store import SplitData
from metatransfer.episodes import EpisodeSampler

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "shared/datasets/omniglot/images_background.npz"


def load_background(path: Path, size: int = 28) -> SplitData:
    """Omniglot background as a SplitData of uint8 (N, 1, size, size), ink bright."""
    with np.load(path) as npz:
        background = npz["images"]  # bool (classes, drawings, 105, 105)
    n_classes, n_drawings, h, w = background.shape
    ink = torch.from_numpy(~background).reshape(-1, 1, h, w).to(torch.float32)
    small = F.interpolate(ink, size=(size, size), mode="area")
    images = (small * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), n_drawings)
    names = tuple(f"omniglot/background/{c:04d}" for c in range(n_classes))
    return SplitData("omniglot", "background", images, labels, names)


def episodes_per_second(sampler: EpisodeSampler, n: int) -> float:
    """Time n calls of sampler.sample() in one block, at the current torch thread count.

    `Timer.timeit` warms up with n // 100 calls (at least 2) first, untimed.
    """
    timer = Timer("sampler.sample()", globals={"sampler": sampler}, num_threads=torch.get_num_threads())
    return 1.0 / timer.timeit(number=n).mean


def main() -> None:
    """Parse arguments, load the data, print one episodes/s line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--episodes", type=int, default=20_000)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch intra-op thread counts to time (each op here is tiny, so more threads "
        "mostly add synchronisation, badly so when other processes share the cores)",
    )
    args = parser.parse_args()

    start = time.perf_counter()
    split = load_background(args.npz)
    print(
        f"loaded {split.images.shape[0]} images {tuple(split.images.shape[1:])} "
        f"of {len(split.class_names)} classes in {time.perf_counter() - start:.1f} s; "
        f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    settings = [
        (5, 1, 15, False),
        (5, 1, 15, True),
        (20, 5, 15, False),
        (20, 5, 15, True),
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for n_way, k_shot, n_query, rotation in settings:
            sampler = EpisodeSampler(split, n_way, k_shot, n_query, seed=0, rotation_augment=rotation)
            rate = episodes_per_second(sampler, args.episodes)
            print(
                f"threads={threads} {n_way:2d}-way {k_shot}-shot {n_query}-query 28x28 "
                f"rotation={'on ' if rotation else 'off'}: "
                f"{rate:9,.0f} episodes/s ({1e6 / rate:6.1f} us/episode)"
            )


if __name__ == "__main__":
    main()
