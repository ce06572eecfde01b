"""`meta_train` stage: every configured algorithm on source episodes, with a
validation curve on fixed meta-val episodes; writes `models/meta/<algorithm>/`,
`metrics/meta_train.json` and `plots/meta_train/`.

Each algorithm checkpoints into `checkpoints/meta_train/<algorithm>/` (outside
DVC's outputs, which DVC deletes before a re-run) every
`meta_train.checkpoint_every` steps; re-running the stage after a kill resumes
every algorithm from its newest checkpoint (a finished algorithm from its
final one) and the folder is deleted once the stage has succeeded.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.artifacts import save_learner
from metatransfer.config import MetaTrainParams, Params, flatten
from metatransfer.data.store import SplitData, load_split
from metatransfer.descriptions import read_description
from metatransfer.episodes import split_fingerprint
from metatransfer.errors import ConfigError
from metatransfer.layout import Layout
from metatransfer.learners import backbone_spec, init_backbone
from metatransfer.training import distributed
from metatransfer.training.checkpoint import CheckpointConfig, clear_checkpoints, code_digest, fingerprint, state_digest
from metatransfer.training.meta_train import MetricSink, TrainResult, TrainSettings, meta_train
from metatransfer.training.sources import give_descriptions, meta_train_sampler, meta_val_episodes

log = logging.getLogger(__name__)

# The code a checkpoint depends on (the stage's DVC deps): edited code must not
# resume from weights the old code produced.
CODE_PATHS = ("algorithms", "models", "episodes", "training", "stages/meta_train.py")


def checkpoint_fingerprint(algorithm: str, params: Params, splits: list[SplitData],
                           initial_state: dict[str, torch.Tensor] | None = None) -> str:
    """Identity of one algorithm's training run: what must match to resume its checkpoint.

    Covers the seed, backbone, image shape, every meta_train setting except the
    algorithm list, the checkpoint interval and other algorithms' hparams, the
    data (split fingerprints) and the training code.
    """
    skip = ("meta_train.algorithms", "meta_train.checkpoint_every")
    world = distributed.current()  # torchrun: the sums run in another order, so the world size is part of it
    keys = {k: v for k, v in flatten(params).items()
            if (k in ("seed", "prepare.image_size", "prepare.channels") or k.startswith(("model.", "meta_train.", "runtime.")))
            and k not in skip and (not k.startswith("meta_train.hparams.") or k.startswith(f"meta_train.hparams.{algorithm}."))}
    return fingerprint({"algorithm": algorithm, "params": keys, "data": [split_fingerprint(s) for s in splits],
                        "code": code_digest(CODE_PATHS),
                        # θ's starting point (a re-run pretrain stage changes it under meta_train.init: pretrain)
                        "init": state_digest(initial_state) if initial_state is not None else None,
                        **({"world_size": world.world_size} if world is not None else {})})


def train_one(
    algorithm: str,
    params: Params,
    prepared_dir: Path,
    sink: MetricSink | None = None,
    checkpoint_dir: Path | None = None,
    root: Path | None = None,
) -> TrainResult:
    """Meta-train one algorithm as configured (core of the stage, no file output).

    Args:
        algorithm: a name from the algorithm registry.
        params: the validated params.
        prepared_dir: the prepared store.
        sink: optional metric logger.
        checkpoint_dir: optional; checkpoint there and resume from it (see module doc).
        root: the project root; needed with `meta_train.init: pretrain` (reads models/pretrain).
    """
    m: MetaTrainParams = params.meta_train  # type: ignore[assignment]
    splits = [load_split(prepared_dir, s.dataset, "meta_train") for s in m.sources]
    # Each source with its own k_shot/n_query and minimum images per class (defaults: meta_train's, none).
    source = meta_train_sampler(m, splits, params.seed)
    val_split = load_split(prepared_dir, m.sources[0].dataset, "meta_val")
    fixed = meta_val_episodes(m, val_split, params.seed + 1)
    val_episodes = [fixed.materialise(i, val_split) for i in range(m.val_episodes)]
    torch.manual_seed(params.seed)
    learner = build_algorithm(
        algorithm, backbone_spec(params), m.n_way, m.hparams.get(algorithm), num_classes=source.num_classes
    )
    if m.init != "scratch":
        if root is None:
            raise ConfigError(f"meta_train.init is {m.init!r}: train_one needs the project root (root=...) to read "
                              "the initial weights")
        init_backbone(learner, params, root)
    # Learners conditioned on task descriptions (conditional) get each source's (prepare.descriptions).
    give_descriptions(learner, source, [read_description(Path(prepared_dir) / s.dataset) for s in m.sources])
    from metatransfer import runtime

    learner.to(runtime.device_for(params))  # params.yaml `runtime.device`; saved weights are CPU copies
    settings = TrainSettings(
        steps=m.steps, meta_batch_size=m.meta_batch_size, meta_lr=m.meta_lr,
        val_every=m.val_every, time_budget_s=m.time_budget_s or math.inf,  # 0: no wall-clock guard
        max_consecutive_faults=m.max_consecutive_faults,
        lr_schedule=m.lr_schedule, precision=runtime.precision_for(params), channels_last=m.channels_last,
    )
    ckpt = None
    if checkpoint_dir is not None:
        ckpt = CheckpointConfig(
            folder=checkpoint_dir, every=m.checkpoint_every,
            fingerprint=checkpoint_fingerprint(algorithm, params, [*splits, val_split], learner.state_dict()),
        )
    from metatransfer.progress import progress

    with progress(m.steps, f"meta_train {algorithm}", unit="step", time_budget_s=m.time_budget_s or None) as bar:
        return meta_train(learner, source.sample, val_episodes, settings, sink=sink, checkpoint=ckpt,
                          on_step=lambda step, loss, acc: bar.update_to(step, loss=loss, acc=acc),
                          dist_ctx=distributed.current())


def run(params: Params, root: Path) -> dict[str, Any]:
    """Train every algorithm, save models, metrics and curves; log to MLflow."""
    from metatransfer import preflight, registry, tracking
    from metatransfer.evaluation.plots import plot_curves
    from metatransfer.stages.common import write_json

    m = params.meta_train
    assert m is not None
    # Under torchrun: join the process group; ranks other than 0 train in step and write nothing.
    ctx = distributed.init_from_env()
    distributed.share_threads(ctx, params.runtime.threads)
    if ctx is not None and not ctx.is_main:
        return follow(params, root)
    preflight.check(params, root)  # shape mistakes fail now, not minutes into training
    layout = Layout.of(root, params)
    prepared, plots_dir, checkpoints = layout.prepared_dir, layout.plots("meta_train"), layout.checkpoints("meta_train")
    summary: dict[str, Any] = {}
    facts: dict[str, Any] = {}  # run-specific (timings, MLflow URIs): reports/run_facts.json + MLflow, not DVC outputs
    curves: dict[str, list[dict[str, float]]] = {}
    with tracking.stage_run("meta_train", root, flatten(params)) as stage_run:
        for s in m.sources:
            tracking.log_dataset(f"{s.dataset}/meta_train", str(layout.prepared_dataset(s.dataset)),
                                 tracking.dvc_out_md5(root, layout.prepared_key), "meta_train")
        described = {s.dataset: d for s in m.sources if (d := read_description(layout.prepared_dataset(s.dataset)))}
        if described:  # prepare.descriptions of the sources
            tracking.log_dict(described, "descriptions.json")
        for algorithm in m.algorithms:
            with tracking.child_run(f"meta_train/{algorithm}", tags={"algorithm": algorithm, "stage": "meta_train"}):
                tracking.log_params({f"algorithm": algorithm, **{f"hparams.{k}": v for k, v in (m.hparams.get(algorithm) or {}).items()}})
                with tracking.metric_sink() as sink:  # batched; written on the way out, even when training fails
                    result = train_one(algorithm, params, prepared, sink=sink,
                                       checkpoint_dir=checkpoints / algorithm, root=root)
                sums = save_learner(result.learner, layout.meta_learner(algorithm), extra={"best_step": result.best_step})
                # Recorded in MLflow so a loaded artifact can be checked against the run that made it.
                tracking.log_params({"weights_sha256": sums["model.safetensors"],
                                     "resumed_from_step": result.resumed_from if result.resumed_from is not None else "none"})
                gate = registry.learner_gate(result.best_val_episode_accs, m.n_way, params)
                uri = None
                if gate.passed:
                    uri = tracking.log_few_shot_model(layout.meta_learner(algorithm), params.prepare.channels,
                                                      params.prepare.image_size, name=f"learner_{algorithm}")
                else:  # still saved above (a DVC output: the pipeline goes on), never logged as a model
                    log.warning("%s: quality gate: learner NOT logged or registered as a challenger: %s",
                                algorithm, gate.reason)
                mlflow_tags = {registry.QUALITY_TAG: "passed" if gate.passed else "refused",
                               "quality_reason": gate.reason, "budget_hit": result.budget_hit or "none"}
                tracking.set_tags({**mlflow_tags, **({"model_uri": uri} if uri else {})})
                # Only what the params and data determine: this file is a DVC metric and must not churn.
                summary[algorithm] = {
                    "best_val_acc": result.best_val_acc, "best_step": result.best_step,
                    "steps": result.steps_done, "faults": result.faults, "budget_hit": result.budget_hit or "none",
                    "weights_sha256": sums["model.safetensors"], registry.QUALITY_TAG: gate.to_dict(),
                }
                facts[algorithm] = {"model_uri": uri, "seconds": round(result.seconds, 2),
                                    "train_seconds": round(result.train_seconds, 2), "budget_hit": result.budget_hit or "none"}
                tracking.log_metrics({"val/best_acc": result.best_val_acc, "meta_train/seconds": result.seconds,
                                      "meta_train/steps": result.steps_done})
                # One name for the fault count: the loop logs the running count of skipped steps
                # under it at each fault; its last point is the total (0 when nothing was skipped).
                tracking.log_metrics({"meta_train/nonfinite_skips": result.faults}, step=result.steps_done)
                curves[algorithm] = result.val_curve
                # The DVC plot keeps (step, acc) only: wall seconds differ run to run (they are in MLflow).
                write_json(plots_dir / f"{algorithm}.json", [{"step": r["step"], "acc": r["acc"]} for r in result.val_curve])
        png = plot_curves(curves, "step", "acc", "meta-val accuracy during meta-training", plots_dir / "val_curve.png")
        tracking.log_artifact(png, "plots")
        write_json(layout.metrics("meta_train"), summary)
        tracking.record_run_facts(root, "meta_train", {"run_id": stage_run.info.run_id, "algorithms": facts})
    # Only now: a kill before this line resumes every algorithm from its checkpoints.
    clear_checkpoints(checkpoints)
    return summary


def merge_pieces(params: Params, root: Path, pieces: list[Path]) -> dict[str, Any]:
    """Assemble the stage's outputs from Dask pieces that each trained one algorithm: the same files, byte for
    byte, as one run (`stages.common.merge_piece_metrics`; `dvc_stages.commit_stage` records them).

    Each algorithm trains alone from the same seed (`train_one`), so a piece's model, curve and
    summary are those of the whole run; the learning-curve figure and the summary are rebuilt here.

    `params` name every algorithm, `root` is the project, `pieces` the piece folders (one algorithm each).
    Returns the summary written to metrics/meta_train.json.
    """
    import json
    import shutil

    from metatransfer import tracking
    from metatransfer.evaluation.plots import plot_curves
    from metatransfer.io import fresh_dirs
    from metatransfer.stages.common import merge_piece_metrics, write_json

    layout = Layout.of(root, params)
    plots_dir = layout.plots("meta_train")
    fresh_dirs(layout.meta_dir, plots_dir)  # as DVC removes a stage's outputs before running it
    curves: dict[str, list[dict[str, float]]] = {}
    facts: dict[str, Any] = {"run_ids": [], "algorithms": {}}

    def take(folder: Path, part: Layout, algorithms: list[str]) -> None:
        for algorithm in algorithms:
            shutil.move(part.meta_learner(algorithm), layout.meta_learner(algorithm))
            shutil.move(part.plots("meta_train") / f"{algorithm}.json", plots_dir / f"{algorithm}.json")
            curves[algorithm] = json.loads((plots_dir / f"{algorithm}.json").read_text())
        piece_facts = tracking.read_run_facts(folder).get("meta_train") or {}
        facts["run_ids"].append(piece_facts.get("run_id"))
        facts["algorithms"].update(piece_facts.get("algorithms") or {})

    summary = merge_piece_metrics(params, pieces, "meta_train", "algorithms", take)
    plot_curves({a: curves[a] for a in summary}, "step", "acc", "meta-val accuracy during meta-training",
                plots_dir / "val_curve.png")
    write_json(layout.metrics("meta_train"), summary)
    tracking.record_run_facts(root, "meta_train", facts)
    return summary


def follow(params: Params, root: Path) -> dict[str, Any]:
    """A rank other than 0 of a distributed run: train every algorithm in step with rank 0, write nothing.

    It reads the checkpoints rank 0 wrote (resume) and contributes its share
    of every meta-gradient; models, metrics, plots and MLflow runs are rank 0's.
    """
    m = params.meta_train
    assert m is not None
    layout = Layout.of(root, params)
    for algorithm in m.algorithms:
        train_one(algorithm, params, layout.prepared_dir, checkpoint_dir=layout.checkpoints("meta_train") / algorithm,
                  root=root)
    return {}


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.meta_train [--params params.yaml]`, or distributed:
    `torchrun --nproc_per_node N -m metatransfer.stages.meta_train [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    try:
        return run_stage("meta_train", argv, run)
    finally:
        distributed.shutdown()  # leave the process group torchrun's ranks joined (no-op in one process)


if __name__ == "__main__":
    sys.exit(main())
