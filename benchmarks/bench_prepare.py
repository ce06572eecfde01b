"""Benchmark `prepare`: wall time and peak memory.

Two modes:

* ``--mode arrays`` (default, the original benchmark): all of Omniglot
  (32,460 images) + RetinaMNIST + BreastMNIST + KMNIST at 28x28 grey.
* ``--mode mini_imagenet``: mini-ImageNet (52,000 JPEGs of the mirror, csv
  layout) at each ``--sizes`` side, 3 channels. Each size runs in a fresh
  child process so its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
  is its own; ``--classes N`` keeps the first N classes of each csv split
  (a stated subset, for large sides).

Usage (from the project root; `--classes` slices the mirror with tests/slices.py,
which is not installed: run with `-m` so that the root is on sys.path):
    python -m benchmarks.bench_prepare [--threads 2]
    python -m benchmarks.bench_prepare --mode mini_imagenet --sizes 32 84 224 [--classes 5]
Prints a table: images, wall seconds (fetch excluded), images/s, peak RSS, store size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metatransfer.config import PrepareParams
from metatransfer.data.prepare import prepare
from metatransfer.data.fetch import fetch

DATASETS = ("omniglot", "retinamnist", "breastmnist", "kmnist")
DEFAULT_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_arrays(args: argparse.Namespace) -> None:
    """Fetch the four array datasets into a temp dir, time `prepare`, print the figures."""
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


def _one_size(args: argparse.Namespace) -> None:
    """Child process: prepare mini-ImageNet from an already fetched raw dir at one size; print JSON."""
    params = PrepareParams(image_size=args.one, channels=3, omniglot_protocol="background_evaluation",
                           meta_val_classes=0)
    out = Path(args.out)
    base_rss = _peak_rss_mb()
    t0 = time.perf_counter()
    report = prepare(params, ("mini_imagenet",), Path(args.raw), out, seed=0)
    wall = time.perf_counter() - t0
    size = (out / "mini_imagenet" / "images.npy").stat().st_size
    print(json.dumps({"size": args.one, "images": report.n_images, "wall_s": wall, "peak_rss_mb": _peak_rss_mb(),
                      "rss_before_mb": base_rss, "store_mb": size / 2**20, "quarantined": report.quarantined}))


def bench_mini_imagenet(args: argparse.Namespace) -> None:
    """Fetch mini-ImageNet (or a class subset) once, then prepare it at each size in a child process."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        mirror = Path(args.mirror)
        if args.classes:
            from tests.slices import slice_mini_imagenet  # the project root is on sys.path: run with -m

            slice_mini_imagenet(Path(tmp) / "mirror", mirror, n_classes=args.classes, per_class=600)
            mirror = Path(tmp) / "mirror"
        raw = Path(tmp) / "raw"
        t0 = time.perf_counter()
        fetch("mini_imagenet", raw, mirror)
        fetch_s = time.perf_counter() - t0
        rows = []
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(size), "--raw", str(raw), "--out", str(Path(tmp) / f"p{size}"),
                   "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            subprocess.run(["rm", "-rf", str(Path(tmp) / f"p{size}")], check=True)
    load = os.getloadavg()
    print(f"mini-ImageNet{f' (first {args.classes} classes per split)' if args.classes else ''}: fetch (link + "
          f"verify) {fetch_s:.1f} s; threads {args.threads}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'side':>5} {'images':>7} {'wall_s':>8} {'img/s':>7} {'peak_RSS_MB':>12} {'store_MB':>9} {'quarantined':>11}")
    for r in rows:
        print(f"{r['size']:>5} {r['images']:>7} {r['wall_s']:>8.1f} {r['images'] / r['wall_s']:>7.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['store_mb']:>9.0f} {r['quarantined']:>11}")


def main() -> None:
    """Parse arguments and run the chosen mode."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("arrays", "mini_imagenet"), default="arrays")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mirror", default=os.environ.get("METATRANSFER_MIRROR") or str(DEFAULT_MIRROR))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 84, 224])
    ap.add_argument("--classes", type=int, default=0, help="first N classes per csv split (0 = all)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary raw and prepared data")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--raw", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        _one_size(args)
    elif args.mode == "mini_imagenet":
        bench_mini_imagenet(args)
    else:
        bench_arrays(args)


if __name__ == "__main__":
    main()
