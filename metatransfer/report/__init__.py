"""One HTML page a person would rather read than logs (`reports/index.html`), and the web UIs.

    python -m metatransfer.report [--params params.yaml]

Modules: `inputs` reads what the pipeline wrote; `sections` turns it into table
rows (`status`: a target's registry badge; `unlabeled`: the card of a target
clustered without labels); `page` renders the jinja2 template (templates/report.html.j2, autoescaped)
and writes the page; `ui` starts or locates the MLflow and Prefect UIs for the
CLI. The names below are the package's public interface.
"""

from __future__ import annotations

from metatransfer.report.formatting import fmt_acc_ci, fmt_diff, fmt_pct, majority_reference
from metatransfer.report.inputs import (PROMOTION_PATH, ClassCounts, ReportInputs, RunFacts, class_counts,
                                        collect_inputs, read_json, run_facts)
from metatransfer.report.page import REPORT_PATH, build_report, main, render_report
from metatransfer.report.ui import (UI_KINDS, UiServer, free_port, open_ui, run_ui, ui_command, ui_environment,
                                    wait_healthy)

__all__ = [
    "PROMOTION_PATH", "REPORT_PATH", "UI_KINDS", "ClassCounts", "ReportInputs", "RunFacts", "UiServer",
    "build_report", "class_counts", "collect_inputs", "fmt_acc_ci", "fmt_diff", "fmt_pct", "free_port", "main",
    "majority_reference", "open_ui", "read_json", "render_report", "run_facts", "run_ui", "ui_command",
    "ui_environment", "wait_healthy",
]
