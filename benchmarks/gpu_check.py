"""The GPU path, end to end, for a machine with CUDA: the shrunk pipeline and the step-time benchmark.

    python -m benchmarks.gpu_check                     # both parts, prints one table
    python -m benchmarks.gpu_check --skip-pipeline     # step times only

Run from the project root with `-m`: the shrunk profile (tests/quick.py) and
benchmarks/bench_threads.py are imported as `tests.quick` and `benchmarks.bench_threads`.

1. Step time of every algorithm in `--algorithms` (default ProtoNet, MAML,
   FOMAML, ANIL, Baseline++) on CUDA vs the CPU (benchmarks/bench_threads.py's
   worker: fp32; and bf16 autocast on CUDA).
2. The shrunk pipeline (tests/quick.py) in a scratch project with
   `runtime.device: cuda`, then `dvc repro -f` again with
   `runtime.deterministic: true`: stage wall times and whether the DVC outputs
   are byte-identical between the two CUDA runs.

Without a CUDA device it refuses with exit code 2 and says why (this script
is for a GPU machine; the CPU numbers are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_times(algorithms: list[str], steps: int) -> list[dict]:
    """ms/step per algorithm on the CPU (all cores) and on CUDA (fp32, bf16)."""
    from benchmarks.bench_threads import run_workers

    rows = []
    cores = len(os.sched_getaffinity(0))
    for algo in algorithms:
        cpu = run_workers(algo, cores, 1, max(3, steps // 4), 2, "cpu")[0]["ms_median"]
        gpu = run_workers(algo, cores, 1, steps, 3, "cuda")[0]["ms_median"]
        rows.append({"algorithm": algo, "cpu_ms": round(cpu, 1), "cuda_ms": round(gpu, 1),
                     "speedup": round(cpu / gpu, 1)})
        print(f"{algo:10s} cpu {cpu:8.1f} ms  cuda {gpu:7.1f} ms  x{cpu / gpu:.1f}", flush=True)
    return rows


def outputs_digest(project: Path) -> dict[str, str]:
    """SHA-256 of every file under the DVC outputs."""
    out = {}
    for rel in ("models", "metrics", "data/episodes", "plots"):
        for f in sorted((project / rel).rglob("*")):
            if f.is_file():
                out[f.relative_to(project).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def pipeline(mirror: str) -> dict:
    """The shrunk pipeline twice on CUDA; stage times and the byte comparison."""
    import yaml

    from tests import quick

    params = quick.quick_params(yaml.safe_load((ROOT / "params.yaml").read_text()), mirror)
    params.setdefault("runtime", {}).update(device="cuda", deterministic=True)
    dest = quick.make_project(Path(tempfile.mkdtemp(prefix="gpu-check-")), params, ROOT)
    env = quick.project_env(dest)
    res = {"project": str(dest)}
    for i, args in enumerate((["repro"], ["repro", "-f"])):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=dest, env=env, capture_output=True, text=True)
        res[f"run{i + 1}_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            raise SystemExit(f"dvc {' '.join(args)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        res[f"digest{i + 1}"] = outputs_digest(dest)
    d1, d2 = res.pop("digest1"), res.pop("digest2")
    res["files"] = len(d1)
    res["differ"] = sorted(k for k in d1 if d1[k] != d2.get(k))
    tags = json.loads((dest / "reports" / "run_facts.json").read_text())
    res["meta_train_seconds"] = {a: f["seconds"] for a, f in tags["meta_train"]["algorithms"].items()}
    return res


def main(argv: list[str] | None = None) -> int:
    """Entry: see the module doc."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default="protonet,maml,fomaml,anil,baselinepp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mirror", default=os.environ.get("METATRANSFER_MIRROR", str(ROOT.parent / "shared" / "datasets")))
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from metatransfer.runtime import unavailable_reason

    reason = unavailable_reason("cuda")
    if reason is not None:
        print(f"gpu_check: refusing to run: {reason}. This script checks the CUDA path on a machine with an "
              "NVIDIA GPU and a CUDA build of torch; on this machine use benchmarks/bench_threads.py.", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}", flush=True)
    rows = step_times([a for a in args.algorithms.split(",") if a], args.steps)
    print("\n| algorithm | CPU ms/step | CUDA ms/step | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['cpu_ms']} | {r['cuda_ms']} | {r['speedup']} |")
    if not args.skip_pipeline:
        res = pipeline(args.mirror)
        print(f"\nshrunk pipeline on CUDA: first run {res['run1_s']} s, forced re-run {res['run2_s']} s; "
              f"{res['files']} output files, {len(res['differ'])} differ between the two runs"
              + (f": {res['differ']}" if res["differ"] else " (byte-identical)"))
        print(f"meta_train seconds per algorithm: {res['meta_train_seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
