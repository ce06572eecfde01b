"""`meta_train` stage: every configured algorithm on source episodes, with a
validation curve on fixed meta-val episodes; writes `models/meta/<algorithm>/`,
`metrics/meta_train.json` and `plots/meta_train/`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import save_learner
from metatransfer.config import MetaTrainParams, Params
from metatransfer.data.store import load_split
from metatransfer.episodes import build_fixed_episodes
from metatransfer.models import BackboneSpec
from metatransfer.training.meta_train import MetricSink, TrainResult, TrainSettings, meta_train
from metatransfer.training.sources import mixed_source_sampler

log = logging.getLogger(__name__)


def backbone_spec(params: Params) -> BackboneSpec:
    """The backbone every stage builds, from the `model` and `prepare` sections."""
    return BackboneSpec(
        name=params.model.name,
        in_channels=params.prepare.channels,
        image_size=params.prepare.image_size,
        hidden=params.model.hidden,
    )


def train_one(
    algorithm: str,
    params: Params,
    prepared_dir: Path,
    sink: MetricSink | None = None,
) -> TrainResult:
    """Meta-train one algorithm as configured (core of the stage, no file output)."""
    m: MetaTrainParams = params.meta_train  # type: ignore[assignment]
    splits = [load_split(prepared_dir, s.dataset, "meta_train") for s in m.sources]
    source = mixed_source_sampler(
        splits, [s.weight for s in m.sources], m.n_way, m.k_shot, m.n_query, params.seed, m.rotation_augment
    )
    val_split = load_split(prepared_dir, m.sources[0].dataset, "meta_val")
    fixed = build_fixed_episodes(val_split, m.n_way, m.k_shot, m.n_query, m.val_episodes, params.seed + 1)
    val_episodes = [fixed.materialise(i, val_split) for i in range(m.val_episodes)]
    torch.manual_seed(params.seed)
    learner = build_algorithm(
        algorithm, backbone_spec(params), m.n_way, m.hparams.get(algorithm), num_classes=source.num_classes
    )
    settings = TrainSettings(
        steps=m.steps, meta_batch_size=m.meta_batch_size, meta_lr=m.meta_lr,
        val_every=m.val_every, time_budget_s=m.time_budget_s,
    )
    return meta_train(learner, source.sample, val_episodes, settings, sink=sink)


def run(params: Params, root: Path) -> dict[str, Any]:
    """Train every algorithm, save models, metrics and curves; log to MLflow."""
    from metatransfer import tracking
    from metatransfer.config import flatten
    from metatransfer.evaluation.plots import plot_curves
    from metatransfer.stages.common import write_json

    m = params.meta_train
    assert m is not None
    prepared = root / params.data.prepared_dir
    models_dir, plots_dir = root / "models" / "meta", root / "plots" / "meta_train"
    summary: dict[str, Any] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    with tracking.stage_run("meta_train", root, flatten(params)):
        for s in m.sources:
            tracking.log_dataset(f"{s.dataset}/meta_train", str(prepared / s.dataset), tracking.dvc_out_md5(root, "data/prepared"), "meta_train")
        for algorithm in m.algorithms:
            with tracking.child_run(f"meta_train/{algorithm}", tags={"algorithm": algorithm, "stage": "meta_train"}):
                tracking.log_params({f"algorithm": algorithm, **{f"hparams.{k}": v for k, v in (m.hparams.get(algorithm) or {}).items()}})
                result = train_one(algorithm, params, prepared, sink=tracking.metric_sink())
                sums = save_learner(result.learner, models_dir / algorithm, extra={"best_step": result.best_step})
                uri = tracking.log_few_shot_model(models_dir / algorithm, params.prepare.channels, params.prepare.image_size,
                                                  name=f"learner_{algorithm}")
                summary[algorithm] = {
                    "best_val_acc": result.best_val_acc, "best_step": result.best_step,
                    "steps": result.steps_done, "seconds": round(result.seconds, 2),
                    "faults": result.faults, "weights_sha256": sums["model.safetensors"], "model_uri": uri,
                }
                tracking.log_metrics({"val/best_acc": result.best_val_acc, "meta_train/seconds": result.seconds,
                                      "meta_train/steps": result.steps_done, "meta_train/nonfinite_total": result.faults})
                curves[algorithm] = result.val_curve
                write_json(plots_dir / f"{algorithm}.json", result.val_curve)
        png = plot_curves(curves, "step", "acc", "meta-val accuracy during meta-training", plots_dir / "val_curve.png")
        tracking.log_artifact(png, "plots")
        write_json(root / "metrics" / "meta_train.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.meta_train [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    return run_stage("meta_train", argv, run)


if __name__ == "__main__":
    sys.exit(main())
