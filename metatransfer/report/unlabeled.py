"""The card of a target clustered without labels: what was done, what the served model answers, where
it stands in the registry, and the clustering scores against hidden labels once `evaluate` has run."""

from __future__ import annotations

from typing import Any

from metatransfer.report.formatting import cell, fmt_pct
from metatransfer.report.status import target_status

NEEDS_REVIEW = "needs_review"  # metatransfer.registry.NEEDS_REVIEW (the report reads files, not the registry)


def unlabeled_status(record: dict[str, Any] | None, facts: dict[str, Any]) -> dict[str, str]:
    """Where an unlabelled target's cluster model stands: registered, gated, promoted or waiting for a person.

    Args:
        record: the target's latest record in reports/promotion.json (None: no decision yet).
        facts: the target's finetune facts from reports/run_facts.json (registered version).

    Returns:
        {"state", "badge", "text"} as `sections.target_status`.
    """
    version = ((facts.get("registered") or {}).get("model") or {}).get("version")
    if not version:
        return {"state": "selected", "badge": "no labels",
                "text": "Clustered without labels; no registered version is recorded in reports/run_facts.json "
                        "(run the finetune stage in this project to register it as challenger)."}
    if record is None:
        return {"state": "selected", "badge": "no labels",
                "text": f"Clustered without labels; registered as challenger v{version}; no promotion decision yet "
                        "(metatransfer promote: gated on matched accuracy against hidden test labels, or, without "
                        "any, a person's --force --reason)."}
    if record.get("decision") == NEEDS_REVIEW and str(record.get("challenger")) == str(version):
        return {"state": "selected", "badge": "needs review",
                "text": f"Registered as challenger v{version}; not promoted: {record.get('reason') or 'needs review'}."}
    status = target_status(record, facts)
    return {**status, "text": f"Clustered without labels. {status['text']}"}


def unlabeled_card(target: str, sel: dict[str, Any], scores: dict[str, Any], record: dict[str, Any] | None = None,
                   facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of a target clustered without labels (selection.json has "unlabeled"): what was done,
    per method k, train silhouette and, once evaluated, NMI / ARI / matched accuracy against the hidden
    test labels. The keys of a labelled card are there, empty, for the template.

    Args:
        target: the target.
        sel: its selection.json.
        scores: its entry of metrics/evaluate.json "unlabeled_targets" ({} before evaluate).
        record: its latest record in reports/promotion.json, if any.
        facts: its finetune entry of reports/run_facts.json (model URI, registered version), if any.
    """
    facts = facts or {}
    info = sel.get("unlabeled") or {}
    chosen = str(sel.get("chosen") or "?")
    k = info.get("k", "?")
    steps = info.get("self_training_steps") or 0
    done = (f"batch-norm statistics re-estimated on the {info.get('images', '?')} train images, "
            f"soft k-means{' (k chosen by silhouette)' if info.get('select_k') else ''}"
            + (f", then {steps} self-training steps on confident pseudo-labels" if steps else ""))
    scored = info.get("scoring") or (  # "scoring": prepared without any label (finetune says so)
        "scored against hidden labels (those of the test split, used for scoring only)" if scores
        else "scores against hidden labels appear after dvc repro evaluate")
    rows = []
    for m, r in (sel.get("methods") or {}).items():
        ev = (scores.get("methods") or {}).get(m) or {}
        rows.append({"cls": "chosen" if m == chosen else "", "cells": [
            cell(f"{m} (selected)" if m == chosen else m), cell(r.get("k", "–")),
            cell(f"{r['silhouette']:.3f}" if isinstance(r.get("silhouette"), (int, float)) else "–"),
            *[cell(f"{ev[key]:.3f}" if key in ev else "–") for key in ("nmi", "ari")],
            cell(fmt_pct(ev.get("matched_acc")) if "matched_acc" in ev else "–"),
            cell(fmt_pct(ev.get("majority_rate")) if "majority_rate" in ev else "–")]})
    names = [f"cluster_{i}" for i in range(k)] if isinstance(k, int) else []
    served = (f"The model answers a cluster id per image ({names[0]} … {names[-1]}), not a diagnosis: which "
              "cluster is which finding is for a person to say." if names else "")
    reg = (facts.get("registered") or {}).get("model") or {}
    return {
        "target": target, "chosen": chosen, "mark": "selected", "status": unlabeled_status(record, facts),
        "reason": sel.get("reason") or "", "adapter": "", "refused": "", "model_uri": facts.get("model_uri") or "",
        "registered": f" registered as {reg.get('name')} v{reg.get('version')}" if reg else "",
        "classes": list(zip(names, names)), "weakest": False, "rows": [], "references": None,
        "evaluated": bool(scores), "counts": None, "caps": "", "recall": None, "confusion": None,
        "unlabeled": {"sentence": f"No labels were used for training; k={k}, clustering in the {chosen} embedding; "
                                  f"{scored}.", "done": done, "served": served, "rows": rows},
    }
