"""`pretrain` stage: supervised pre-training on every source class; writes
`models/pretrain/`, `metrics/pretrain.json` and `plots/pretrain/`.

The saved model is a Baseline++ (`pretrain.head: cosine`) or Baseline
(`linear`) learner: its backbone initialises `meta_train` (`meta_train.init:
pretrain`), and as the method `pretrain` in `finetune`/`evaluate` it is the
"fine-tuning after pre-training only" baseline. Checkpoints go to
`checkpoints/pretrain/` (outside DVC's outputs); a killed run resumes from
the newest one and the folder is deleted once the stage has succeeded.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import save_learner
from metatransfer.config import Params, PretrainParams, flatten
from metatransfer.data.store import load_split
from metatransfer.episodes import build_fixed_episodes, split_fingerprint
from metatransfer.layout import Layout
from metatransfer.learners import backbone_spec, init_from_file
from metatransfer.training.checkpoint import CheckpointConfig, clear_checkpoints, code_digest, fingerprint
from metatransfer.training.pretrain import PretrainResult, PretrainSettings, pretrain

log = logging.getLogger(__name__)

CODE_PATHS = ("models", "augment.py", "training/pretrain.py", "stages/pretrain.py", "algorithms/baseline.py",
              "algorithms/baselinepp.py")


def settings_of(p: PretrainParams) -> PretrainSettings:
    """The loop's settings from the params section."""
    return PretrainSettings(steps=p.steps, batch_size=p.batch_size, lr=p.lr, optimizer=p.optimizer,
                            weight_decay=p.weight_decay, lr_schedule=p.lr_schedule,
                            label_smoothing=p.label_smoothing, val_every=p.val_every, augment=p.augment,
                            channels_last=p.channels_last)


def train(params: Params, root: Path, sink=None, checkpoint_dir: Path | None = None,
          device: torch.device | None = None, autocast=None) -> tuple[torch.nn.Module, PretrainResult, int]:
    """Pre-train as configured (the core of the stage; writes no output but checkpoints).

    Starts from `model.pretrained` when it is set (external weights), else from a seeded random init.

    Returns:
        (the learner holding the kept weights, the result, the number of source classes).
    """
    p: PretrainParams = params.pretrain  # type: ignore[assignment]
    prepared_dir = Layout.of(root, params).prepared_dir
    splits = [load_split(prepared_dir, d, "meta_train") for d in p.datasets]
    val_split = load_split(prepared_dir, p.datasets[0], "meta_val")
    fixed = build_fixed_episodes(val_split, p.n_way, p.k_shot, p.n_query, p.val_episodes, params.seed + 1)
    val_episodes = [fixed.materialise(i, val_split) for i in range(p.val_episodes)]
    n_classes = sum(len(s.class_names) for s in splits)
    torch.manual_seed(params.seed)
    algorithm = "baselinepp" if p.head == "cosine" else "baseline"
    n_way = params.meta_train.n_way if params.meta_train else p.n_way
    learner = build_algorithm(algorithm, backbone_spec(params), n_way, None, num_classes=n_classes)
    if params.model.pretrained is not None:  # continue from external weights (e.g. ImageNet)
        init_from_file(learner.backbone, params, root)
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = CheckpointConfig(folder=checkpoint_dir, every=p.checkpoint_every, fingerprint=fingerprint({
            "params": {k: v for k, v in flatten(params).items()
                       if k in ("seed", "prepare.image_size", "prepare.channels") or k.startswith(("model.", "pretrain."))
                       and k != "pretrain.checkpoint_every"},
            "data": [split_fingerprint(s) for s in (*splits, val_split)], "code": code_digest(CODE_PATHS)}))
    from metatransfer.progress import progress

    with progress(p.steps, "pretrain", unit="step") as bar:
        result = pretrain(learner.backbone, learner.head, [s.images for s in splits], [s.labels for s in splits],
                          val_episodes, settings_of(p), params.seed, device=device, autocast=autocast, sink=sink,
                          checkpoint=ckpt, on_step=lambda step, loss: bar.update_to(step, loss=loss))
    return learner, result, n_classes


def run(params: Params, root: Path) -> dict[str, Any]:
    """Pre-train, save the learner, metrics and curve; log to MLflow."""
    from metatransfer import runtime, tracking
    from metatransfer.evaluation.plots import plot_curves
    from metatransfer.stages.common import write_json

    p = params.pretrain
    assert p is not None
    layout = Layout.of(root, params)
    out, plots, checkpoints = layout.pretrain_dir, layout.plots("pretrain"), layout.checkpoints("pretrain")
    with tracking.stage_run("pretrain", root, flatten(params)):
        for d in p.datasets:
            tracking.log_dataset(f"{d}/meta_train", str(layout.prepared_dataset(d)),
                                 tracking.dvc_out_md5(root, layout.prepared_key), "pretrain")
        device = runtime.device_for(params)
        precision = runtime.precision_for(params)
        with tracking.metric_sink() as sink:  # batched; written on the way out, even when training fails
            learner, result, n_classes = train(params, root, sink=sink,
                                               checkpoint_dir=checkpoints, device=device,
                                               autocast=lambda: runtime.autocast(device, precision))
        sums = save_learner(learner, out, extra={"best_step": result.best_step, "source_classes": n_classes})
        summary = {"best_val_acc": result.best_val_acc, "best_step": result.best_step, "steps": result.steps_done,
                   "source_classes": n_classes, "weights_sha256": sums["model.safetensors"]}
        tracking.log_params({"weights_sha256": sums["model.safetensors"],
                             "resumed_from_step": result.resumed_from if result.resumed_from is not None else "none"})
        tracking.log_metrics({"val/best_acc": result.best_val_acc, "pretrain/steps": result.steps_done})
        write_json(plots / "pretrain.json", result.curve)
        png = plot_curves({"pretrain": result.curve}, "step", "acc",
                          "pretrain: nearest-centroid meta-val accuracy", plots / "val_curve.png")
        tracking.log_artifact(png, "plots")
        write_json(layout.metrics("pretrain"), summary)
    log.info("pretrain: %d steps on %d classes, best meta-val %d-way %d-shot accuracy %.4f at step %d",
             result.steps_done, n_classes, p.n_way, p.k_shot, result.best_val_acc, result.best_step)
    clear_checkpoints(checkpoints)  # only now: a kill before this resumes from them
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.pretrain [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    return run_stage("pretrain", argv, run)


if __name__ == "__main__":
    sys.exit(main())
