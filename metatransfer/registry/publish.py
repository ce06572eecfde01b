"""Publishing a `finetune` result: logging the chosen target model and its few-shot learner to the
active MLflow run and registering both as `challenger` versions, unless the quality gate refused them.

Every pipeline run registers, per target, the shipped target model as a new
version of `metatransfer-<target>` and its meta-learner (the adapt-on-request
few-shot model) as a new version of `metatransfer-<target>-learner`; `finetune`
moves their `challenger` alias only as the last step of its run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metatransfer import tracking
from metatransfer.classnames import display_names
from metatransfer.layout import TARGET_DIR
from metatransfer.quality import QUALITY_TAG, learner_passed
from metatransfer.registry.client import (
    CHALLENGER,
    LEARNER_TAG,
    client_for,
    learner_name,
    model_name,
    provenance_tags,
    register_version,
)

log = logging.getLogger(__name__)


def method_table(entry: dict[str, Any], columns: list[str], cells: Callable[[dict[str, Any]], list[str]]) -> str:
    """Markdown table of a finetune summary entry: one row per method, the chosen one marked.

    Args:
        entry: the target's finetune summary entry (`methods`: name -> evidence; `chosen`).
        columns: the header: "method", the evidence columns, then the column marking the chosen method.
        cells: a method's evidence -> the text of its evidence columns.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for method, m in entry.get("methods", {}).items():
        chosen = "yes" if method == entry.get("chosen") else ""
        lines.append("| " + " | ".join([method, *cells(m), chosen]) + " |")
    return "\n".join(lines)


def validation_table(entry: dict[str, Any]) -> str:
    """Markdown table of the finetune evidence (target validation accuracy per method)."""
    return method_table(entry, ["method", "val acc", "best step", "chosen"],
                        lambda m: [f"{m.get('val_acc', float('nan')):.4f}", f"{m.get('best_step', '')}"])


def class_tags(names: list[str]) -> dict[str, str]:
    """The version tags naming a target model's classes in label order: `class_names` (as served in
    `class_name`) and `class_names_full` (as in the data), JSON lists; {} without names."""
    if not names:
        return {}
    return {"class_names": json.dumps(display_names(names), ensure_ascii=False),
            "class_names_full": json.dumps(list(names), ensure_ascii=False)}


def register_finetune_result(root: str | Path, target: str, entry: dict[str, Any], model_uri: str,
                             learner_uri: str | None, run_id: str = "",
                             class_names: list[str] | None = None) -> dict[str, Any]:
    """Register a finetune run's shipped model (and its learner) as `challenger` versions.

    Args:
        root: project root (provenance tags are read from it).
        target: the target dataset.
        entry: the selection entry ({"chosen", "reason", "methods": {m: {"val_acc", ...}}}).
        model_uri: the logged target model (models:/<id>).
        learner_uri: the logged few-shot learner of the chosen method, or None.
        run_id: the MLflow run that logged them.
        class_names: the target's classes in label order (default: the chosen model's
            models/target/<target>/<chosen>/config.json); the model version's tags and
            description list them.

    Returns:
        {"model": {"name", "version"}, "learner": {"name", "version"} or None}.
    """
    chosen = entry["chosen"]
    gate = (entry.get("methods", {}).get(chosen) or {}).get(QUALITY_TAG) or {}
    if gate and not gate.get("passed", True):
        # The last line of defence: `publish_finetune_result` does not even log such a model.
        log.warning("%s: %s not registered as %s: quality gate refused it (%s)", target, chosen, CHALLENGER,
                    gate.get("reason", ""))
        return {"model": None, "learner": None, "refused": gate.get("reason", "quality gate")}
    client = client_for(root)
    tags = {
        **provenance_tags(root), "target": target, "method": chosen, "mlflow_run_id": run_id,
        QUALITY_TAG: "passed" if gate else "not_tested", "quality_reason": gate.get("reason", ""),
        "val_acc": f"{entry['methods'][chosen]['val_acc']:.6f}", "selection_reason": entry.get("reason", ""),
        "validation_table": json.dumps(entry.get("methods", {}), sort_keys=True, default=float),
    }
    table = validation_table(entry)
    out: dict[str, Any] = {"learner": None}
    if learner_uri:
        lv = register_version(client, learner_uri, learner_name(target), {**tags, "kind": "few_shot_learner"},
                              f"Few-shot learner `{chosen}` for `{target}` (adapt on request: support + query).\n\n"
                              f"Target validation evidence:\n\n{table}\n")
        out["learner"] = {"name": learner_name(target), "version": lv}
        tags[LEARNER_TAG] = lv
    names = list(class_names or tracking.target_class_names(Path(root) / TARGET_DIR / target / chosen))
    short = display_names(names)
    classes = ("Classes (index: name, as served in `class_name`): "
               + ", ".join(f"{i}: {n}" for i, n in enumerate(short)) + ".\n\n") if names else ""
    mv = register_version(client, model_uri, model_name(target), {**tags, **class_tags(names), "kind": "target_model"},
                          f"Target model for `{target}` fine-tuned from `{chosen}` ({entry.get('reason', '')}).\n\n"
                          f"{classes}Target validation evidence:\n\n{table}\n")
    out["model"] = {"name": model_name(target), "version": mv}
    log.info("%s: registered %s v%s%s as %s", target, model_name(target), mv,
             f" and {learner_name(target)} v{out['learner']['version']}" if out["learner"] else "", CHALLENGER)
    return out


def publish_finetune_result(root: str | Path, params: Any, target: str, entry: dict[str, Any], folder: str | Path,
                            run_id: str = "") -> dict[str, Any]:
    """Log the chosen target model (and its learner) to the active MLflow run and register them as challengers,
    unless the quality gate refused them.

    Args:
        root: project root.
        params: loaded params (image shape, promote settings).
        target: the target dataset.
        entry: the selection entry (with `methods[m].quality_gate` verdicts, see `target_gate`).
        folder: the chosen target model's folder.
        run_id: the active MLflow run.

    Returns:
        The run-specific facts (not a DVC output): {"model_uri", "learner_uri", "registered", "refused"}.
    """
    import mlflow

    chosen = entry["chosen"]
    gate = (entry["methods"][chosen].get(QUALITY_TAG) or {})
    facts: dict[str, Any] = {"chosen": chosen, "model_uri": None, "learner_uri": None,
                             "registered": {"model": None, "learner": None}, "refused": None}
    if gate and not gate.get("passed", True):
        facts["refused"] = gate.get("reason", "")
        mlflow.set_tag(f"{target}/{QUALITY_TAG}", "refused")
        log.warning("%s: quality gate: target model %s NOT registered as %s: %s", target, chosen, CHALLENGER,
                    facts["refused"])
        return facts
    mlflow.set_tag(f"{target}/{QUALITY_TAG}", "passed")
    config = json.loads((Path(folder) / "config.json").read_text())
    n_classes = len(config["class_names"])
    # A heterogeneous target model (input adapter, prepare.per_dataset) takes the target's own shape.
    shape = config.get("input") or {"channels": params.prepare.channels, "image_size": params.prepare.image_size}
    facts["model_uri"] = tracking.log_target_model(folder, shape["channels"], shape["image_size"],
                                                   n_classes, name=f"target_{target}")
    ok, why = learner_passed(root, chosen)
    if ok:
        facts["learner_uri"] = log_learner_for(chosen, params, root, target)
    else:
        log.warning("%s: quality gate: learner %s NOT registered as %s: %s", target, chosen, CHALLENGER, why)
        facts["learner_refused"] = why
    facts["registered"] = register_finetune_result(root, target, entry, facts["model_uri"], facts["learner_uri"],
                                                   run_id)
    return facts


def log_learner_for(method: str, params: Any, root: str | Path, target: str) -> str:
    """Log the few-shot learner of `method` (inside the active run) and return its model URI.

    For "scratch" (nothing meta-trained on disk) the seeded fresh learner is saved first.
    """
    from metatransfer.artifacts import save_learner
    from metatransfer.learners import load_method, method_folder

    channels, size = params.prepare.channels, params.prepare.image_size
    folder = method_folder(method, Path(root))
    if method != "scratch" and folder.is_dir():
        return tracking.log_few_shot_model(folder, channels, size, name=f"learner_{target}")
    with tempfile.TemporaryDirectory() as tmp:
        save_learner(load_method(method, params, Path(root)), Path(tmp) / method)
        return tracking.log_few_shot_model(Path(tmp) / method, channels, size, name=f"learner_{target}")
