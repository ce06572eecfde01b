"""A seconds-long profile of the default params, for smoke runs, tests and
orchestration benchmarks: the same stages and code, every size cut down.

Test scaffolding, not part of the installed package: import it as
`tests.quick` with the project root on sys.path (pytest from the root, or a
benchmark run as `python -m benchmarks.<name>` from the root)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def quick_params(params: dict[str, Any], mirror: str | Path | None = None) -> dict[str, Any]:
    """Return a shrunk copy of a parsed params mapping (either scenario).

    Args:
        params: the parsed params (params.yaml: natural images -> medical
            targets; or scenarios/characters.yaml).
        mirror: dataset mirror folder to use (absolute); None keeps the param.
            For the natural-image scenario pass a slice mirror
            (tests/slices.py: a few real classes and images per dataset).

    Returns:
        A new mapping: at most 4 datasets, 4 episodes per set and 2 shots,
        6 pre-training steps, 2 algorithms x 4 meta-steps (no time guard;
        scratch adapts with 10 steps), one thread per process, 6 fine-tuning
        steps, scratch as the reference method, the quality gate recording
        but not refusing.
    """
    p = copy.deepcopy(params)
    if mirror is not None:
        p["data"]["mirror"] = str(mirror)
    natural = "mini_imagenet" in p["fetch"]["datasets"]
    if natural:
        # RetinaMNIST adds nothing the other three targets do not exercise.
        p["fetch"]["datasets"] = ["mini_imagenet", "brain_tumor_mri", "ham10000_mel_nv", "breastmnist"]
    else:
        p["fetch"]["datasets"] = ["omniglot", "retinamnist", "breastmnist"]
    kept = set(p["fetch"]["datasets"])
    p["episodes"]["sets"] = {k: s for k, s in p["episodes"]["sets"].items() if s["dataset"] in kept}
    for s in p["episodes"]["sets"].values():
        s["n_episodes"] = 4
        s["shots"] = s["shots"][:2]
        if natural:
            s["n_query"] = min(s["n_query"], 3)  # slices hold a few test images per class
    if p.get("pretrain"):
        p["pretrain"].update(steps=6, batch_size=16, val_every=3, val_episodes=3, n_query=3, checkpoint_every=3)
    # Steps are the only budget: no wall-clock guard, so a run on a loaded
    # machine is slower but ends with the same bytes (tests/integration/test_determinism.py).
    p["meta_train"].pop("time_budget_s", None)
    p["meta_train"].update(
        algorithms=["protonet", "fomaml"], steps=4, meta_batch_size=2,
        val_every=2, val_episodes=3, hparams={"scratch": {"steps": 10}},
    )
    if natural:
        p["meta_train"].update(k_shot=1, n_query=5)
    # One thread per stage process: these tensors are tiny, and on a shared,
    # loaded machine two intra-op threads per process cost up to 10x in
    # hand-offs (benchmarks/RESULTS.md, "Threads and contention").
    p.setdefault("runtime", {})["threads"] = 1
    with_pretrain = ["pretrain"] if p.get("pretrain") else []
    p["finetune"].update(methods=["protonet", "fomaml", *with_pretrain, "scratch"], steps=6, eval_every=3,
                         val_per_class=10, shots_per_class=5, force_method="",
                         targets=[t for t in p["finetune"]["targets"] if t in kept])
    p["evaluate"].update(methods=["protonet", "fomaml", *with_pretrain, "scratch"], reference="scratch")
    # Four meta-steps and six fine-tuning steps do not beat chance reliably (that is
    # not their purpose): the quality gate still records its verdict in the
    # outputs but lets the models through, so the registry and serving paths run.
    # tests/integration/test_quality_gate.py turns it back on.
    p.setdefault("promote", {})["quality_gate"] = False
    return p


def project_env(dest: Path) -> dict[str, str]:
    """Environment for the processes of a scratch project: its own MLflow store
    (the default sqlite file in `dest`), its own Prefect home, telemetry off,
    this interpreter first on PATH."""
    import os
    import sys

    env = dict(os.environ)
    env.update(
        DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(Path(dest) / ".prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=env.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("METATRANSFER_PARENT_RUN_ID", None)
    return env


def make_project(dest: Path, params: dict[str, Any], code_root: Path) -> Path:
    """A fresh scratch project: `code_root`'s library and dvc.yaml, the given
    params, git and DVC initialised (telemetry off) and one commit.

    Used by the integration tests and the orchestration benchmark.
    """
    import shutil
    import subprocess
    import sys

    import yaml

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(code_root) / "metatransfer", dest / "metatransfer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(code_root) / "dvc.yaml", dest / "dvc.yaml")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(dest)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                [sys.executable, "-m", "dvc", "config", "core.check_update", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "scratch project"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True, text=True)
    return dest
