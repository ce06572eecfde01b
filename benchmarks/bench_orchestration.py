"""Orchestration overhead: the same stages run directly, by `dvc repro -f`, and by
the Prefect `pipeline` flow (force=True), in a scratch copy of the project.

    python -m benchmarks.bench_orchestration            # quick params (seconds per run)
    python -m benchmarks.bench_orchestration --default  # the default params (minutes per run)

Run it from the project root with `-m`: the shrunk profile is test scaffolding
(`tests/quick.py`, not installed), importable only with the root on sys.path.

Overhead = wall time of the entry point − wall time of the bare stage commands.
Prints one table; figures depend on the machine's load (the load average is shown).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["fetch", "prepare", "episodes", "meta_train", "finetune", "evaluate"]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default", action="store_true", help="use the project's params.yaml as is")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "datasets"))
    args = parser.parse_args()
    from tests.quick import make_project, project_env, quick_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["mirror"] = args.mirror
    if not args.default:
        params = quick_params(params, args.mirror)
    with tempfile.TemporaryDirectory(prefix="bench_orch_") as tmp:
        dest = Path(tmp)
        make_project(dest, params, ROOT)
        env = project_env(dest)
        timed([sys.executable, "-m", "dvc", "repro"], dest, env)  # warm caches, fill data/
        direct = sum(timed([sys.executable, "-m", f"metatransfer.stages.{s}"], dest, env) for s in STAGES)
        dvc = timed([sys.executable, "-m", "dvc", "repro", "-f"], dest, env)
        prefect = timed([sys.executable, "-c", "from flows.pipeline import pipeline; pipeline(force=True)"], dest, env)
        noop = timed([sys.executable, "-m", "dvc", "repro"], dest, env)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"params: {'default' if args.default else 'quick'}")
    print("| entry point | wall s | overhead s | overhead % of direct |")
    print("|---|---|---|---|")
    print(f"| stage commands run directly | {direct:.1f} | - | - |")
    for name, t in (("dvc repro -f", dvc), ("Prefect pipeline flow (force, ephemeral API)", prefect)):
        print(f"| {name} | {t:.1f} | {t - direct:.1f} | {100 * (t - direct) / direct:.1f} |")
    print(f"| dvc repro with nothing to do | {noop:.1f} | - | - |")


if __name__ == "__main__":
    main()
