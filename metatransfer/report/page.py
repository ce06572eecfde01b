"""The HTML page `reports/index.html`: the template filled with the sections, written atomically.

The page is self-contained: CSS inline, figures embedded as base64 data URIs, no
script and no external request, so it opens offline and attaches to an e-mail
or a CI artifact as is. The template (templates/report.html.j2) is rendered
with autoescape: every value from the inputs is escaped.
"""

from __future__ import annotations

import argparse
import logging
from functools import cache
from pathlib import Path

import jinja2

from metatransfer.config import Params, load_params
from metatransfer.errors import MetatransferError
from metatransfer.io import write_text_atomic
from metatransfer.report import sections
from metatransfer.report.inputs import ReportInputs, collect_inputs

log = logging.getLogger(__name__)

REPORT_PATH = Path("reports") / "index.html"
TEMPLATE = "report.html.j2"


@cache
def _environment() -> jinja2.Environment:
    # Autoescape on for every template (not only *.html): the page embeds names from the data.
    return jinja2.Environment(loader=jinja2.PackageLoader("metatransfer.report", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render_report(inp: ReportInputs) -> str:
    """The complete HTML page for already-read inputs (no file access: easy to test).

    Args:
        inp: the page's inputs (see `collect_inputs`).

    Returns:
        The HTML document as a string; every value from the inputs is escaped.
    """
    f = inp.facts
    facts = [
        ("project", f.project),
        ("git commit", f.git_commit or "not a git repository"),
        ("dvc.lock sha256", f.dvc_lock_sha256 or "no dvc.lock (nothing reproduced yet)"),
        ("data version (prepared md5)", f.data_version or "not recorded in dvc.lock"),
        ("seed", "" if f.seed is None else f.seed),
        ("generated (UTC)", f.generated_utc),
    ]
    return _environment().get_template(TEMPLATE).render(
        project=f.project,
        facts=facts,
        reference=inp.reference,
        cards=sections.target_cards(inp),
        episode_tables=sections.episode_tables(inp),
        meta_train=inp.meta_train,
        meta_columns=[h for _, h in sections.META_COLUMNS],
        meta_rows=sections.meta_train_rows(inp),
        promotion=inp.promotion,
        promotion_rows=sections.promotion_rows(inp),
        figures=sections.figures(inp),
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
    # Written atomically: a browser refreshing the page never sees half a file.
    return write_text_atomic(out, page)


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
