"""A seconds-long profile of the default params, for smoke runs, tests and
orchestration benchmarks: the same stages and code, every size cut down."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def quick_params(params: dict[str, Any], mirror: str | Path | None = None) -> dict[str, Any]:
    """Return a shrunk copy of a parsed params.yaml mapping.

    Args:
        params: the parsed default params.
        mirror: dataset mirror folder to use (absolute); None keeps the param.

    Returns:
        A new mapping: 3 datasets, 4 episodes per set, 2 algorithms x 4 steps,
        6 fine-tuning steps, scratch as the reference method.
    """
    p = copy.deepcopy(params)
    if mirror is not None:
        p["data"]["mirror"] = str(mirror)
    p["fetch"]["datasets"] = ["omniglot", "retinamnist", "breastmnist"]
    for s in p["episodes"]["sets"].values():
        s["n_episodes"] = 4
        s["shots"] = s["shots"][:2]
    p["meta_train"].update(
        algorithms=["protonet", "fomaml"], steps=4, time_budget_s=10_000, meta_batch_size=2,
        val_every=2, val_episodes=3, hparams={},
    )
    p["finetune"].update(methods=["protonet", "fomaml", "scratch"], steps=6, eval_every=3,
                         val_per_class=10, shots_per_class=5, force_method="")
    p["evaluate"].update(methods=["protonet", "fomaml", "scratch"], reference="scratch")
    return p
