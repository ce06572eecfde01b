"""The page's sections as plain data for the template: numbers formatted, no markup.

A table cell is a dict: ``text`` and optionally ``cls``, ``title``, ``style``; the template
(templates/report.html.j2) turns them into HTML and escapes every value.
"""

from __future__ import annotations

import base64
from typing import Any

from metatransfer.classnames import display_names
from metatransfer.report.formatting import cell, fmt_acc_ci, fmt_diff, fmt_pct, majority_reference
from metatransfer.report.inputs import ClassCounts, ReportInputs, promotion_records
from metatransfer.report.status import SHIPPED_DECISIONS, target_status
from metatransfer.report.unlabeled import unlabeled_card

META_COLUMNS = (("best_val_acc", "best val acc (%)"), ("best_step", "best step"), ("steps", "steps"),
                ("seconds", "seconds"), ("faults", "faults"), ("budget_hit", "ended by"))


def _ordered(keys: list[str], preferred: Any) -> list[str]:
    """`keys` in the order of `preferred` (params.yaml), unknown ones after, as found."""
    rank = {k: i for i, k in enumerate(preferred)}
    return sorted(keys, key=lambda k: rank.get(k, len(rank)))


def _gate_cell(gate: Any) -> dict[str, Any]:
    """'passed' / 'REFUSED' with the test's reason as a tooltip ('–' when the gate did not run)."""
    if not isinstance(gate, dict):
        return cell("–")
    passed = bool(gate.get("passed"))
    return cell("passed" if passed else "REFUSED", "" if passed else "refused", gate.get("reason", ""))


# --------------------------------------------------------------------------- target models


def _method_rows(methods: dict[str, Any], chosen: str, mark: str, names: list[str], short: list[str],
                 weakest: bool) -> list[dict[str, Any]]:
    rows = []
    for m, r in methods.items():
        test = fmt_acc_ci(r["test_acc"], r["test_acc_ci95"], r.get("images", 0)) if "test_acc" in r else "–"
        cells = [cell(f"{m} ({mark})" if m == chosen else m), cell(fmt_pct(r.get("val_acc"))), cell(test),
                 cell(fmt_pct(r.get("balanced_acc")))]
        if weakest:
            cells.append(_weakest_cell(r.get("per_class_recall"), names, short))
        rows.append({"cls": "chosen" if m == chosen else "", "cells": [*cells, _gate_cell(r.get("quality_gate"))]})
    return rows


def _weakest_cell(recall: Any, names: list[str], short: list[str]) -> dict[str, Any]:
    """The class a method recognises worst on the test split, with its recall ('–' without per-class data)."""
    if not isinstance(recall, dict) or not recall:
        return cell("–")
    label = dict(zip(names, short))
    name = min(recall, key=lambda n: (recall[n], n))
    return cell(f"{label.get(name, name)}: {fmt_pct(recall[name], 1)}", title=name)


def _references(test_counts: list[int], names: list[str], short: list[str], weakest: bool) -> dict[str, Any] | None:
    """Majority-class and chance accuracy on the test split, as a sentence and as table rows."""
    ref = majority_reference(test_counts)
    if ref is None:
        return None
    label, acc = ref
    k = len(test_counts)
    name = short[label] if label < len(short) else str(label)
    pad = [cell("–")] * (1 + int(weakest))  # the weakest-class and quality-gate columns
    chance = cell(fmt_pct(1 / k))  # a constant answer's balanced accuracy is chance too
    rows = [{"cls": "reference", "cells": [cell(f"majority class (always “{name}”)"), cell("–"), cell(fmt_pct(acc)),
                                           chance, *pad]},
            {"cls": "reference", "cells": [cell(f"chance (1/{k})"), chance, chance, chance, *pad]}]
    return {"majority_name": name, "majority_title": names[label] if label < len(names) else name,
            "majority_acc": fmt_pct(acc), "chance": fmt_pct(1 / k), "k": k, "n_test": sum(test_counts), "rows": rows}


def _counts_view(counts: ClassCounts | None, names: list[str], short: list[str],
                 test_counts: list[int] | None, shots: Any = None) -> dict[str, Any] | None:
    """Images per class and split (the prepared manifest's train/val/test, else evaluate.json's test
    counts), plus the train images fine-tuning used per class (selection.json `shots`) when recorded."""
    if counts is not None:
        names, short, splits, source = counts.class_names, display_names(counts.class_names), counts.splits, "manifest"
    elif test_counts and len(test_counts) == len(names):
        splits, source = {"test": test_counts}, "evaluate"
    else:
        return None
    columns = {sp: list(v) for sp, v in splits.items()}
    used = shots.get("per_class") if isinstance(shots, dict) else None
    short_of = set(shots.get("fewer_than_requested") or ()) if isinstance(shots, dict) else set()
    if isinstance(used, dict) and used:
        columns[FINETUNED_COLUMN] = [int(used.get(n, 0)) for n in names]
    rows = [{"name": n, "short": s, "counts": [columns[c][i] for c in columns], "short_of_request": n in short_of}
            for i, (n, s) in enumerate(zip(names, short))]
    return {"splits": list(columns), "rows": rows, "totals": [sum(v) for v in columns.values()], "source": source,
            "requested": shots.get("requested") if isinstance(shots, dict) else None,
            "fewer": [s for n, s in zip(names, short) if n in short_of]}


# The counts table's column of the train images fine-tuning took per class (selection.json `shots`).
FINETUNED_COLUMN = "fine-tuned on"


def _caps_text(caps: dict[str, int]) -> str:
    """What fine-tuning takes of the train and val splits (finetune.shots_per_class, val_per_class)."""
    if not caps:
        return ""
    take = {s: f"at most {n}" if n > 0 else "all" for s, n in caps.items()}
    return (f"Fine-tuning trains on {take['train']} train and validates on {take['val']} val images per class "
            "(finetune.shots_per_class, finetune.val_per_class); the test split is used whole.")


def _per_class_table(methods: dict[str, Any], chosen: str, mark: str, names: list[str], short: list[str],
                     counts: Any) -> dict[str, Any] | None:
    """Test recall per class (rows) and method (columns); None when evaluate.json has no per-class recall."""
    shown = [m for m, r in methods.items() if isinstance(r.get("per_class_recall"), dict)]
    if not names or not shown:
        return None
    counts = counts if isinstance(counts, list) and len(counts) == len(names) else [None] * len(names)
    header = [cell(f"{m} ({mark})", "chosen") if m == chosen else cell(m) for m in shown]
    rows = []
    for name, label, n in zip(names, short, counts):
        cells = [cell(label, title=name), cell("–" if n is None else n)]
        for m in shown:
            v = methods[m]["per_class_recall"].get(name)
            cls = ("chosen " if m == chosen else "") + ("low" if v is not None and v < 1.0 / len(names) else "")
            cells.append(cell(fmt_pct(v, 1), cls.strip()))
        rows.append(cells)
    return {"header": header, "rows": rows, "k": len(names)}


def _confusion_table(cm: Any, names: list[str], short: list[str]) -> dict[str, Any] | None:
    """The chosen model's confusion matrix on the test split with class names; None without one."""
    if not names or not isinstance(cm, list) or len(cm) != len(names):
        return None
    rows = []
    for name, label, row in zip(names, short, cm):
        total = sum(row) or 1
        rows.append({"name": name, "short": label,
                     "cells": [cell(v, style=f"background: rgba(9, 105, 218, {0.55 * v / total:.2f})") for v in row]})
    return {"columns": list(zip(names, short)), "rows": rows}


def adapter_sentence(shape: dict[str, int] | None) -> str:
    """What a heterogeneous target's input adapter does, from its chosen model's config.json ("" for a
    target at the backbone's shape).

    Args:
        shape: {"channels", "image_size"} of the target's images and {"backbone_channels",
            "backbone_size"} of the backbone (`inputs.input_shape`), or None.
    """
    if not shape:
        return ""
    c, s, bc, bs = shape["channels"], shape["image_size"], shape["backbone_channels"], shape["backbone_size"]
    size = (f"resolution {s} px → {bs} px of the backbone, handled by adaptive pooling" if s != bs else
            f"resolution {s} px, as the backbone (adaptive pooling handles any other)")
    if c == bc:
        return (f"Heterogeneous input: no channel adapter needed ({c} channel{'s' * (c > 1)} on both sides); "
                f"{size}.")
    return (f"Heterogeneous input: an input adapter was trained with the target model: channels {c} → {bc} "
            f"(a learned 1×1 convolution, started as the fixed conversion prepare applies); {size}.")


def target_cards(inp: ReportInputs) -> list[dict[str, Any]]:
    """One card per target: status, selection reason, MLflow model, classes, methods, references, counts."""
    targets_ev = (inp.evaluate or {}).get("target_models") or {}
    records = promotion_records(inp.promotion)
    cards = []
    for target in dict.fromkeys([*inp.selections, *targets_ev]):
        sel = inp.selections.get(target, {})
        facts = (inp.run_facts.get("finetune") or {}).get(target) or {}
        if "unlabeled" in sel:  # clustered without labels: its own card
            scores = ((inp.evaluate or {}).get("unlabeled_targets") or {}).get(target) or {}
            cards.append(unlabeled_card(target, sel, scores, records.get(target), facts))
            continue
        tev = targets_ev.get(target, {})
        chosen = sel.get("chosen") or tev.get("chosen") or "?"
        status = target_status(records.get(target), facts)
        mark = "shipped" if status["state"] == "shipped" else "selected"
        reg = (facts.get("registered") or {}).get("model") or {}
        methods = dict(sel.get("methods") or {})
        for m, r in (tev.get("methods") or {}).items():
            methods[m] = {**methods.get(m, {}), **r}
        methods = {m: methods[m] for m in _ordered(list(methods), inp.methods)}
        counts = inp.class_counts.get(target)
        names = inp.class_names.get(target) or (counts.class_names if counts else [])
        short = display_names(names)
        weakest = bool(names) and any("per_class_recall" in r for r in methods.values())
        test_counts = counts.splits.get("test") if counts and counts.class_names == names else None
        if test_counts is None and isinstance(tev.get("class_counts"), list):
            test_counts = [int(n) for n in tev["class_counts"]]
        cards.append({
            "target": target, "chosen": chosen, "mark": mark, "status": status,
            "reason": sel.get("reason") or tev.get("reason") or "",
            "adapter": adapter_sentence(inp.input_shapes.get(target)),
            "refused": facts.get("refused") or "",
            "model_uri": sel.get("model_uri") or facts.get("model_uri") or "",  # older selection.json held it
            "registered": f" registered as {reg.get('name')} v{reg.get('version')}" if reg else "",
            "classes": list(zip(names, short)),
            "weakest": weakest,
            "rows": _method_rows(methods, chosen, mark, names, short, weakest),
            "references": _references(test_counts, names, short, weakest) if test_counts else None,
            "evaluated": bool(tev),
            "counts": _counts_view(counts, names, short, test_counts, sel.get("shots")),
            "caps": _caps_text(inp.finetune_caps),
            "recall": _per_class_table(methods, chosen, mark, names, short, tev.get("class_counts")),
            "confusion": _confusion_table(tev.get("confusion"), names, short),
        })
    return cards


# --------------------------------------------------------------------------- other sections


def _shots_order(by_shot: dict[str, Any]) -> list[str]:
    return sorted(by_shot, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k)))


def episode_tables(inp: ReportInputs) -> list[dict[str, Any]]:
    """One table per episode set: methods (rows) by shots (columns), mean ± CI and Δ vs the reference."""
    ev = (inp.evaluate or {}).get("episodes") or {}
    tables = []
    for set_name in _ordered(list(ev), inp.episode_sets):
        by_method = {m: ev[set_name][m] for m in _ordered(list(ev[set_name]), inp.methods)}
        shots = _shots_order(dict.fromkeys(k for by_shot in by_method.values() for k in by_shot))
        best = {}
        for k in shots:
            means = [(r[k]["acc_mean"], m) for m, r in by_method.items() if k in r and "acc_mean" in r[k]]
            best[k] = max(means)[1] if means else None
        rows = []
        for method, by_shot in by_method.items():
            cells = []
            for k in shots:
                r = by_shot.get(k)
                if not r:
                    cells.append(None)
                    continue
                c = {"best": best.get(k) == method, "episodes": r.get("episodes", ""),
                     "acc": fmt_acc_ci(r["acc_mean"], r["acc_ci95"], r.get("episodes", 0)), "diff": None}
                if "diff_vs_reference" in r:
                    sig = bool(r.get("diff_significant"))
                    c["diff_kind"] = ("sig-pos" if r["diff_vs_reference"] > 0 else "sig-neg") if sig else "ns"
                    c["diff"] = fmt_diff(r["diff_vs_reference"], r["diff_ci95"]) + (" *" if sig else "")
                cells.append(c)
            rows.append({"method": method, "reference": method == inp.reference, "cells": cells})
        info = inp.episode_sets.get(set_name)
        caption = ""
        if info:
            caption = (f"{info['dataset']}/{info['split']}, {info['n_way']}-way "
                       f"(chance {fmt_pct(1 / info['n_way'])} %), {info['n_query']} queries per class, "
                       f"{info['n_episodes']} fixed episodes")
        tables.append({"name": set_name, "caption": caption, "shots": shots, "rows": rows})
    return tables


def meta_train_rows(inp: ReportInputs) -> list[dict[str, Any]]:
    """Per algorithm: best val acc, its step, steps, seconds, faults, what ended it, gate, model URI."""
    run_facts = (inp.run_facts.get("meta_train") or {}).get("algorithms") or {}
    rows = []
    for algo, r in (inp.meta_train or {}).items():
        if not isinstance(r, dict):
            continue
        # Run-specific facts (seconds, model URI) come from reports/run_facts.json; older
        # metrics files held them themselves.
        r = {**{k: v for k, v in (run_facts.get(algo) or {}).items() if v is not None}, **r}
        cells = [cell(algo)]
        for key, _ in META_COLUMNS:
            v = r.get(key)
            if key == "budget_hit":
                text = {"none": "steps", "": "steps", "time": "TIME GUARD"}.get(str(v), str(v)) if v else "–"
            elif key == "best_val_acc":
                text = fmt_pct(v)
            elif isinstance(v, float):
                text = f"{v:.1f}"
            elif isinstance(v, (list, dict)):
                text = str(len(v))
            else:
                text = "–" if v is None else str(v)
            cells.append(cell(text))
        rows.append({"cells": [*cells, _gate_cell(r.get("quality_gate"))], "model_uri": r.get("model_uri") or ""})
    return rows


def promotion_rows(inp: ReportInputs) -> list[list[dict[str, Any]]]:
    """reports/promotion.json as table rows: target, challenger, baseline, gain ± CI, decision, reason, champion."""
    rows = []
    for target, rec in promotion_records(inp.promotion).items():
        gain, low, high = rec.get("gain_mean"), rec.get("gain_ci_low"), rec.get("gain_ci_high")
        if isinstance(gain, (int, float)) and isinstance(low, (int, float)) and isinstance(high, (int, float)):
            conf = rec.get("confidence")
            level = f"{100 * conf:g} %" if isinstance(conf, (int, float)) else "the"
            gain_cell = cell(fmt_diff(gain, (high - low) / 2),
                             title=f"{level} CI of the gain: [{100 * low:+.2f}, {100 * high:+.2f}] points")
        else:
            gain_cell = cell("–")
        decision = str(rec.get("decision", "–"))
        cls = "good" if decision in SHIPPED_DECISIONS else "refused" if decision == "rejected" else ""
        challenger = rec.get("challenger")
        champion = rec.get("champion_after")
        rows.append([cell(target), cell(f"v{challenger}" if challenger else "–"), cell(rec.get("reference") or "–"),
                     gain_cell, cell(decision, cls), cell(rec.get("reason") or "–", "text"),
                     cell(f"v{champion}" if champion else "none")])
    return rows


def figures(inp: ReportInputs) -> list[dict[str, Any]]:
    """The PNGs grouped by folder under plots/, each as a base64 data URI."""
    groups: list[dict[str, Any]] = []
    for rel, data in inp.figures:
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if not groups or groups[-1]["folder"] != folder:
            groups.append({"folder": folder, "items": []})
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        groups[-1]["items"].append({"rel": rel, "uri": uri})
    return groups
