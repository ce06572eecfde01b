"""One HTML page a person would rather read than logs: `reports/index.html`.

It gathers what the pipeline wrote (metrics/evaluate.json, metrics/meta_train.json,
models/target/<target>/selection.json, every PNG under plots/, the promotion
decision reports/promotion.json and the run-specific facts of the latest stage
runs reports/run_facts.json (wall seconds, MLflow model URIs, registered
versions: kept out of the DVC outputs so that those stay byte-identical)) with the run's identity (git
commit, dvc.lock digest, prepared-data version) into one self-contained file:
CSS inline, figures embedded as base64 data URIs, no script and no external
request, so it opens offline, attaches to an e-mail or a CI artifact as is.

    python -m metatransfer.report [--params params.yaml]

The module also starts the two web UIs for the CLI (`open_ui("mlflow")`,
`open_ui("prefect")`) as subprocesses: no MLflow or Prefect import here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import html
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metatransfer.classnames import display_names
from metatransfer.config import Params, load_params
from metatransfer.errors import DataError, MetatransferError

log = logging.getLogger(__name__)

REPORT_PATH = Path("reports") / "index.html"
PROMOTION_PATH = Path("reports") / "promotion.json"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- formatting


def fmt_pct(x: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as percent with `digits` decimals ("61.23"); "–" when missing."""
    if x is None:
        return "–"
    return f"{100 * float(x):.{digits}f}"


def fmt_acc_ci(mean: float, ci: float) -> str:
    """Mean ± CI half-width in percent, as the report's tables show it: "61.23 ± 2.10"."""
    return f"{fmt_pct(mean)} ± {fmt_pct(ci)}"


def fmt_diff(diff: float, ci: float) -> str:
    """A paired difference in points with sign and CI: "Δ +3.20 ± 1.10"."""
    return f"Δ {100 * float(diff):+.2f} ± {100 * float(ci):.2f}"


def _e(value: Any) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


# --------------------------------------------------------------------------- inputs


def read_json(path: Path) -> Any | None:
    """Parse a JSON file; None when it does not exist.

    Raises:
        DataError: the file exists but is not valid JSON (names the file, line and what to do).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it "
                        f"(`dvc repro`) or delete the file") from None


@dataclass(frozen=True)
class RunFacts:
    """Who/what produced the numbers on the page."""

    git_commit: str
    dvc_lock_sha256: str
    data_version: str
    generated_utc: str
    project: str
    seed: int | None = None


def run_facts(root: Path, params: Params | None) -> RunFacts:
    """The run's identity: git commit, dvc.lock digest, data version (DVC md5 of the prepared store).

    Args:
        root: the project root.
        params: the loaded params (for the prepared-data path and the seed); None uses defaults.

    Returns:
        The facts; empty strings where git/DVC have nothing recorded.
    """
    from metatransfer.dvc_stages import lock_digest
    from metatransfer.tracking import dvc_out_md5, git_commit

    prepared = params.data.prepared_dir if params is not None else "data/prepared"
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return RunFacts(
        git_commit=git_commit(root),
        dvc_lock_sha256=lock_digest(root),
        data_version=dvc_out_md5(root, prepared),
        generated_utc=now,
        project=Path(root).resolve().name,
        seed=params.seed if params is not None else None,
    )


@dataclass
class ReportInputs:
    """Everything the page shows, already read from disk (render_report is pure)."""

    facts: RunFacts
    evaluate: dict[str, Any] | None = None
    meta_train: dict[str, Any] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    promotion: Any | None = None
    run_facts: dict[str, Any] = field(default_factory=dict)  # reports/run_facts.json (not a DVC output)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (path under plots/, PNG bytes)
    episode_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> params for captions
    reference: str | None = None
    methods: tuple[str, ...] = ()  # params.yaml's order of methods (JSON files sort their keys)
    class_names: dict[str, list[str]] = field(default_factory=dict)  # target -> full class names, label order


def collect_inputs(root: Path, params: Params | None) -> ReportInputs:
    """Read every input of the page from the project folder (missing ones stay empty).

    Raises:
        DataError: an input JSON file exists but cannot be parsed.
    """
    root = Path(root)
    if params is not None and params.finetune is not None:
        targets = list(params.finetune.targets)
    else:
        targets = sorted(p.parent.name for p in (root / "models" / "target").glob("*/selection.json"))
    selections = {}
    for target in targets:
        sel = read_json(root / "models" / "target" / target / "selection.json")
        if sel is not None:
            selections[target] = sel
    figures = []
    plots = root / "plots"
    for png in sorted(plots.rglob("*.png")) if plots.is_dir() else []:
        data = png.read_bytes()
        if data.startswith(_PNG_MAGIC):  # a truncated/foreign file would show as a broken image
            figures.append((png.relative_to(plots).as_posix(), data))
        else:
            log.warning("%s: not a PNG file (wrong signature); left out of the report", png)
    evaluate = read_json(root / "metrics" / "evaluate.json")
    class_names = {t: names for t in selections if (names := _class_names(root, t, selections[t], evaluate))}
    sets: dict[str, dict[str, Any]] = {}
    if params is not None and params.episodes is not None:
        for name, s in params.episodes.sets.items():
            sets[name] = {"dataset": s.dataset, "split": s.split, "n_way": s.n_way,
                          "n_query": s.n_query, "n_episodes": s.n_episodes}
    return ReportInputs(
        facts=run_facts(root, params),
        evaluate=evaluate,
        meta_train=read_json(root / "metrics" / "meta_train.json"),
        selections=selections,
        promotion=read_json(root / PROMOTION_PATH),
        run_facts=_run_facts(root),
        figures=figures,
        episode_sets=sets,
        reference=params.evaluate.reference if params is not None and params.evaluate is not None else None,
        methods=tuple(params.evaluate.methods) if params is not None and params.evaluate is not None else (),
        class_names=class_names,
    )


def _class_names(root: Path, target: str, selection: dict[str, Any], evaluate: dict[str, Any] | None) -> list[str]:
    """A target's class names in label order: from metrics/evaluate.json, else from the shipped
    model's config.json (so the card names the classes before `evaluate` has run); [] when neither has them."""
    names = (((evaluate or {}).get("target_models") or {}).get(target) or {}).get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    chosen = selection.get("chosen")
    config = root / "models" / "target" / target / str(chosen) / "config.json"
    if chosen and config.is_file():
        try:
            names = json.loads(config.read_text(encoding="utf-8")).get("class_names")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            log.warning("%s: not readable JSON; the report shows no class names for %s", config, target)
            return []
        if isinstance(names, list):
            return [str(n) for n in names]
    return []


def _run_facts(root: Path) -> dict[str, Any]:
    """reports/run_facts.json ({} when absent or unreadable: it only adds timings and MLflow ids)."""
    from metatransfer.tracking import read_run_facts

    return read_run_facts(root)


def _gate_cell(gate: Any) -> str:
    """'passed' / 'REFUSED' with the test's reason as a tooltip ('–' when the gate did not run)."""
    if not isinstance(gate, dict):
        return "<td>–</td>"
    word = "passed" if gate.get("passed") else "REFUSED"
    cls = "" if gate.get("passed") else ' class="refused"'
    return f'<td{cls} title="{_e(gate.get("reason", ""))}">{_e(word)}</td>'


def _ordered(keys: list[str], preferred: Any) -> list[str]:
    """`keys` in the order of `preferred` (params.yaml), unknown ones after, as found."""
    rank = {k: i for i, k in enumerate(preferred)}
    return sorted(keys, key=lambda k: rank.get(k, len(rank)))


# --------------------------------------------------------------------------- rendering

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0969da;
        --good:#1a7f37; --bad:#cf222e; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 8px; font-size: 22px; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; font-size: 13px; }
header dt { color: #9aa4ae; } header dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
nav { padding: 8px 32px; background: var(--bg); border-bottom: 1px solid var(--line); font-size: 14px; }
nav a { color: var(--accent); margin-right: 16px; text-decoration: none; }
main { padding: 8px 32px 48px; max-width: 1280px; }
h2 { border-bottom: 1px solid var(--line); padding-bottom: 4px; margin-top: 32px; }
h3 { margin-bottom: 4px; }
p.note { color: var(--muted); margin-top: 2px; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: right; vertical-align: top; }
th { background: var(--bg); } td:first-child, th:first-child { text-align: left; }
tr.shipped td { background: #dafbe1; } td.refused, p.refused { color: var(--bad); font-weight: 600; } tr.reference td:first-child { font-style: italic; }
td.best .acc { font-weight: 700; }
.diff { display: block; font-size: 12px; color: var(--muted); }
.diff.sig-pos { color: var(--good); font-weight: 600; } .diff.sig-neg { color: var(--bad); font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; background: var(--good); color: #fff;
         font-size: 12px; margin-left: 6px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 12px 0; }
.empty { color: var(--muted); font-style: italic; }
figure { display: inline-block; margin: 8px 12px 12px 0; vertical-align: top; }
figure img { max-width: 620px; border: 1px solid var(--line); }
figcaption { font: 12px ui-monospace, monospace; color: var(--muted); }
p.classes .cls { font-family: ui-monospace, monospace; font-size: 13px; background: var(--bg);
                 border: 1px solid var(--line); border-radius: 4px; padding: 0 4px; }
th.shipped, td.shipped { background: #dafbe1; } table.confusion td { min-width: 4em; }
td.low { color: var(--bad); font-weight: 600; }
code, pre { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: var(--bg); padding: 8px; overflow-x: auto; }
"""


def _shots_order(by_shot: dict[str, Any]) -> list[str]:
    return sorted(by_shot, key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else 0, str(k)))


def _episode_table(set_name: str, by_method: dict[str, Any], info: dict[str, Any] | None, reference: str | None) -> str:
    shots: list[str] = []
    for by_shot in by_method.values():
        for k in _shots_order(by_shot):
            if k not in shots:
                shots.append(k)
    shots = _shots_order(dict.fromkeys(shots))
    best = {}
    for k in shots:
        means = [(r[k]["acc_mean"], m) for m, r in by_method.items() if k in r and "acc_mean" in r[k]]
        best[k] = max(means)[1] if means else None
    caption = ""
    if info:
        caption = (f"{info['dataset']}/{info['split']}, {info['n_way']}-way, {info['n_query']} queries per class, "
                   f"{info['n_episodes']} fixed episodes")
    out = [f'<h3 id="set-{_e(set_name)}">{_e(set_name)}</h3>']
    if caption:
        out.append(f'<p class="note">{_e(caption)}</p>')
    out.append('<table class="episodes"><thead><tr><th>method</th>'
               + "".join(f"<th>{_e(k)}-shot</th>" for k in shots) + "</tr></thead><tbody>")
    for method, by_shot in by_method.items():
        is_ref = method == reference
        label = _e(method) + (" (reference)" if is_ref else "")
        cells = []
        for k in shots:
            r = by_shot.get(k)
            if not r:
                cells.append("<td>–</td>")
                continue
            cls = ' class="best"' if best.get(k) == method else ""
            cell = f'<span class="acc">{_e(fmt_acc_ci(r["acc_mean"], r["acc_ci95"]))}</span>'
            if "diff_vs_reference" in r:
                sig = bool(r.get("diff_significant"))
                kind = ("sig-pos" if r["diff_vs_reference"] > 0 else "sig-neg") if sig else "ns"
                cell += f'<span class="diff {kind}">{_e(fmt_diff(r["diff_vs_reference"], r["diff_ci95"]))}{" *" if sig else ""}</span>'
            cells.append(f'<td{cls} title="{_e(r.get("episodes", ""))} episodes">{cell}</td>')
        row_cls = ' class="reference"' if is_ref else ""
        out.append(f"<tr{row_cls}><td>{label}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _section_evaluation(inp: ReportInputs) -> str:
    ev = (inp.evaluate or {}).get("episodes")
    out = ['<h2 id="evaluation">Few-shot evaluation</h2>']
    if not ev:
        out.append('<p class="empty">No evaluation yet: metrics/evaluate.json is missing or empty '
                   "(run <code>dvc repro evaluate</code>).</p>")
        return "\n".join(out)
    ref = inp.reference or "the reference method"
    out.append(f'<p class="note">Mean accuracy (%) ± 95 % confidence half-width over the same fixed episodes for '
               f"every method. Δ: paired difference against <b>{_e(ref)}</b> in points, with its 95 % CI; "
               f"* and colour: the CI excludes 0. Bold: the highest mean per column.</p>")
    for set_name in _ordered(list(ev), inp.episode_sets):
        by_method = {m: ev[set_name][m] for m in _ordered(list(ev[set_name]), inp.methods)}
        out.append(_episode_table(set_name, by_method, inp.episode_sets.get(set_name), inp.reference))
    return "\n".join(out)


def _section_models(inp: ReportInputs) -> str:
    out = ['<h2 id="models">Shipped models</h2>']
    targets_ev = (inp.evaluate or {}).get("target_models") or {}
    targets = list(dict.fromkeys([*inp.selections, *targets_ev]))
    if not targets:
        out.append('<p class="empty">No fine-tuned target model yet (run <code>dvc repro finetune</code>).</p>')
        return "\n".join(out)
    for target in targets:
        sel = inp.selections.get(target, {})
        tev = targets_ev.get(target, {})
        chosen = sel.get("chosen") or tev.get("chosen") or "?"
        reason = sel.get("reason") or tev.get("reason") or ""
        out.append(f'<div class="card"><h3 id="target-{_e(target)}">{_e(target)}: '
                   f'<span class="shipped-name">{_e(chosen)}</span><span class="badge">shipped</span></h3>')
        out.append(f"<p>Why: {_e(reason)}</p>" if reason else '<p class="empty">No reason recorded.</p>')
        facts = (inp.run_facts.get("finetune") or {}).get(target) or {}
        model_uri = sel.get("model_uri") or facts.get("model_uri")  # older selection.json files held it
        if facts.get("refused"):
            out.append(f'<p class="refused">Not registered as a challenger: the quality gate refused it '
                       f'({_e(facts["refused"])}).</p>')
        if model_uri:
            reg = (facts.get("registered") or {}).get("model") or {}
            version = f" registered as {reg.get('name')} v{reg.get('version')}" if reg else ""
            out.append(f'<p class="note">MLflow model: <code>{_e(model_uri)}</code>{_e(version)}</p>')
        methods = dict(sel.get("methods") or {})
        for m, r in (tev.get("methods") or {}).items():
            methods[m] = {**methods.get(m, {}), **r}
        methods = {m: methods[m] for m in _ordered(list(methods), inp.methods)}
        names = inp.class_names.get(target) or []
        short = display_names(names)
        if names:
            out.append(f'<p class="classes">Classes ({len(names)}, label order): '
                       + ", ".join(f'<span class="cls" title="{_e(n)}">{_e(d)}</span>' for n, d in zip(names, short))
                       + "</p>")
        weakest = names and any("per_class_recall" in r for r in methods.values())
        if methods:
            out.append("<table><thead><tr><th>method</th><th>val acc (%)</th><th>test acc (%) ± 95 % CI</th>"
                       "<th>balanced test acc (%)</th>" + ("<th>weakest class: test recall (%)</th>" if weakest else "")
                       + "<th>quality gate</th></tr></thead><tbody>")
            for m, r in methods.items():
                test = fmt_acc_ci(r["test_acc"], r["test_acc_ci95"]) if "test_acc" in r else "–"
                row_cls = ' class="shipped"' if m == chosen else ""
                out.append(f"<tr{row_cls}><td>{_e(m)}{' (shipped)' if m == chosen else ''}</td>"
                           f"<td>{_e(fmt_pct(r.get('val_acc')))}</td><td>{_e(test)}</td>"
                           f"<td>{_e(fmt_pct(r.get('balanced_acc')))}</td>"
                           + (_weakest_cell(r.get("per_class_recall"), names, short) if weakest else "")
                           + f"{_gate_cell(r.get('quality_gate'))}</tr>")
            out.append("</tbody></table>")
            if not tev:
                out.append('<p class="note">Test accuracies appear after <code>dvc repro evaluate</code>.</p>')
        out.append(_per_class_table(target, methods, chosen, names, short, tev.get("class_counts")))
        out.append(_confusion_table(target, chosen, tev.get("confusion"), names, short))
        out.append("</div>")
    return "\n".join(out)


def _weakest_cell(recall: Any, names: list[str], short: list[str]) -> str:
    """The class a method recognises worst on the test split, with its recall ('–' without per-class data)."""
    if not isinstance(recall, dict) or not recall:
        return "<td>–</td>"
    label = dict(zip(names, short))
    name = min(recall, key=lambda n: (recall[n], n))
    return f'<td title="{_e(name)}">{_e(label.get(name, name))}: {_e(fmt_pct(recall[name], 1))}</td>'


def _per_class_table(target: str, methods: dict[str, Any], chosen: str, names: list[str], short: list[str],
                     counts: Any) -> str:
    """Test recall per class (rows) and method (columns); '' when evaluate.json has no per-class recall."""
    shown = [m for m, r in methods.items() if isinstance(r.get("per_class_recall"), dict)]
    if not names or not shown:
        return ""
    counts = counts if isinstance(counts, list) and len(counts) == len(names) else [None] * len(names)
    out = [f'<h4 id="recall-{_e(target)}">Test recall per class (%)</h4>',
           '<p class="note">Share of each class\'s test images the model labels correctly; in red: below chance '
           f"(1/{len(names)}), a class the model misses, whatever its overall accuracy.</p>",
           '<table class="per-class"><thead><tr><th>class</th><th>test images</th>'
           + "".join((f'<th class="shipped">{_e(m)} (shipped)</th>' if m == chosen else f"<th>{_e(m)}</th>")
                     for m in shown) + "</tr></thead><tbody>"]
    for name, label, n in zip(names, short, counts):
        cells = []
        for m in shown:
            v = methods[m]["per_class_recall"].get(name)
            cls = " shipped" if m == chosen else ""
            cls += " low" if v is not None and v < 1.0 / len(names) else ""
            cells.append(f'<td class="{cls.strip()}">{_e(fmt_pct(v, 1))}</td>' if cls else f"<td>{_e(fmt_pct(v, 1))}</td>")
        out.append(f'<tr><td title="{_e(name)}">{_e(label)}</td><td>{_e("–" if n is None else n)}</td>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _confusion_table(target: str, chosen: str, cm: Any, names: list[str], short: list[str]) -> str:
    """The shipped model's confusion matrix on the test split as a table with class names; '' without one."""
    if not names or not isinstance(cm, list) or len(cm) != len(names):
        return ""
    out = [f'<h4 id="confusion-{_e(target)}">Confusion matrix of {_e(chosen)} (shipped), test split</h4>',
           '<p class="note">Rows: true class, columns: predicted class; counts of test images, shaded by the share '
           "of the true class.</p>",
           '<table class="confusion"><thead><tr><th>true ↓ / predicted →</th>'
           + "".join(f'<th title="{_e(n)}">{_e(d)}</th>' for n, d in zip(names, short)) + "</tr></thead><tbody>"]
    for name, label, row in zip(names, short, cm):
        total = sum(row) or 1
        cells = "".join(f'<td style="background: rgba(9, 105, 218, {0.55 * v / total:.2f})">{_e(v)}</td>' for v in row)
        out.append(f'<tr><th title="{_e(name)}">{_e(label)}</th>{cells}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


_META_COLUMNS = (("best_val_acc", "best val acc (%)"), ("best_step", "best step"), ("steps", "steps"),
                 ("seconds", "seconds"), ("faults", "faults"), ("budget_hit", "ended by"))


def _section_meta_train(inp: ReportInputs) -> str:
    out = ['<h2 id="meta-train">Meta-training</h2>']
    mt = inp.meta_train
    if not mt:
        out.append('<p class="empty">No meta-training summary yet: metrics/meta_train.json is missing '
                   "(run <code>dvc repro meta_train</code>).</p>")
        return "\n".join(out)
    out.append('<p class="note">Per algorithm: best validation accuracy on held-out source classes and the step '
               "it was reached, steps run, wall time (latest run, from reports/run_facts.json), faults (skipped "
               "steps with non-finite loss/gradients), what ended the run (the step budget, or the optional "
               "wall-clock guard: then the weights depend on the machine's speed), and the learner quality gate.</p>")
    out.append("<table><thead><tr><th>algorithm</th>" + "".join(f"<th>{_e(h)}</th>" for _, h in _META_COLUMNS)
               + "<th>quality gate</th><th>MLflow model</th></tr></thead><tbody>")
    run_facts = (inp.run_facts.get("meta_train") or {}).get("algorithms") or {}
    for algo, r in mt.items():
        if not isinstance(r, dict):
            continue
        # Run-specific facts (seconds, model URI) come from reports/run_facts.json; older
        # metrics files held them themselves.
        r = {**{k: v for k, v in (run_facts.get(algo) or {}).items() if v is not None}, **r}
        cells = []
        for key, _ in _META_COLUMNS:
            v = r.get(key)
            if key == "budget_hit":
                cells.append({"none": "steps", "": "steps", "time": "TIME GUARD"}.get(str(v), str(v)) if v else "–")
            elif key == "best_val_acc":
                cells.append(fmt_pct(v))
            elif isinstance(v, float):
                cells.append(f"{v:.1f}")
            elif isinstance(v, (list, dict)):
                cells.append(str(len(v)))
            else:
                cells.append("–" if v is None else str(v))
        uri = r.get("model_uri") or ""
        out.append(f"<tr><td>{_e(algo)}</td>" + "".join(f"<td>{_e(c)}</td>" for c in cells)
                   + _gate_cell(r.get("quality_gate")) + f"<td><code>{_e(uri)}</code></td></tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _kv_table(data: dict[str, Any]) -> str:
    rows = []
    for k, v in data.items():
        if isinstance(v, (dict, list)):
            cell = f"<pre>{_e(json.dumps(v, indent=2, sort_keys=True, default=str))}</pre>"
        else:
            cell = _e(v)
        rows.append(f"<tr><th>{_e(k)}</th><td style='text-align:left'>{cell}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _section_promotion(inp: ReportInputs) -> str:
    out = ['<h2 id="promotion">Promotion</h2>']
    p = inp.promotion
    if p is None:
        out.append('<p class="empty">No promotion decision yet (reports/promotion.json does not exist).</p>')
    elif isinstance(p, dict):
        out.append('<p class="note">From reports/promotion.json.</p>' + _kv_table(p))
    else:
        out.append(f"<pre>{_e(json.dumps(p, indent=2, default=str))}</pre>")
    return "\n".join(out)


def _section_figures(inp: ReportInputs) -> str:
    out = ['<h2 id="figures">Figures</h2>']
    if not inp.figures:
        out.append('<p class="empty">No figures under plots/ yet.</p>')
        return "\n".join(out)
    group = None
    for rel, data in inp.figures:
        folder = rel.rsplit("/", 1)[0] if "/" in rel else "."
        if folder != group:
            group = folder
            out.append(f"<h3>plots/{_e(folder)}</h3>" if folder != "." else "<h3>plots/</h3>")
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        out.append(f'<figure><img alt="{_e(rel)}" src="{uri}"><figcaption>plots/{_e(rel)}</figcaption></figure>')
    return "\n".join(out)


def render_report(inp: ReportInputs) -> str:
    """The complete HTML page for already-read inputs (no file access: easy to test).

    Args:
        inp: the page's inputs (see `collect_inputs`).

    Returns:
        The HTML document as a string; every value from the inputs is escaped.
    """
    f = inp.facts
    lock = f.dvc_lock_sha256
    facts = [
        ("project", f.project),
        ("git commit", f.git_commit or "not a git repository"),
        ("dvc.lock sha256", lock or "no dvc.lock (nothing reproduced yet)"),
        ("data version (prepared md5)", f.data_version or "not recorded in dvc.lock"),
        ("seed", "" if f.seed is None else f.seed),
        ("generated (UTC)", f.generated_utc),
    ]
    head = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in (
        ("models", "Shipped models"), ("evaluation", "Few-shot evaluation"), ("meta-train", "Meta-training"),
        ("promotion", "Promotion"), ("figures", "Figures")))
    body = "\n".join([_section_models(inp), _section_evaluation(inp), _section_meta_train(inp),
                      _section_promotion(inp), _section_figures(inp)])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>metatransfer report: {_e(f.project)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<header><h1>metatransfer report</h1><dl>{head}</dl></header>\n<nav>{nav}</nav>\n<main>\n{body}\n</main>\n"
        "</body></html>\n"
    )


def build_report(root: Path, params: Params) -> Path:
    """Write `<root>/reports/index.html` from what the pipeline produced so far.

    Args:
        root: the project root.
        params: the loaded params.yaml (targets, episode sets, reference method, data path).

    Returns:
        The path of the written page.

    Raises:
        DataError: an input JSON file exists but cannot be parsed (the message names it).
    """
    root = Path(root)
    page = render_report(collect_inputs(root, params))
    out = root / REPORT_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp file and rename: a browser refreshing the page never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=".index.html.", dir=out.parent)
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- web UIs

UI_KINDS = ("mlflow", "prefect", "report")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class UiServer:
    """A running (or external) UI: where to point a browser, and how to stop it.

    Attributes:
        kind: "mlflow", "prefect" or "report".
        url: the page to open.
        process: the server we started (None when the UI was already running elsewhere or is a file).
        log_path: the server's stdout/stderr.
    """

    kind: str
    url: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server and its children (its whole process group); no-op if we did not start one."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        # Both servers fork workers (uvicorn, job runners): signal the group, not just the parent.
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ui_environment(root: Path, kind: str = "", port: int | None = None) -> dict[str, str]:
    """Environment of a UI server: telemetry off, lean MLflow server, the project's Prefect home.

    Args:
        root: the project root (PREFECT_HOME defaults to <root>/.prefect).
        kind: "prefect" adds the settings that make its UI call this server's API.
        port: the server's port.

    Returns:
        A full environment for subprocess.Popen.
    """
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # Without this the MLflow server starts ~10 job-runner processes (2 GB); the UI needs none.
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.setdefault("PREFECT_HOME", str(Path(root).resolve() / ".prefect"))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if kind == "prefect" and port is not None:
        # The UI asks the server for its API URL, which Prefect derives from these settings
        # (or PREFECT_API_URL), not from `--port`: without them the page calls :4200 and stays empty.
        env.pop("PREFECT_API_URL", None)
        env.update(PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    return env


def ui_command(kind: str, root: Path, port: int) -> tuple[list[str], str, str]:
    """The command line of a UI server, its health URL and the page to open.

    Args:
        kind: "mlflow" or "prefect".
        root: the project root (MLflow store `mlflow.db` and `mlartifacts/` live there).
        port: the TCP port on 127.0.0.1.

    Returns:
        (argv, health_url, ui_url).
    """
    from metatransfer.tracking import tracking_uri

    root = Path(root).resolve()
    base = f"http://127.0.0.1:{port}"
    if kind == "mlflow":
        argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(root),
                "--default-artifact-root", str(root / "mlartifacts"), "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1"]
        return argv, f"{base}/health", f"{base}/"
    if kind == "prefect":
        argv = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        return argv, f"{base}/api/health", f"{base}/"
    raise ValueError(f"ui kind must be one of {UI_KINDS}, got {kind!r}")


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until it answers 200.

    Raises:
        MetatransferError: the process exited, or no answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise MetatransferError(f"the server behind {url} exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise MetatransferError(f"{url} did not answer within {timeout_s:.0f} s")


def open_ui(kind: str, port: int | None = None, root: str | Path = ".", timeout_s: float = 120.0,
            params: Params | None = None, log_dir: str | Path | None = None) -> UiServer:
    """Start (or locate) a UI and return where to open it; the CLI's `ui` and `report` commands.

    - "mlflow": `mlflow server` on the project's store (`<root>/mlflow.db`), unless
      MLFLOW_TRACKING_URI already names an http(s) tracking server: then that URL.
    - "prefect": `prefect server start` with PREFECT_HOME=<root>/.prefect (unless set), unless
      PREFECT_API_URL names a running server: then its UI URL.
    - "report": builds reports/index.html and returns its file:// URL (no server).

    Args:
        kind: "mlflow", "prefect" or "report".
        port: TCP port on 127.0.0.1 (None: a free one).
        root: the project root.
        timeout_s: how long to wait for the server's health endpoint.
        params: params for the report (default: <root>/params.yaml).
        log_dir: where the server's log file goes (default: the system temp folder).

    Returns:
        A `UiServer`; call `.stop()` (or use it as a context manager) to stop a started server.

    Raises:
        MetatransferError: the server did not become healthy (the message points to its log).
    """
    root = Path(root).resolve()
    if kind == "report":
        path = build_report(root, params or load_params(root / "params.yaml"))
        return UiServer("report", path.as_uri())
    if kind not in UI_KINDS:
        raise ValueError(f"ui kind must be one of {UI_KINDS}, got {kind!r}")
    env = ui_environment(root)
    external = env.get("MLFLOW_TRACKING_URI", "") if kind == "mlflow" else env.get("PREFECT_API_URL", "")
    if external.startswith(("http://", "https://")):
        url = external.rstrip("/")
        return UiServer(kind, (url.removesuffix("/api") if kind == "prefect" else url) + "/")
    port = port or free_port()
    argv, health, url = ui_command(kind, root, port)
    env = ui_environment(root, kind, port)
    log_path = Path(log_dir or tempfile.gettempdir()) / f"metatransfer-{kind}-ui-{port}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = UiServer(kind, url, proc, log_path)
    try:
        wait_healthy(health, timeout_s, proc)
    except MetatransferError as exc:
        server.stop()
        tail = log_path.read_text(errors="replace")[-2000:]
        raise MetatransferError(f"{kind} UI: {exc}; its log is {log_path}:\n{tail}") from None
    return server


def run_ui(kind: str, port: int | None = None, root: str | Path = ".", open_browser: bool = False,
           echo: Any = print) -> int:
    """Blocking version of `open_ui` for a command line: print the URL, serve until Ctrl-C.

    Args:
        kind: "mlflow", "prefect" or "report".
        port: TCP port (None: a free one).
        root: the project root.
        open_browser: also open the page in the default browser.
        echo: where the URL line goes (print by default).

    Returns:
        An exit code: 0 after Ctrl-C (or at once for the report / an external server),
        the server's own code if it stopped by itself.
    """
    server = open_ui(kind, port=port, root=root)
    echo(f"{kind}: {server.url}" + ("  (Ctrl-C stops the server)" if server.process else ""))
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    if server.process is None:
        return 0
    try:
        return int(server.process.wait())
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.report [--params params.yaml]`; prints the page's path."""
    parser = argparse.ArgumentParser(prog="python -m metatransfer.report",
                                     description="Write reports/index.html (self-contained HTML report).")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s report %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        path = build_report(Path(args.params).resolve().parent, params)
    except MetatransferError as exc:
        log.error("%s", exc)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
