"""Look at the pages as a person would: headless Chromium renders the HTML report,
the offline `dvc plots show` page, the MLflow UI and the Prefect UI of a tiny
project after `dvc repro`; the tests read the rendered DOM and check the
screenshots are not blank.

Needs the Debian package `chromium` (`.ci/run` installs it). Every server a test
starts is stopped in a `finally` (its whole process group)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from metatransfer.config import load_params
from metatransfer.report import build_report, fmt_acc_ci, open_ui
from tests.integration.conftest import ROOT, project_env

pytestmark = pytest.mark.slow

# Flags from STACK_NOTES: without the background-networking ones Chromium keeps
# trying the (closed) network; a fresh profile per call keeps runs independent.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900",
]
# React/Vue apps (MLflow, Prefect) render after their API calls. Chromium's virtual time
# does not wait for slow real responses on a loaded machine, so a DOM dump that lacks
# what the page must show is retried with a longer budget (10, 20, 40 s) before failing.
DOM_BUDGETS_MS = (10000, 20000, 40000)
# The screenshot waits for the compositor, else it catches the fade-in animation.
SHOT_FLAGS = ["--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium not found: install the Debian package `chromium` "
                    "(apt-get install -y chromium); .ci/run installs it before the tests")
    return path


def _chromium(chromium: str, url: str, out_dir: Path, name: str, flags: list[str]) -> str:
    profile = out_dir / f"{name}-profile"  # fresh each time: no state carried between calls
    shutil.rmtree(profile, ignore_errors=True)
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                          capture_output=True, text=True, timeout=180, cwd=out_dir)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium failed on {url}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def browse(chromium: str, url: str, out_dir: Path, name: str, expect: tuple[str, ...] = ()) -> tuple[str, Path]:
    """Render `url`: returns (the DOM after scripts ran, a 1400x900 screenshot PNG).

    `expect`: strings the page must show once rendered; the DOM is dumped again with a
    longer virtual-time budget while one is missing (the caller asserts on the result).
    """
    for budget in DOM_BUDGETS_MS:
        dom = _chromium(chromium, url, out_dir, name, [f"--virtual-time-budget={budget}", "--dump-dom"])
        if all(e in dom for e in expect):
            break
    (out_dir / f"{name}.html").write_text(dom)  # kept next to the screenshot for debugging
    png = out_dir / f"{name}.png"
    _chromium(chromium, url, out_dir, name, [*SHOT_FLAGS, f"--screenshot={png}"])
    return dom, png


def assert_not_blank(png: Path) -> None:
    """A real page: varied pixels, and not (almost) all one colour."""
    assert png.is_file(), f"no screenshot at {png}"
    with Image.open(png) as im:
        assert im.size == (1400, 900), im.size
        px = np.asarray(im.convert("L"), dtype=np.float64)
    most = np.bincount(px.astype(np.int64).ravel(), minlength=256).max() / px.size
    assert px.std() > 8.0 and most < 0.97, f"{png} looks blank (std {px.std():.1f}, {100 * most:.1f}% one grey level)"


def page_text(dom: str) -> str:
    """The visible text of a DOM dump: scripts/styles dropped, tags removed, spaces collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def copy_project(src: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """Copy a project, leaving out top-level entries (e.g. data/) a test does not need."""
    top = src.resolve()
    shutil.copytree(src, dest, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder).resolve() == top and n in leave_out])
    return dest


def get_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def test_html_report_renders(dvc_project: Path, tmp_path: Path, chromium: str) -> None:
    # The report is built in a copy: the session's dvc_project stays untouched.
    proj = copy_project(dvc_project, tmp_path / "proj", ("data", "mlartifacts", "mlflow.db", "mlflow.db-wal", "mlflow.db-shm"))
    (proj / "data").symlink_to(dvc_project / "data")  # read only: the per-class counts come from the prepared store
    params = load_params(proj / "params.yaml")
    page = build_report(proj, params)
    dom, png = browse(chromium, page.as_uri(), tmp_path, "report")
    ev = json.loads((proj / "metrics" / "evaluate.json").read_text())
    set_name, by_method = next(iter(ev["episodes"].items()))
    for method in by_method:
        assert f"<td>{method}" in dom, f"method {method} missing from the rendered episode table"
    method, by_shot = next(iter(by_method.items()))
    shot, row = next(iter(by_shot.items()))
    number = fmt_acc_ci(row["acc_mean"], row["acc_ci95"])
    assert number in dom, f"{set_name}/{method}/{shot}-shot accuracy {number} missing from the page"
    promotion = json.loads(p.read_text()) if (p := proj / "reports" / "promotion.json").is_file() else {}
    for target, t in ev["target_models"].items():
        # `dvc repro` does not promote: the chosen model is selected, shipped only once promoted
        shipped = (promotion.get(target) or {}).get("decision") in ("promoted", "already_champion")
        assert f'id="target-{target}"' in dom and f"{t['chosen']} ({'shipped' if shipped else 'selected'})" in dom
        assert ("shipped" if shipped else "selected") in page_text(dom[dom.index(f'id="target-{target}"'):])[:200]
        # the majority-class and chance references and the images per class and split of the prepared store
        assert "majority class (always" in dom and f"chance (1/{len(t['class_names'])})" in dom
        manifest = pd.read_parquet(proj / params.data.prepared_dir / target / "manifest.parquet", columns=["split"])
        totals = "".join(f"<td>{n}</td>" for s in ("train", "val", "test") if (n := int((manifest["split"] == s).sum())))
        # then the train images fine-tuning used (selection.json `shots`), when recorded
        shots = json.loads((proj / "models" / "target" / target / "selection.json").read_text()).get("shots")
        if shots:
            totals += f"<td>{sum(shots['per_class'].values())}</td>"
        assert f'<tr class="total"><td>all classes</td>{totals}</tr>' in dom
    assert "No promotion decision yet" in dom or "From reports/promotion.json" in dom
    assert dom.count("data:image/png;base64,") == len(list((proj / "plots").rglob("*.png"))) > 0
    assert_not_blank(png)


def test_dvc_plots_render_offline(dvc_project: Path, tmp_path: Path, chromium: str) -> None:
    template = ROOT / "dvc_plots" / "offline.html"
    # A copy: `dvc plots show` must not touch the shared project.
    proj = copy_project(dvc_project, tmp_path / "proj", ("data", "models", "mlartifacts", "mlflow.db", "mlflow.db-wal"))
    out = tmp_path / "plots_html"
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template), "-o", str(out)],
                          cwd=proj, env=project_env(proj), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    page = (out / "index.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page, "the page still loads scripts from a CDN"
    for lib in ("vega@5", "vega-lite@5", "vega-embed@6"):
        assert f"/* {lib}" in page, f"{lib} is not inlined"
    assert page.count("vegaEmbed('#") >= 1  # DVC's plot divs went into {plot_divs}
    dom, png = browse(chromium, (out / "index.html").as_uri(), tmp_path, "dvc_plots", expect=('class="vega-embed',))
    # vega-embed renders each chart as an SVG/canvas inside a .vega-embed container: only if the
    # inlined libraries loaded and ran without the network.
    assert dom.count('class="vega-embed') == page.count("vegaEmbed('#"), "some vega charts did not render"
    assert "<canvas" in dom or "<svg" in dom
    assert_not_blank(png)


def test_mlflow_ui_shows_stage_runs(dvc_project: Path, tmp_path: Path, chromium: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    server = open_ui("mlflow", root=dvc_project, timeout_s=120, log_dir=tmp_path)
    try:
        api = server.url + "api/2.0/mlflow"
        exp = get_json(f"{api}/experiments/get-by-name?experiment_name=metatransfer")["experiment"]
        runs = get_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"meta_train", "finetune", "evaluate"} <= names, names
        # The runs page (the experiment's default page in MLflow 3 is the GenAI overview).
        dom, png = browse(chromium, f"{server.url}#/experiments/{exp['experiment_id']}/runs", tmp_path, "mlflow_runs",
                          expect=(">meta_train<", ">finetune<", ">evaluate<"))
        assert "Runs - Experiment" in dom, "MLflow runs page did not render (title missing)"
        for name in ("meta_train", "finetune", "evaluate"):
            assert f">{name}<" in dom, f"run {name} not visible in the rendered runs table"
        assert f" {len(runs)} matching runs" in page_text(dom)  # the table counts what the REST API lists
        assert_not_blank(png)
        models = get_json(f"{api}/registered-models/search?max_results=100").get("registered_models", [])
        if models:  # registration comes with the promotion step
            dom, png = browse(chromium, f"{server.url}#/models", tmp_path, "mlflow_models",
                              expect=tuple(m["name"] for m in models))
            for m in models:
                assert m["name"] in dom, f"registered model {m['name']} missing from the models page"
            assert_not_blank(png)
    finally:
        server.stop()


def test_prefect_ui_shows_flow_run(dvc_project: Path, tmp_path: Path, chromium: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect_home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # The flow runs in a copy whose stages are up to date (DVC skips them): a quick, real run.
    proj = copy_project(dvc_project, tmp_path / "proj")
    server = open_ui("prefect", root=proj, timeout_s=120, log_dir=tmp_path)
    try:
        env = project_env(proj)
        env.update(PREFECT_API_URL=server.url + "api", PREFECT_HOME=str(tmp_path / "prefect_home"))
        proc = subprocess.run([sys.executable, "-m", "flows.data"], cwd=proj, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs = get_json(server.url + "api/flow_runs/filter", {"flows": {"name": {"any_": ["data"]}}})
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED", runs
        run_name = runs[0]["name"]
        dom, png = browse(chromium, server.url + "runs", tmp_path, "prefect_runs", expect=(run_name, ">data<"))
        assert run_name in dom, f"flow run {run_name} missing from the rendered /runs page"
        assert ">data<" in dom, "flow name `data` missing from the rendered /runs page"
        assert_not_blank(png)
    finally:
        server.stop()
