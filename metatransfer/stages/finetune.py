"""`finetune` stage: for each target, a target model per method initialised from
its meta-learned φ, fine-tuned on the few labelled target images with early
stopping on target validation data; the method to ship is chosen on target
validation accuracy (or forced by a param) and the choice is recorded with
its evidence. Writes `models/target/<target>/<method>/`,
`models/target/<target>/selection.json` (with the labelled images used per
class, `shots`) and `metrics/finetune.json`.

The shipped model of every target is registered in the MLflow Model Registry
as a new version of `metatransfer-<target>` (alias `challenger`), and the
few-shot learner of the chosen method as `metatransfer-<target>-learner`;
both carry the data version, git commit, params digest and the validation
table (metatransfer/registry/publish.py). An unlabelled target's cluster model
is registered the same way, without a learner (metatransfer/registry/unlabeled.py).
Promotion to `champion` is a separate registry action (`metatransfer promote`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metatransfer.config import FinetuneParams, Params
from metatransfer.data.store import SplitData, load_split
from metatransfer.layout import Layout
from metatransfer.learners import load_method
from metatransfer.pixels import to_float
from metatransfer.episodes import split_fingerprint
from metatransfer.training.checkpoint import CheckpointConfig, clear_checkpoints, code_digest, fingerprint, state_digest
from metatransfer.training.finetune import FinetuneResult, FinetuneSettings, finetune, select_method

log = logging.getLogger(__name__)


def per_class_subset(split: SplitData, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images of every class (all of a class when it has fewer), seeded.

    Returns float images and int64 labels.
    """
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(len(split.class_names)):
        members = np.flatnonzero(split.labels == c)
        take = members if per_class <= 0 or len(members) <= per_class else rng.choice(members, per_class, replace=False)
        idx.append(np.sort(take))
    sel = np.concatenate(idx)
    return to_float(split.images[sel]), torch.from_numpy(split.labels[sel].astype(np.int64))


def shots_used(split: SplitData, per_class: int) -> dict[str, Any]:
    """The labelled images per class `per_class_subset` takes from `split` (all of a class when it has fewer).

    Args:
        split: the target's train split.
        per_class: finetune.shots_per_class (<= 0: every image).

    Returns:
        {"requested": per_class, "per_class": {class name: images used}, "fewer_than_requested":
        [class names with fewer than requested]} (deterministic: it goes into selection.json).
    """
    counts = np.bincount(split.labels, minlength=len(split.class_names))
    used = {name: int(n) if per_class <= 0 else int(min(n, per_class)) for name, n in zip(split.class_names, counts)}
    short = [name for name, n in used.items() if per_class > 0 and n < per_class]
    return {"requested": int(per_class), "per_class": used, "fewer_than_requested": short}


def finetune_target(
    target: str, params: Params, root: Path, sink_factory=None
) -> tuple[dict[str, FinetuneResult], str, str, dict[str, Any]]:
    """Fine-tune every configured method on one target.

    Each method's loop reports progress (a bar at a terminal, a log line every
    10 % otherwise: `metatransfer.progress`). A class with fewer labelled
    images than finetune.shots_per_class is fine-tuned on all it has, with a
    warning naming it.

    Returns:
        (results per method, chosen method, reason, shots used: see `shots_used`).
    """
    from metatransfer.progress import progress, progress_sink

    f: FinetuneParams = params.finetune  # type: ignore[assignment]
    layout = Layout.of(root, params)
    train = load_split(layout.prepared_dir, target, "train")
    val = load_split(layout.prepared_dir, target, "val")
    from metatransfer.preflight import check_finetune_classes

    # Refuses a class under finetune.min_images_per_class (no class is ever dropped: see there).
    check_finetune_classes(params, layout.prepared_dir, [target])
    shots = shots_used(train, f.shots_per_class)
    if shots["fewer_than_requested"]:
        log.warning("%s: finetune.shots_per_class is %d but %d of %d classes have fewer labelled train images; "
                    "fine-tuning uses all they have: %s", target, f.shots_per_class, len(shots["fewer_than_requested"]),
                    len(train.class_names),
                    ", ".join(f"{c} ({shots['per_class'][c]})" for c in shots["fewer_than_requested"]))
    train_x, train_y = per_class_subset(train, f.shots_per_class, params.seed)
    val_x, val_y = per_class_subset(val, f.val_per_class, params.seed + 1)
    from metatransfer import runtime

    settings = FinetuneSettings(f.steps, f.lr, f.batch_size, f.train_layers, f.eval_every, f.patience,
                                device=str(runtime.device_for(params)), precision=runtime.settings_of(params).precision,
                                augment=f.augment)
    results: dict[str, FinetuneResult] = {}
    for method in f.methods:
        learner = load_method(method, params, root)
        sink = sink_factory(method) if sink_factory else None
        # One checkpoint folder per target and method, outside DVC's outputs; removed when the
        # stage has succeeded (see metatransfer/training/checkpoint.py).
        ckpt = CheckpointConfig(layout.checkpoints("finetune") / target / method, f.checkpoint_every, fingerprint({
            # What must match to resume: the learner's weights, data, finetune params, code.
            "target": target, "method": method, "seed": params.seed, "finetune": repr(f),
            "learner": state_digest(learner.state_dict()),
            "data": [split_fingerprint(train), split_fingerprint(val)],
            "code": code_digest(("training", "models", "stages/finetune.py")),
        }))
        with progress(f.steps, f"finetune {target}/{method}", unit="step") as bar:
            # Early stopping may end the loop before f.steps: the closing line says where.
            shown = progress_sink(bar, "finetune/loss", sink, show={"finetune/loss": "loss", "finetune/val_acc": "val_acc"})
            results[method] = finetune(learner, train_x, train_y, val_x, val_y, list(train.class_names), settings,
                                       params.seed, shown, checkpoint=ckpt)
        log.info("%s/%s: val acc %.4f (best step %d of %d)", target, method, results[method].val_acc,
                 results[method].best_step, results[method].steps_done)
    chosen, reason = select_method({m: r.val_acc for m, r in results.items()}, f.force_method)
    return results, chosen, reason, shots


def unlabeled_methods(params: Params) -> list[str]:
    """The methods an unlabelled target is clustered with: finetune.methods, then the baselines
    `scratch` (random init) and `pretrain` (source-only supervised backbone, with a pretrain section)
    when they are not among them."""
    f = params.finetune
    assert f is not None
    extra = ["scratch", *(["pretrain"] if params.pretrain is not None else [])]
    return list(dict.fromkeys([*f.methods, *extra]))


def finetune_unlabeled_target(target: str, params: Params, root: Path) -> tuple[dict[str, Any], str, str]:
    """Cluster an unlabelled target with every method's backbone (metatransfer/training/unsupervised.py).

    Only the train split's images are read, never its labels: the result is the same whatever
    labels the store holds.

    Returns:
        (ClusterResult per method, the shipped method (finetune.unlabeled.<target>.embedding, else
        the first of finetune.methods), the reason).
    """
    from metatransfer import runtime
    from metatransfer.training.unsupervised import ClusterSettings, fit_unlabeled

    f = params.finetune
    assert f is not None
    u = f.unlabeled[target]
    layout = Layout.of(root, params)
    images = to_float(np.array(load_split(layout.prepared_dir, target, "train").images))  # images only
    settings = ClusterSettings(u.k, u.select_k, u.k_max, u.temperature, u.self_training_steps, u.confidence,
                               f.lr, f.batch_size, f.augment, device=str(runtime.device_for(params)))
    results = {}
    for method in unlabeled_methods(params):
        results[method] = fit_unlabeled(load_method(method, params, root), images, settings, params.seed)
        log.info("%s/%s: %d clusters, silhouette %.4f, train images per cluster %s (no labels used)", target,
                 method, results[method].k, results[method].silhouette, results[method].cluster_sizes)
    chosen = u.embedding or f.methods[0]
    reason = (f"no labels: the embedding of finetune.unlabeled.{target}.embedding ({chosen}) is shipped; "
              "the other methods are clustered for comparison")
    return results, chosen, reason


def run_unlabeled_target(target: str, params: Params, root: Path, run_id: str = "") -> dict[str, Any]:
    """`finetune` of an unlabelled target: cluster models saved, selection.json written, MLflow logged,
    the shipped one registered as `challenger` (`registry.publish_cluster_result`).

    The cluster models are saved like target models (classes `cluster_0..k-1`). The shipped one is
    registered with its label-free evidence (and NMI / ARI / matched accuracy when the test split
    holds hidden labels); `promote` gates it on those labels or leaves it to a person (docs/registry.md).

    Returns:
        The selection entry (also metrics/finetune.json's entry of the target).
    """
    from metatransfer import registry, tracking
    from metatransfer.stages.common import write_json
    from metatransfer.training.finetune import save_target_model

    u = params.finetune.unlabeled[target]  # type: ignore[union-attr]
    layout = Layout.of(root, params)
    results, chosen, reason = finetune_unlabeled_target(target, params, root)
    entry: dict[str, Any] = {
        "chosen": chosen, "reason": reason,
        "unlabeled": {"labels_used": 0, "method": "batch-norm re-estimation + soft k-means"
                      + (" + self-training on confident pseudo-labels" if u.self_training_steps else ""),
                      "k": results[chosen].k, "select_k": u.select_k, "images": sum(results[chosen].cluster_sizes),
                      "self_training_steps": u.self_training_steps, "registered": True},
        "methods": {},
    }
    from metatransfer.data.store import has_labels
    from metatransfer.evaluation.clustering import NO_LABELS_TO_SCORE
    from metatransfer.training.unsupervised import adapter_note

    if not has_labels(layout.prepared_dir, target):  # only then: a store with hidden labels keeps its entry
        entry["unlabeled"]["scoring"] = NO_LABELS_TO_SCORE
    if adapter_note(results[chosen].model, results[chosen].steps):  # a heterogeneous target only
        entry["unlabeled"]["input_adapter"] = adapter_note(results[chosen].model, results[chosen].steps)
    for method, r in results.items():
        sums = save_target_model(r.model.cpu(), layout.target_model(target, method),
                                 extra={"unlabeled": True, "k": r.k, "silhouette": r.silhouette})
        entry["methods"][method] = {"k": r.k, "silhouette": r.silhouette,
                                    "silhouettes": {str(k): v for k, v in r.silhouettes.items()},
                                    "cluster_sizes": r.cluster_sizes, "confident": r.confident,
                                    "self_training_steps": r.steps, "weights_sha256": sums["model.safetensors"]}
        tracking.log_metrics({f"finetune/{target}/{method}/silhouette": r.silhouette,
                              f"finetune/{target}/{method}/k": float(r.k)})
    # Versions and URIs are run-specific: MLflow + reports/run_facts.json, not selection.json.
    facts = registry.publish_cluster_result(root, params, target, entry, layout.target_model(target, chosen), run_id)
    tracking.record_run_facts(root, "finetune", {"run_id": run_id, target: facts})
    write_json(layout.selection(target), entry)
    tracking.log_dict({**entry, **facts}, f"selection/{target}.json")
    layout.plots("finetune").mkdir(parents=True, exist_ok=True)  # a DVC output even with no labelled target
    log.info("%s: ship %s clustering, k=%d; registered as challenger (no labels used)", target, chosen,
             results[chosen].k)
    return entry


def run(params: Params, root: Path) -> dict[str, Any]:
    """Fine-tune, save target models and the selection, log to MLflow, register challengers."""
    from metatransfer import registry, tracking
    from metatransfer.config import flatten
    from metatransfer.evaluation.plots import plot_curves
    from metatransfer.stages.common import write_json
    from metatransfer.training.finetune import save_target_model

    f = params.finetune
    assert f is not None
    summary: dict[str, Any] = {}
    layout = Layout.of(root, params)
    with tracking.stage_run("finetune", root, flatten(params)) as run:
        for target in f.targets:
            tracking.log_dataset(f"{target}/train", str(layout.prepared_dataset(target)),
                                 tracking.dvc_out_md5(root, layout.prepared_key), "finetune")
            if target in f.unlabeled:  # no labels: clustered, not fine-tuned (docs/guide.md)
                summary[target] = run_unlabeled_target(target, params, root, run.info.run_id)
                continue

            log_metric = tracking.metric_sink()  # one batching sink for the target's methods

            def sink_factory(method: str, target: str = target, log_metric: tracking.MetricBatch = log_metric):
                # Every finetune metric is "finetune/<target>/...": the loop's "finetune/loss"
                # becomes "finetune/<target>/<method>/loss" (one run holds every target and method).
                def sink(name: str, value: float, step: int) -> None:
                    log_metric(f"finetune/{target}/{method}/{name.removeprefix('finetune/')}", value, step)
                return sink

            with log_metric:  # written on the way out, even when fine-tuning fails
                results, chosen, reason, shots = finetune_target(target, params, root, sink_factory)
            tracking.log_class_names(target, results[chosen].model.class_names)  # tag + classes/<target>.json
            tracking.log_params({f"{target}/shots_used": json.dumps(shots["per_class"], sort_keys=True)})
            tracking.log_metrics({f"finetune/{target}/shots_min": min(shots["per_class"].values(), default=0)})
            entry: dict[str, Any] = {"chosen": chosen, "reason": reason, "shots": shots, "methods": {}}
            for method, r in results.items():
                sums = save_target_model(r.model, layout.target_model(target, method), extra={"val_acc": r.val_acc, "best_step": r.best_step})
                gate = registry.target_gate(r.val_correct, r.val_n, r.val_chance, params)
                entry["methods"][method] = {"val_acc": r.val_acc, "best_step": r.best_step, "steps": r.steps_done,
                                            "weights_sha256": sums["model.safetensors"], registry.QUALITY_TAG: gate.to_dict()}
                tracking.log_metrics({f"finetune/{target}/{method}/best_val_acc": r.val_acc})
            # Logs and registers the chosen model unless the quality gate refused it. Its URIs and
            # versions are run-specific: MLflow + reports/run_facts.json, not selection.json (a DVC output).
            facts = registry.publish_finetune_result(root, params, target, entry, layout.target_model(target, chosen), run.info.run_id)
            tracking.record_run_facts(root, "finetune", {"run_id": run.info.run_id, target: facts})
            write_json(layout.selection(target), entry)
            tracking.log_dict({**entry, **facts}, f"selection/{target}.json")
            tracking.log_metrics({f"finetune/{target}/selected_val_acc": results[chosen].val_acc})
            png = plot_curves({m: r.curve for m, r in results.items()}, "step", "val_acc",
                              f"{target}: target validation accuracy during fine-tuning", layout.plots("finetune") / f"{target}.png")
            tracking.log_artifact(png, "plots")
            summary[target] = entry
            log.info("%s: ship %s (%s)", target, chosen, reason)
        write_json(layout.metrics("finetune"), summary)
    clear_checkpoints(layout.checkpoints("finetune"))  # only now: a kill before this resumes from them
    return summary


def merge_pieces(params: Params, root: Path, pieces: list[Path]) -> dict[str, Any]:
    """Assemble the stage's outputs from Dask pieces that each fine-tuned one target: the same files, byte for
    byte, as one run (`stages.common.merge_piece_metrics`; `dvc_stages.commit_stage` records them).

    Each target is fine-tuned alone from the same seed (`finetune_target`), so a piece's models,
    selection and figure are those of the whole run; the summary is rebuilt here in params order.

    `params` name every target, `root` is the project, `pieces` the piece folders (one target each).
    Returns the summary written to metrics/finetune.json.
    """
    import shutil

    from metatransfer import tracking
    from metatransfer.io import fresh_dirs
    from metatransfer.stages.common import merge_piece_metrics, write_json

    layout = Layout.of(root, params)
    plots_dir = layout.plots("finetune")
    fresh_dirs(layout.target_dir, plots_dir)  # as DVC removes a stage's outputs before running it

    def take(folder: Path, part: Layout, targets: list[str]) -> None:
        for target in targets:
            shutil.move(part.target_dir / target, layout.target_dir / target)
        for figure in sorted(part.plots("finetune").iterdir()):  # the piece's target's figures only
            shutil.move(figure, plots_dir / figure.name)
        tracking.record_run_facts(root, "finetune", tracking.read_run_facts(folder).get("finetune") or {})

    summary = merge_piece_metrics(params, pieces, "finetune", "targets", take)
    write_json(layout.metrics("finetune"), summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.finetune [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    return run_stage("finetune", argv, run)


if __name__ == "__main__":
    sys.exit(main())
