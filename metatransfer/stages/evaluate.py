"""`evaluate` stage: every method on the same fixed episodes (source meta-test and
targets, each configured shot count): mean accuracy ± CI and paired
differences against the reference method; the fine-tuned target models on the
full target test split. Writes `metrics/evaluate.json`, `plots/evaluate/`,
PNG figures and `reports/evaluate.md`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metatransfer.config import Params
from metatransfer.data.store import load_split
from metatransfer.episodes import Episode, load_fixed_episodes
from metatransfer.evaluation.episodic import episode_accuracies
from metatransfer.evaluation.stats import mean_ci, paired_difference
from metatransfer.layout import METRICS_DIR, Layout
from metatransfer.learners import describe, load_method, method_folder
from metatransfer.pixels import to_float
from metatransfer.training.finetune import load_target_model

log = logging.getLogger(__name__)


def verify_meta_models(methods: tuple[str, ...], root: Path) -> None:
    """Check each meta-trained model's weights against the SHA-256 `meta_train` recorded.

    The folders' own checksums.json guard against corruption; this guards against
    a consistent replacement after training (see metatransfer/artifacts.py).

    Raises:
        ArtifactError: a weights file differs from the recorded hash.
    """
    import json

    from metatransfer.artifacts import verify_weights

    recorded_path = root / METRICS_DIR / "meta_train.json"
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    for method in methods:
        sha = (recorded.get(method) or {}).get("weights_sha256")
        if sha:
            verify_weights(method_folder(method, root), sha)


def to_backbone_shape(episode: Episode, params: Params) -> Episode:
    """An episode of a target kept at its own shape (`prepare.per_dataset`), converted to the learners'
    `prepare.channels` x `prepare.image_size` by the fixed conversion (metatransfer/models/adapter.py); learners
    have no input adapter. Any other episode is returned as it is."""
    channels, size = params.prepare.channels, params.prepare.image_size
    if tuple(episode.support_x.shape[1:]) == (channels, size, size):
        return episode
    from dataclasses import replace

    from metatransfer.models.adapter import convert_images

    return replace(episode, support_x=convert_images(episode.support_x, channels, size),
                   query_x=convert_images(episode.query_x, channels, size))


def evaluate_episodes(params: Params, root: Path) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """Per-episode accuracies: {set: {method: {shots: array}}}."""
    assert params.episodes is not None and params.evaluate is not None
    layout = Layout.of(root, params)
    verify_meta_models(params.evaluate.methods, root)
    from metatransfer import runtime

    device = runtime.device_for(params)  # learners adapt and predict there; episodes move with them
    learners = {m: load_method(m, params, root).to(device) for m in params.evaluate.methods}
    out: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for set_name, s in params.episodes.sets.items():
        split = load_split(layout.prepared_dir, s.dataset, s.split)
        out[set_name] = {m: {} for m in learners}
        from metatransfer.progress import progress

        with progress(len(s.shots) * s.n_episodes * len(learners), f"evaluate {set_name}", unit="episode") as bar:
            for k in s.shots:
                fe = load_fixed_episodes(layout.episode_file(set_name, k))
                episodes = [to_backbone_shape(fe.materialise(i, split), params) for i in range(s.n_episodes)]
                for method, learner in learners.items():
                    describe(learner, layout.prepared_dataset(s.dataset))  # the conditional learner reads it
                    torch.manual_seed(params.seed)  # methods with random heads/inits are repeatable
                    out[set_name][method][k] = episode_accuracies(
                        learner, episodes, on_episode=lambda i, acc: bar.update(1, acc=acc))
                    log.info("%s %d-shot %-12s %.2f%%", set_name, k, method, 100 * out[set_name][method][k].mean())
    return out


def summarise(accs: dict[str, dict[str, dict[int, np.ndarray]]], reference: str, confidence: float) -> dict[str, Any]:
    """Mean ± CI per set/method/shot and paired differences against `reference`."""
    table: dict[str, Any] = {}
    for set_name, by_method in accs.items():
        table[set_name] = {}
        for method, by_shot in by_method.items():
            table[set_name][method] = {}
            for k, a in by_shot.items():
                ci = mean_ci(a, confidence)
                row = {"acc_mean": ci.mean, "acc_ci95": ci.ci, "episodes": ci.n}
                if reference in by_method and method != reference:
                    d = paired_difference(a, by_method[reference][k], confidence)
                    row.update({"diff_vs_reference": d.mean, "diff_ci95": d.ci, "diff_significant": bool(d.excludes_zero())})
                table[set_name][method][str(k)] = row
    return table


def evaluate_target_models(params: Params, root: Path, confidence: float) -> dict[str, Any]:
    """Test accuracy (± CI over images) of every fine-tuned target model; marks the chosen one."""
    import json

    out: dict[str, Any] = {}
    if params.finetune is None:
        return out
    from metatransfer import runtime

    device = runtime.device_for(params)
    layout = Layout.of(root, params)
    for target in params.finetune.targets:
        if target in params.finetune.unlabeled:
            continue  # clustered, not fine-tuned: `evaluate_unlabeled_targets`
        test = load_split(layout.prepared_dir, target, "test")
        x, y = to_float(test.images).to(device), torch.from_numpy(test.labels.astype(np.int64)).to(device)
        selection = json.loads(layout.selection(target).read_text())
        names = list(test.class_names)
        # Class names (full `<dataset>/<class>`, label order) and test images per class: the report and
        # reports/evaluate.md show per-class recall and the shipped model's confusion matrix by name.
        out[target] = {"chosen": selection["chosen"], "reason": selection["reason"], "class_names": names,
                       "class_counts": [int((test.labels == c).sum()) for c in range(len(names))], "methods": {}}
        for method in params.finetune.methods:
            model = load_target_model(layout.target_model(target, method),
                                      expected_sha256=selection["methods"][method].get("weights_sha256")).to(device)
            with torch.no_grad():
                feats = torch.cat([model.features(x[i : i + 512]) for i in range(0, len(x), 512)])
                pred = model.head(feats).argmax(1)
            feats, pred = feats.cpu(), pred.cpu()
            if method == selection["chosen"]:
                from metatransfer.evaluation.plots import plot_confusion_matrix, plot_embedding_map

                out_dir = layout.plots("evaluate")
                plot_confusion_matrix(test.labels, pred.numpy(), list(test.class_names),
                                      f"{target}: {method} (shipped), test split", out_dir / f"{target}_confusion.png")
                plot_embedding_map(feats.numpy(), test.labels, list(test.class_names),
                                   f"{target}: {method} backbone features (PCA), test split",
                                   out_dir / f"{target}_embedding.png")
            correct = (pred == y.cpu()).double().numpy()
            ci = mean_ci(correct, confidence)
            per_class = [float(correct[test.labels == c].mean()) for c in range(len(names))]
            out[target]["methods"][method] = {"test_acc": ci.mean, "test_acc_ci95": ci.ci, "images": ci.n,
                                              "balanced_acc": float(np.mean(per_class)),
                                              "per_class_recall": dict(zip(names, per_class)),
                                              "val_acc": selection["methods"][method]["val_acc"]}
            if method == selection["chosen"]:
                from metatransfer.evaluation.plots import confusion_matrix

                # rows: true class, columns: predicted class, both in `class_names` order
                out[target]["confusion"] = confusion_matrix(test.labels, pred.numpy(), len(names)).tolist()
            gate = selection["methods"][method].get("quality_gate")
            if gate:  # recorded by finetune: was this model good enough to be registered at all?
                out[target]["methods"][method]["quality_gate"] = {"passed": gate["passed"], "reason": gate["reason"]}
    return out


def evaluate_unlabeled_targets(params: Params, root: Path) -> dict[str, Any]:
    """Clustering scores of every unlabelled target's cluster models against the test split's hidden labels.

    The labels are read here, for scoring only; `finetune` fitted the models without any
    (metatransfer/training/unsupervised.py).

    Returns:
        {target: {"chosen", "reason", "k", "class_names", "methods": {method: {"nmi", "ari", "matched_acc",
        "majority_rate", "images", "clusters_used", "k", "silhouette"}}}}; {} without unlabelled targets.
        A target prepared without any label (no hidden labels either) gets "scoring":
        `NO_LABELS_TO_SCORE`, no class names and per method only "k" and "silhouette".
    """
    import json

    from metatransfer import runtime
    from metatransfer.data.store import has_labels
    from metatransfer.evaluation.clustering import NO_LABELS_TO_SCORE, clustering_scores

    out: dict[str, Any] = {}
    if params.finetune is None or not params.finetune.unlabeled:
        return out
    device = runtime.device_for(params)
    layout = Layout.of(root, params)
    for target in params.finetune.targets:
        if target not in params.finetune.unlabeled:
            continue
        selection = json.loads(layout.selection(target).read_text())
        if not has_labels(layout.prepared_dir, target):  # no test split, no hidden labels: say so
            fits = selection["methods"]
            out[target] = {"chosen": selection["chosen"], "reason": selection["reason"],
                           "k": selection["unlabeled"]["k"], "class_names": [], "scoring": NO_LABELS_TO_SCORE,
                           "methods": {m: {"k": f["k"], "silhouette": f["silhouette"]} for m, f in fits.items()}}
            log.info("%s: %s (silhouette only)", target, NO_LABELS_TO_SCORE)
            continue
        test = load_split(layout.prepared_dir, target, "test")
        x = to_float(test.images).to(device)
        out[target] = {"chosen": selection["chosen"], "reason": selection["reason"],
                       "k": selection["unlabeled"]["k"], "class_names": list(test.class_names), "methods": {}}
        for method, fit in selection["methods"].items():
            model = load_target_model(layout.target_model(target, method),
                                      expected_sha256=fit.get("weights_sha256")).to(device)
            with torch.no_grad():
                pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)]).cpu().numpy()
            out[target]["methods"][method] = {**clustering_scores(test.labels, pred), "k": fit["k"],
                                              "silhouette": fit["silhouette"]}
            log.info("%s %-12s NMI %.4f ARI %.4f matched acc %.4f (k=%d)", target, method,
                     out[target]["methods"][method]["nmi"], out[target]["methods"][method]["ari"],
                     out[target]["methods"][method]["matched_acc"], fit["k"])
    return out


def unlabeled_report_lines(unlabeled: dict[str, Any]) -> list[str]:
    """Markdown lines of reports/evaluate.md for the unlabelled targets (none without them)."""
    lines: list[str] = []
    for target, t in unlabeled.items():
        if t.get("scoring"):  # prepared without labels: the silhouette is all there is
            lines += ["", f"## Unlabelled target: {target} (clustering, no labels)", "",
                      f"No labels were used for training; k={t['k']}, clustering in the {t['chosen']} embedding; "
                      f"{t['scoring']}. Shipped: **{t['chosen']}** ({t['reason']}).", "",
                      "| method | k | silhouette (train) |", "|---|---|---|"]
            lines += [f"| {m}{' (shipped)' if m == t['chosen'] else ''} | {r['k']} | {r['silhouette']:.4f} |"
                      for m, r in t["methods"].items()]
            continue
        lines += ["", f"## Unlabelled target: {target} (clustering, full test split)", "",
                  f"No labels were used for training; k={t['k']}, clustering in the {t['chosen']} embedding; "
                  f"scored against hidden labels ({len(t['class_names'])} classes). Shipped: **{t['chosen']}** "
                  f"({t['reason']}).", "",
                  "| method | NMI | ARI | matched acc (%) | majority class (%) | silhouette (train) |",
                  "|---|---|---|---|---|---|"]
        for method, r in t["methods"].items():
            mark = " (shipped)" if method == t["chosen"] else ""
            lines.append(f"| {method}{mark} | {r['nmi']:.4f} | {r['ari']:.4f} | {100 * r['matched_acc']:.2f} | "
                         f"{100 * r['majority_rate']:.2f} | {r['silhouette']:.4f} |")
    return lines


def _md(text: str) -> str:
    """A class name in a markdown table cell ('|' would end the cell)."""
    return str(text).replace("|", "\\|")


def class_tables(t: dict[str, Any]) -> list[str]:
    """Markdown lines for one target: test recall per class and method, and the shipped model's
    confusion matrix, both labelled with the class names (without the `<dataset>/` prefix).

    Args:
        t: one entry of `evaluate_target_models` (needs "class_names"; older entries give []).

    Returns:
        The lines (empty when the entry has no class names).
    """
    from metatransfer.classnames import display_names

    names = t.get("class_names") or []
    if not names:
        return []
    short = display_names(names)
    counts = t.get("class_counts") or [""] * len(names)
    methods = [m for m, r in t["methods"].items() if "per_class_recall" in r]
    lines = ["", f"Classes ({len(names)}, label order): " + ", ".join(f"{i} `{n}`" for i, n in enumerate(short)) + ".",
             "", "Test recall (%) per class:", "",
             "| class | test images | " + " | ".join(m + (" (shipped)" if m == t["chosen"] else "") for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for name, label, n in zip(names, short, counts):
        cells = [f"{100 * t['methods'][m]['per_class_recall'].get(name, float('nan')):.2f}" for m in methods]
        lines.append(f"| {_md(label)} | {n} | " + " | ".join(cells) + " |")
    cm = t.get("confusion")
    if cm:
        lines += ["", f"Confusion matrix of the shipped model ({t['chosen']}; rows: true class, columns: predicted):", "",
                  "| true ↓ / predicted → | " + " | ".join(_md(n) for n in short) + " |", "|---|" + "---|" * len(short)]
        lines += [f"| {_md(label)} | " + " | ".join(str(v) for v in row) + " |" for label, row in zip(short, cm)]
    return lines


def write_report(path: Path, table: dict[str, Any], targets: dict[str, Any], reference: str, params: Params,
                 unlabeled: dict[str, Any] | None = None) -> None:
    """A markdown report: episode tables with CIs, paired differences, target models."""
    lines = ["# metatransfer evaluation", ""]
    lines.append(f"Mean accuracy (%) ± {int(params.evaluate.confidence * 100)} % CI over fixed episodes; "
                 f"Δ = paired difference vs `{reference}` (* = CI excludes 0).")
    for set_name, by_method in table.items():
        s = params.episodes.sets[set_name]
        shots = [str(k) for k in s.shots]
        lines += ["", f"## {set_name}: {s.dataset}/{s.split}, {s.n_way}-way, {s.n_query} queries, {s.n_episodes} episodes", ""]
        lines.append("| method | " + " | ".join(f"{k}-shot" for k in shots) + " |")
        lines.append("|---|" + "---|" * len(shots))
        for method, by_shot in by_method.items():
            cells = []
            for k in shots:
                r = by_shot[k]
                cell = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_ci95']:.2f}"
                if "diff_vs_reference" in r:
                    cell += f" (Δ {100 * r['diff_vs_reference']:+.2f}{'*' if r['diff_significant'] else ''})"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for target, t in targets.items():
        lines += ["", f"## Target models: {target} (full test split)", "",
                  f"Shipped: **{t['chosen']}**, {t['reason']}.", ""]
        chosen_gate = t["methods"].get(t["chosen"], {}).get("quality_gate")
        if chosen_gate and not chosen_gate["passed"]:
            lines += [f"**Not registered** (quality gate: {chosen_gate['reason']}).", ""]
        lines += [
                  "| method | val acc | test acc (%) ± CI | balanced acc |", "|---|---|---|---|"]
        for method, r in t["methods"].items():
            mark = " (shipped)" if method == t["chosen"] else ""
            lines.append(f"| {method}{mark} | {100 * r['val_acc']:.2f} | {100 * r['test_acc']:.2f} ± {100 * r['test_acc_ci95']:.2f} | {100 * r['balanced_acc']:.2f} |")
        lines += class_tables(t)
    lines += unlabeled_report_lines(unlabeled or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(params: Params, root: Path) -> dict[str, Any]:
    """The whole stage: evaluate, write metrics, plots, report; log to MLflow."""
    from metatransfer import tracking
    from metatransfer.config import flatten
    from metatransfer.evaluation.plots import plot_accuracy_vs_shots, plot_paired_differences
    from metatransfer.stages.common import write_json

    ev = params.evaluate
    assert ev is not None and params.episodes is not None
    layout = Layout.of(root, params)
    plots = layout.plots("evaluate")
    with tracking.stage_run("evaluate", root, flatten(params)):
        accs = evaluate_episodes(params, root)
        table = summarise(accs, ev.reference, ev.confidence)
        targets = evaluate_target_models(params, root, ev.confidence)
        metrics = {"episodes": table, "target_models": targets}
        unlabeled = evaluate_unlabeled_targets(params, root)
        if unlabeled:  # absent, not empty, without unlabelled targets: default outputs unchanged
            metrics["unlabeled_targets"] = unlabeled
            for target, t in unlabeled.items():
                for m, r in t["methods"].items():
                    tracking.log_metrics({f"target/{target}/{m}/{key}": r[key] for key in ("nmi", "ari", "matched_acc")
                                          if key in r})  # none without labels
        write_json(layout.metrics("evaluate"), metrics)
        for set_name, by_method in table.items():
            rows = [{"method": m, "shots": int(k), "acc": r["acc_mean"], "ci95": r["acc_ci95"]}
                    for m, by_shot in by_method.items() for k, r in by_shot.items()]
            write_json(plots / f"{set_name}.json", rows)
            png = plot_accuracy_vs_shots({m: {int(k): (r["acc_mean"], r["acc_ci95"]) for k, r in bs.items()} for m, bs in by_method.items()},
                                         f"{set_name}: accuracy vs shots", plots / f"{set_name}_shots.png")
            tracking.log_artifact(png, "plots")
            last = str(max(int(k) for k in next(iter(by_method.values()))))
            diffs = {m: (bs[last]["diff_vs_reference"], bs[last]["diff_ci95"]) for m, bs in by_method.items() if "diff_vs_reference" in bs[last]}
            if diffs:
                png = plot_paired_differences(diffs, ev.reference, f"{set_name}, {last}-shot", plots / f"{set_name}_diff.png")
                tracking.log_artifact(png, "plots")
            for m, by_shot in by_method.items():
                for k, r in by_shot.items():
                    tracking.log_metrics({f"eval/{set_name}/{m}/{k}shot/acc_mean": r["acc_mean"],
                                          f"eval/{set_name}/{m}/{k}shot/acc_ci95": r["acc_ci95"]})
        for target, t in targets.items():
            for m, r in t["methods"].items():
                tracking.log_metrics({f"target/{target}/{m}/test_acc": r["test_acc"]})
        report = layout.evaluate_report
        write_report(report, table, targets, ev.reference, params, unlabeled)
        tracking.log_artifact(report, "report")
        for png in sorted(plots.glob("*_confusion.png")) + sorted(plots.glob("*_embedding.png")):
            tracking.log_artifact(png, "plots")
        tracking.log_dict(metrics, "metrics/evaluate.json")
        from metatransfer.report import build_report

        html = build_report(root, params)  # reports/index.html: tables, plots, versions, promotion
        tracking.log_artifact(html, "report")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.evaluate [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    return run_stage("evaluate", argv, run)


if __name__ == "__main__":
    sys.exit(main())
