"""Promotion: the gate run on a target's challenger, and deliberate promotion without it.

A challenger that is the baseline method itself (and no champion yet) is
compared with the next-best method instead (`next_best_method`). The cluster
model of an unlabelled target is scored on cross-fitted matched accuracy
against hidden test labels, or answered `needs_review` without any
(`unlabeled`). A person can
promote without the gate, with a logged reason (`force_promote`). Every
decision is a run `promote` in MLflow, tags on the challenger version and an
entry in reports/promotion.json (`record.record_decision`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from metatransfer import tracking
from metatransfer.io import sha256_file
from metatransfer.layout import SELECTION_FILE, TARGET_DIR
from metatransfer.quality import QUALITY_TAG
from metatransfer.registry.client import (
    CHAMPION,
    LEARNER_TAG,
    NoChallengerError,
    alias_version,
    champion_history,
    client_for,
    model_name,
    move_champion,
    require_challenger,
    set_history,
)
from metatransfer.registry.gate import (
    GateDecision,
    GateSettings,
    RegistryError,
    decide,
    fold_accuracies,
    folds_digest,
    gate_settings,
    test_folds,
)
from metatransfer.registry.predict import held_out_images, predict_folder, predict_uri
from metatransfer.registry.record import PromotionResult, now, project_params, record_decision
from metatransfer.registry.unlabeled import cross_fitted_matched_accuracies, hidden_labels, is_cluster_model, needs_review

log = logging.getLogger(__name__)


def promote(root: str | Path, target: str, settings: GateSettings | None = None,
            parent_run_id: str | None = None) -> PromotionResult:
    """Run the gate for `target`'s challenger and move `champion` if it passes.

    The decision and its evidence (per-fold accuracies, test folds, interval)
    are logged to MLflow as a run named `promote` (tags: decision, target,
    challenger/champion versions; a JSON artifact `promote/<target>.json`),
    and summarised as tags on the challenger version.

    Args:
        root: project root (params.yaml, prepared data, models/target, mlflow store).
        target: target dataset name.
        settings: gate settings (default: from params.yaml, see `gate_settings`).
        parent_run_id: MLflow run the `promote` run becomes a child of (default:
            $METATRANSFER_PARENT_RUN_ID, else none).

    Returns:
        PromotionResult.

    Raises:
        NoChallengerError: no challenger registered.
        RegistryError: bad gate settings, or the baseline model is missing.
    """
    import mlflow

    root = Path(root).resolve()
    params = project_params(root)
    settings = settings or gate_settings(params)
    client = client_for(root)
    name = model_name(target)
    challenger = require_challenger(client, name, root)
    champion = alias_version(client, name, CHAMPION)
    cv = str(challenger.version)
    before = str(champion.version) if champion is not None else None
    if before == cv:
        return PromotionResult(target, name, "already_champion", f"version {cv} is already the champion",
                               cv, before, before, f"champion v{before}")
    if challenger.tags.get(QUALITY_TAG) == "refused":
        # Never registered by the pipeline; a version tagged by hand must not slip through either.
        reason = f"version {cv} failed the quality gate ({challenger.tags.get('quality_reason', '')}); not promotable"
        log.warning("%s: %s", name, reason)
        return PromotionResult(target, name, "rejected", reason, cv, before, before, "quality gate")
    # A cluster model (unlabelled target) is judged on matched accuracy against the hidden test labels,
    # or, without any, left to a person (registry/unlabeled.py, docs/registry.md "Unlabelled targets").
    cluster = is_cluster_model(challenger)
    held = hidden_labels(params, root, target) if cluster else None
    if cluster and held is None:
        return needs_review(root, target, name, cv, before)

    # The baseline a first champion must beat may be the challenger itself (the validation winner is
    # `scratch`): the gate would compare it with itself (gain 0, CI [0, 0]) and could never pass. It is
    # compared with the best other method instead, or, with none, rejected with the way out.
    is_baseline = champion is None and challenger.tags.get("method", "") == settings.baseline
    rank_by = "silhouette" if cluster else "val_acc"  # an unlabelled target has no validation accuracy
    next_best = next_best_method(root, target, settings.baseline, rank_by) if is_baseline else None
    if is_baseline and next_best is None:
        reason = (f"version {cv} is the baseline method {settings.baseline!r} itself, so the gate would compare it "
                  "with itself (gain +0.0000) and can never pass, and no other fine-tuned method of "
                  f"models/target/{target}/selection.json is on disk to compare with; promote it deliberately with "
                  f"`metatransfer promote --target {target} --force --reason \"...\"`")
        log.warning("%s: %s", name, reason)
        result = PromotionResult(target, name, "rejected", reason, cv, before, before, f"baseline {settings.baseline}")
        record_decision(root, target, {**result.to_dict(), "confidence": settings.confidence,
                                       "margin": settings.margin, "n_folds": settings.n_folds, "time": now()})
        return result

    images, labels, fingerprint = held or held_out_images(params, root, target)
    folds = test_folds(len(labels), settings.n_folds, settings.seed)
    chall_pred = predict_uri(f"models:/{name}/{cv}", images)
    if champion is not None:
        reference = f"champion v{before}"
        ref_info: dict[str, Any] = {"kind": "champion", "version": before, "method": champion.tags.get("method", "")}
        ref_pred = predict_uri(f"models:/{name}/{before}", images)
    else:
        if is_baseline:
            folder = root / TARGET_DIR / target / next_best
            reference = f"next-best {next_best}"
            kind = "next_best"
        else:
            folder = root / TARGET_DIR / target / settings.baseline
            if not (folder / "config.json").is_file():
                raise RegistryError(
                    f"{folder}: no baseline target model for the first champion of {name}; add "
                    f"{settings.baseline!r} to finetune.methods and run `dvc repro finetune`, or choose "
                    "another baseline (promote.baseline / --baseline)")
            reference = f"baseline {settings.baseline}"
            kind = "baseline"
        ref_info = {"kind": kind, "method": folder.name, "path": str(folder.relative_to(root)),
                    "weights_sha256": sha256_file(folder / "model.safetensors")}
        ref_pred = predict_folder(folder, images)
    score = cross_fitted_matched_accuracies if cluster else fold_accuracies
    chall_acc, ref_acc = score(chall_pred, labels, folds), score(ref_pred, labels, folds)
    verdict = decide(chall_acc, ref_acc, settings.margin, settings.confidence)
    if cluster:
        verdict = GateDecision(verdict.promote, verdict.gain, "matched accuracy (each cluster mapped to a class on "
                               f"the other folds' images): {verdict.reason}")
    if is_baseline:
        why = (f"version {cv} is the baseline method {settings.baseline!r} itself, so it is compared with the "
               f"next-best method {next_best!r}: {verdict.reason}")
        if not verdict.promote:
            why += f"; to ship it anyway: `metatransfer promote --target {target} --force --reason \"...\"`"
        verdict = GateDecision(verdict.promote, verdict.gain, why)
    decision = "promoted" if verdict.promote else "rejected"
    after = cv if verdict.promote else before
    evidence = {
        "target": target, "model_name": name, "decision": decision, "reason": verdict.reason,
        "settings": settings.model_dump(), "score": "matched_accuracy_cross_fitted" if cluster else "accuracy",
        "challenger": {"version": cv, "method": challenger.tags.get("method", ""), "acc": float(chall_acc.mean())},
        "reference": {**ref_info, "acc": float(ref_acc.mean())},
        "folds": {"split": "test", "n_images": int(len(labels)), "split_fingerprint": fingerprint,
                  "n_folds": len(folds), "seed": settings.seed, "sha256": folds_digest(folds),
                  "indices": [f.tolist() for f in folds]},
        "per_fold": {"challenger": chall_acc.tolist(), "reference": ref_acc.tolist(),
                     "difference": (chall_acc - ref_acc).tolist()},
        "gain": {"mean": verdict.gain.mean, "ci_low": verdict.gain.low, "ci_high": verdict.gain.high,
                 "confidence": settings.confidence, "n": verdict.gain.n},
        "champion_before": before, "champion_after": after,
    }
    with tracking.parent_run(parent_run_id), tracking.stage_run("promote", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "decision": decision, "challenger_version": cv,
                         "champion_version": after or "", "previous_champion_version": before or "",
                         "reference": reference})
        tracking.log_params({f"promote.{k}": v for k, v in settings.model_dump().items()})
        tracking.log_metrics({"promote/gain_mean": verdict.gain.mean, "promote/gain_ci_low": verdict.gain.low,
                              "promote/gain_ci_high": verdict.gain.high, "promote/challenger_acc": float(chall_acc.mean()),
                              "promote/reference_acc": float(ref_acc.mean())})
        tracking.log_dict(evidence, f"promote/{target}.json")
        run_id = run.info.run_id
        if verdict.promote:  # inside the run, journaled: a kill here is undone by the reaper
            move_champion(client, target, cv, challenger.tags.get(LEARNER_TAG))
            set_history(client, name, [*champion_history(client, name), cv])
    for key, value in {"gate_decision": decision, "gate_reference": reference, "gate_gain_mean": f"{verdict.gain.mean:.6f}",
                       "gate_ci_low": f"{verdict.gain.low:.6f}", "gate_ci_high": f"{verdict.gain.high:.6f}",
                       "gate_run_id": run_id}.items():
        client.set_model_version_tag(name, cv, key, value)
    log.info("%s: challenger v%s %s against %s: %s", name, cv, decision, reference, verdict.reason)
    result = PromotionResult(target, name, decision, verdict.reason, cv, before, after, reference,
                             verdict.gain.mean, verdict.gain.low, verdict.gain.high, run_id, evidence)
    record_decision(root, target, {**result.to_dict(), "confidence": settings.confidence, "margin": settings.margin,
                                   "n_folds": settings.n_folds, "time": now()})
    return result


def next_best_method(root: str | Path, target: str, baseline: str, key: str = "val_acc") -> str | None:
    """The method with the best target validation accuracy (`key`) other than `baseline`, or None.

    Read from models/target/<target>/selection.json (the `finetune` stage's record); only
    methods whose target model is on disk (config.json) count. Ties: the first listed. An
    unlabelled target has no validation accuracy: its methods are ranked by `silhouette`.
    """
    folder = Path(root) / TARGET_DIR / target
    try:
        methods = json.loads((folder / SELECTION_FILE).read_text()).get("methods", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    ranked = [(float(m.get(key, float("-inf"))), -i, name) for i, (name, m) in enumerate(methods.items())
              if name != baseline and isinstance(m, dict) and (folder / name / "config.json").is_file()]
    return max(ranked)[2] if ranked else None


def force_promote(root: str | Path, target: str, reason: str, parent_run_id: str | None = None) -> PromotionResult:
    """Move `champion` of `target` to its `challenger` without the gate: a person's deliberate decision.

    For a challenger the gate cannot judge fairly (e.g. the baseline method itself).
    Logged as a run `promote` with tags decision=promoted, forced=true and
    force_reason, the param `promote.force_reason`, the version tags
    gate_decision=promoted, gate_forced=true, gate_reason; recorded in
    reports/promotion.json with `forced: true` and the reason. The champion
    history grows as after a gated promotion, so `rollback` undoes it.

    Args:
        root: project root.
        target: target dataset name.
        reason: why the gate is overridden (required, kept verbatim).
        parent_run_id: see `promote`.

    Raises:
        NoChallengerError: no challenger registered.
        RegistryError: empty reason, or a challenger the quality gate refused.
    """
    import mlflow

    reason = (reason or "").strip()
    if not reason:
        raise RegistryError("--force needs --reason \"...\": a forced promotion skips the gate and must say why")
    root = Path(root).resolve()
    client = client_for(root)
    name = model_name(target)
    challenger = require_challenger(client, name, root)
    cv = str(challenger.version)
    champion = alias_version(client, name, CHAMPION)
    before = str(champion.version) if champion is not None else None
    if before == cv:
        return PromotionResult(target, name, "already_champion", f"version {cv} is already the champion",
                               cv, before, before, f"champion v{before}")
    if challenger.tags.get(QUALITY_TAG) == "refused":
        raise RegistryError(f"{name}: version {cv} failed the quality gate ({challenger.tags.get('quality_reason', '')}); "
                            "not promotable, not even with --force")
    with tracking.parent_run(parent_run_id), tracking.stage_run("promote", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "decision": "promoted", "forced": "true",
                         "force_reason": reason[:5000], "challenger_version": cv, "champion_version": cv,
                         "previous_champion_version": before or "", "reference": "none (forced)"})
        tracking.log_params({"promote.forced": True, "promote.force_reason": reason})
        run_id = run.info.run_id
        move_champion(client, target, cv, challenger.tags.get(LEARNER_TAG))
        set_history(client, name, [*champion_history(client, name), cv])
    for key, value in {"gate_decision": "promoted", "gate_forced": "true", "gate_reason": reason[:5000],
                       "gate_run_id": run_id}.items():
        client.set_model_version_tag(name, cv, key, value)
    log.warning("%s: challenger v%s promoted WITHOUT the gate (--force): %s", name, cv, reason)
    result = PromotionResult(target, name, "promoted", reason, cv, before, cv, "none (forced)", run_id=run_id,
                             forced=True)
    record_decision(root, target, {**result.to_dict(), "time": now()})
    return result


def promote_targets(root: str | Path, targets: list[str] | None = None, settings: GateSettings | None = None,
                    missing_ok: bool = False, parent_run_id: str | None = None) -> list[PromotionResult]:
    """`promote` for several targets (default: finetune.targets from params.yaml).

    Args:
        parent_run_id: see `promote`.
        missing_ok: a target without a challenger yields decision "no_challenger" instead of an error
            (the pipeline flow uses this: a run whose finetune stage was skipped registers nothing).
    """
    root = Path(root).resolve()
    params = project_params(root)
    if targets is None:
        if params.finetune is None:
            raise RegistryError(f"{root / 'params.yaml'}: no `finetune` section, so no targets; pass --target")
        # Unlabelled targets too: their cluster models are gated on hidden labels or answered
        # `needs_review` (registry/unlabeled.py).
        targets = list(params.finetune.targets)
    settings = settings or gate_settings(params)
    results = []
    for target in targets:
        try:
            results.append(promote(root, target, settings, parent_run_id))
        except NoChallengerError as exc:
            if not missing_ok:
                raise
            log.warning("%s", exc)
            results.append(PromotionResult(target, model_name(target), "no_challenger", str(exc)))
    return results
