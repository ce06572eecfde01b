"""Benchmark: prepare all of Omniglot (32,460 images) + RetinaMNIST + BreastMNIST + KMNIST from the mirror.

Usage: python benchmarks/bench_prepare.py [--threads 2]
Prints wall seconds (fetch from the mirror excluded) and images/s.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from metatransfer.config import PrepareParams
from metatransfer.data.prepare import prepare
from metatransfer.data.sources import fetch

DATASETS = ("omniglot", "retinamnist", "breastmnist", "kmnist")


def main() -> None:
    """Fetch the four datasets into a temp dir, time `prepare`, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mirror", default=os.environ.get("METATRANSFER_MIRROR")
                    or str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    params = PrepareParams(image_size=28, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=100)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        for name in DATASETS:
            fetch(name, raw, args.mirror)
        t0 = time.perf_counter()
        report = prepare(params, DATASETS, raw, Path(tmp) / "prepared", seed=0)
        wall = time.perf_counter() - t0
    per = {n: d["n_images"] for n, d in report.datasets.items()}
    print(f"datasets: {per}")
    print(f"threads: {args.threads}  images: {report.n_images}  wall_s: {wall:.2f}  images_per_s: {report.n_images / wall:.0f}")


if __name__ == "__main__":
    main()
