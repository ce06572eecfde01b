"""The HTML report: tables and numbers as formatted, escaping, self-containedness, run facts,
inputs missing or broken, the badge and table of the promotion decision, majority-class and
chance references, per-class counts; the UI launcher's commands and process handling."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from metatransfer import report
from metatransfer.config import load_params
from metatransfer.errors import DataError, MetatransferError
from metatransfer.report import build_report, fmt_acc_ci, fmt_diff, fmt_pct, majority_reference, ui
from metatransfer.report.sections import target_status

PROJECT_ROOT = Path(__file__).resolve().parents[2]

EVALUATE = {
    "episodes": {
        "retinamnist_test": {
            "baselinepp": {"1": {"acc_mean": 0.30125, "acc_ci95": 0.0151, "episodes": 200},
                           "5": {"acc_mean": 0.41, "acc_ci95": 0.012, "episodes": 200}},
            "protonet": {"1": {"acc_mean": 0.33333, "acc_ci95": 0.0149, "episodes": 200, "diff_vs_reference": 0.0321,
                               "diff_ci95": 0.011, "diff_significant": True},
                         "5": {"acc_mean": 0.40, "acc_ci95": 0.013, "episodes": 200, "diff_vs_reference": -0.01,
                               "diff_ci95": 0.02, "diff_significant": False}},
        }
    },
    "target_models": {
        "retinamnist": {"chosen": "protonet", "reason": "highest target validation accuracy",
                        "methods": {"protonet": {"test_acc": 0.5225, "test_acc_ci95": 0.049, "balanced_acc": 0.31,
                                                 "val_acc": 0.55, "images": 400},
                                    "scratch": {"test_acc": 0.44, "test_acc_ci95": 0.048, "balanced_acc": 0.25,
                                                "val_acc": 0.45, "images": 400}}},
    },
}
GATE_OK = {"passed": True, "test": "episode_ci", "reason": "meta-val accuracy 0.6489, 95 % CI low 0.6300, above chance"}
META_TRAIN = {"protonet": {"best_val_acc": 0.6489, "best_step": 400, "steps": 500, "faults": 0, "budget_hit": "none",
                           "quality_gate": GATE_OK}}
# Run-specific facts live outside the DVC outputs (reports/run_facts.json, written by the stages).
RUN_FACTS = {"meta_train": {"run_id": "r1", "algorithms": {"protonet": {"model_uri": "models:/m-1", "seconds": 44.37,
                                                                         "budget_hit": "none"}}},
             "finetune": {"run_id": "r2", "retinamnist": {"model_uri": "models:/m-target", "refused": None,
                                                           "registered": {"model": {"name": "metatransfer-retinamnist",
                                                                                    "version": "3"}}}}}


def _params_file(root: Path) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["finetune"]["targets"] = ["retinamnist"]
    # The page's inputs below name these methods; keep the test independent of the default scenario's choice.
    raw["evaluate"]["reference"] = "baselinepp"
    raw["evaluate"]["methods"] = ["protonet", "baselinepp"]
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def _project(root: Path) -> Path:
    """A project folder holding what the stages would have written."""
    (root / "metrics").mkdir(parents=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATE))
    (root / "metrics" / "meta_train.json").write_text(json.dumps(META_TRAIN))
    sel = root / "models" / "target" / "retinamnist"
    sel.mkdir(parents=True)
    (sel / "selection.json").write_text(json.dumps({
        "chosen": "protonet", "reason": "highest target validation accuracy (protonet 0.5500, scratch 0.4500)",
        "methods": {"protonet": {"val_acc": 0.55}, "scratch": {"val_acc": 0.45}}}))
    (root / "reports").mkdir()
    (root / "reports" / "run_facts.json").write_text(json.dumps(RUN_FACTS))
    (root / "plots" / "evaluate").mkdir(parents=True)
    (root / "plots" / "evaluate" / "retinamnist_test_shots.png").write_bytes(_png((255, 0, 0)))
    (root / "plots" / "meta_train").mkdir(parents=True)
    (root / "plots" / "meta_train" / "val_curve.png").write_bytes(_png((0, 0, 255)))
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {
        "cmd": "x", "outs": [{"path": "data/prepared", "md5": "0123abcd.dir"}]}}}))
    _params_file(root)
    return root


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "action", "poster")]


def _build(root: Path) -> str:
    return build_report(root, load_params(root / "params.yaml")).read_text()


def test_formatting() -> None:
    assert fmt_pct(0.61234) == "61.23"
    assert fmt_pct(None) == "–"
    assert fmt_acc_ci(0.61234, 0.021) == "61.23 ± 2.10"
    assert fmt_diff(0.0321, 0.011) == "Δ +3.21 ± 1.10"
    assert fmt_diff(-0.01, 0.02) == "Δ -1.00 ± 2.00"


def test_majority_reference() -> None:
    # The blood-cell folder of issue 18: the largest class alone is right 207/351 of the time.
    assert majority_reference([3, 20, 33, 88, 207]) == (4, 207 / 351)
    assert majority_reference([5, 7, 7]) == (1, 7 / 19)  # ties: the first largest class in label order
    assert majority_reference([]) is None and majority_reference([0, 0]) is None


def test_report_tables_and_figures(tmp_path: Path) -> None:
    root = _project(tmp_path)
    page = _build(root)
    assert (root / "reports" / "index.html").is_file()
    # Episode table: every cell as formatted, significance marked, best bolded
    assert "30.12 ± 1.51" in page and "33.33 ± 1.49" in page
    assert '<span class="diff sig-pos">Δ +3.21 ± 1.10 *</span>' in page
    assert '<span class="diff ns">Δ -1.00 ± 2.00</span>' in page
    assert '<td class="best" title="200 episodes"><span class="acc">33.33 ± 1.49</span>' in page
    assert "baselinepp (reference)" in page
    assert "retinamnist/test, 5-way (chance 20.00 %)" in page  # caption from params.yaml's episode set
    # The chosen model and why; no promotion decision yet: selected, not shipped
    assert "<tr class=\"chosen\"><td>protonet (selected)</td><td>55.00</td><td>52.25 ± 4.90</td><td>31.00</td><td>–</td></tr>" in page
    assert '<span class="badge selected">selected</span>' in page
    assert ">shipped<" not in page and "(shipped)" not in page
    assert "not promoted: no promotion decision yet" in page
    assert "Why: highest target validation accuracy (protonet 0.5500, scratch 0.4500)" in page
    assert "<code>models:/m-target</code> registered as metatransfer-retinamnist v3" in page
    # Meta-training summary: seconds and the model URI from run_facts.json, the gate from the metrics
    assert ("<tr><td>protonet</td><td>64.89</td><td>400</td><td>500</td><td>44.4</td><td>0</td><td>steps</td>"
            f'<td title="{GATE_OK["reason"]}">passed</td><td><code>models:/m-1</code></td></tr>') in page
    # Every PNG embedded, none referenced
    for rel in ("evaluate/retinamnist_test_shots.png", "meta_train/val_curve.png"):
        data = (root / "plots" / rel).read_bytes()
        assert "data:image/png;base64," + base64.b64encode(data).decode() in page
        assert f"<figcaption>plots/{rel}</figcaption>" in page
    assert page.index("plots/evaluate") < page.index("plots/meta_train")
    assert "No promotion decision yet" in page


def test_report_shows_refused_models_and_the_time_guard(tmp_path: Path) -> None:
    root = _project(tmp_path)
    refused = {"passed": False, "test": "binomial", "reason": "validation accuracy 0.2000 (10/50) vs chance 0.2000"}
    mt = json.loads((root / "metrics" / "meta_train.json").read_text())
    mt["protonet"].update(budget_hit="time", quality_gate={**refused, "test": "episode_ci"})
    (root / "metrics" / "meta_train.json").write_text(json.dumps(mt))
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    ev["target_models"]["retinamnist"]["methods"]["protonet"]["quality_gate"] = refused
    (root / "metrics" / "evaluate.json").write_text(json.dumps(ev))
    facts = json.loads((root / "reports" / "run_facts.json").read_text())
    facts["finetune"]["retinamnist"] = {"model_uri": None, "refused": refused["reason"], "registered": {"model": None}}
    (root / "reports" / "run_facts.json").write_text(json.dumps(facts))
    page = _build(root)
    assert "<td>TIME GUARD</td>" in page
    assert f'<td class="refused" title="{refused["reason"]}">REFUSED</td>' in page  # both tables
    assert page.count(">REFUSED</td>") == 2
    assert ("Not registered as a challenger: the quality gate refused it "
            "(validation accuracy 0.2000 (10/50) vs chance 0.2000)") in page
    assert "models:/m-target" not in page


def test_report_is_self_contained(tmp_path: Path) -> None:
    page = _build(_project(tmp_path))
    parser = _Refs()
    parser.feed(page)
    assert parser.refs, "the page should have links and images"
    assert all(r.startswith(("data:", "#")) for r in parser.refs), [r[:40] for r in parser.refs]
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page


def test_run_facts_in_header(tmp_path: Path) -> None:
    root = _project(tmp_path)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    page = _build(root)
    lock = hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()
    assert f"<dt>git commit</dt><dd>{sha}</dd>" in page  # reports/ is untracked: not dirty
    assert f"<dt>dvc.lock sha256</dt><dd>{lock}</dd>" in page
    assert "<dt>data version (prepared md5)</dt><dd>0123abcd.dir</dd>" in page
    assert "<dt>seed</dt><dd>0</dd>" in page


GATE_REASON = "mean gain +0.0300 >= margin 0.0100 and paired 95 % CI [+0.0110, +0.0490] excludes 0"
GATE_REASON_HTML = GATE_REASON.replace(">", "&gt;")


def _decision(decision: str = "promoted", challenger: str = "3", reason: str = GATE_REASON, **extra: object) -> dict:
    """One target's record as registry.promote writes it to reports/promotion.json."""
    return {"target": "retinamnist", "name": "metatransfer-retinamnist", "decision": decision, "reason": reason,
            "challenger": challenger, "champion_before": None,
            "champion_after": challenger if decision == "promoted" else None, "reference": "baseline scratch",
            "gain_mean": 0.03, "gain_ci_low": 0.011, "gain_ci_high": 0.049, "run_id": "r9", "confidence": 0.95,
            "margin": 0.01, "n_folds": 200, "time": "2025-01-01T00:00:00Z", **extra}


def _promotion_section(page: str) -> str:
    return page[page.index('id="promotion"'):page.index('id="figures"')]


def test_promotion_rendered_as_a_table(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "reports" / "promotion.json").write_text(json.dumps({"retinamnist": _decision()}))
    page = _build(root)
    section = _promotion_section(page)
    assert "No promotion decision yet" not in page and "From reports/promotion.json" in section
    assert ("<tr><th>target</th><th>challenger</th><th>baseline</th><th>gain ± CI (points)</th><th>decision</th>"
            "<th>reason</th><th>champion now</th></tr>") in section
    assert ('<tr><td>retinamnist</td><td>v3</td><td>baseline scratch</td>'
            '<td title="95 % CI of the gain: [+1.10, +4.90] points">Δ +3.00 ± 1.90</td><td class="good">promoted</td>'
            f'<td class="text">{GATE_REASON_HTML}</td><td>v3</td></tr>') in section
    assert "<pre>" not in section and "{" not in section and "&#34;" not in section  # no JSON dump
    # promoted: the badge and the row say shipped
    assert '<span class="badge shipped">shipped</span>' in page
    assert '<tr class="chosen"><td>protonet (shipped)</td>' in page
    assert f"Promoted: champion v3. {GATE_REASON_HTML}" in page


def test_rejected_promotion_is_not_shipped(tmp_path: Path) -> None:
    root = _project(tmp_path)
    reason = "mean gain +0.0012 is below the margin 0.0100 (paired 95 % CI [-0.0100, +0.0124])"
    (root / "reports" / "promotion.json").write_text(json.dumps({"retinamnist": _decision("rejected", reason=reason)}))
    page = _build(root)
    assert '<span class="badge rejected">rejected</span>' in page
    assert ">shipped<" not in page and "(shipped)" not in page and 'class="badge shipped"' not in page
    assert (f'<p class="status rejected">Promotion rejected: {reason}. There is no champion: nothing is served '
            "for this target.</p>") in page
    assert f'<td class="refused">rejected</td><td class="text">{reason}</td><td>none</td>' in _promotion_section(page)
    assert '<tr class="chosen"><td>protonet (selected)</td>' in page


@pytest.mark.parametrize(("record", "facts", "state", "badge", "says"), [
    (None, {}, "selected", "selected", "no promotion decision yet"),
    ({"decision": "already_champion", "challenger": "3", "champion_after": "3", "reason": "x"}, {}, "shipped",
     "shipped", "champion v3"),
    ({"decision": "rejected", "challenger": "3", "champion_before": "2", "reason": "CI includes 0"}, {}, "rejected",
     "rejected", "Promotion rejected: CI includes 0. The champion stays v2."),
    ({"decision": "rolled_back", "champion_before": "3", "champion_after": "2"}, {}, "rolled-back", "rolled back",
     "from v3 to v2"),
    ({"decision": "no_challenger", "reason": "no version with alias 'challenger'"}, {}, "selected", "selected",
     "Not promoted (no_challenger)"),
    # the decision is about an older version than the one this finetune run registered: not this model's
    ({"decision": "promoted", "challenger": "2", "champion_after": "2"},
     {"registered": {"model": {"name": "m", "version": "3"}}}, "selected", "selected", "concerns v2"),
    # refused by the quality gate: never registered, never shipped, whatever an older record says
    ({"decision": "promoted", "challenger": "2"}, {"refused": "below chance"}, "rejected", "refused", ""),
])
def test_badge_follows_the_decision(record: dict | None, facts: dict, state: str, badge: str, says: str) -> None:
    status = target_status(record, facts)
    assert (status["state"], status["badge"]) == (state, badge)
    assert says in status["text"]


def test_unreadable_promotion_record(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "reports" / "promotion.json").write_text(json.dumps(["promoted"]))
    page = _build(root)
    assert "holds no decision this page can read" in _promotion_section(page)
    assert '<span class="badge selected">selected</span>' in page


def _manifest(root: Path, counts: dict[str, list[int]], names: list[str]) -> None:
    """A prepared store's manifest for retinamnist with `counts[split][label]` images."""
    rows = [{"class": names[label], "label": label, "split": split}
            for split, per_class in counts.items() for label, n in enumerate(per_class) for _ in range(n)]
    folder = root / "data" / "prepared" / "retinamnist"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet")


def test_majority_and_chance_references_and_class_counts(tmp_path: Path) -> None:
    root = _project(tmp_path)
    names = [f"retinamnist/{c}" for c in ("basophil", "eosinophil", "monocyte", "lymphocyte", "neutrophil")]
    _manifest(root, {"train": [5, 10, 15, 20, 25], "val": [1, 2, 3, 4, 5], "test": [3, 20, 33, 88, 207]}, names)
    page = _build(root)
    card = page[page.index('id="target-retinamnist"'):page.index('id="evaluation"')]
    # always answering the largest test class (neutrophil, 207 of 351): 58.97 %; chance 1/5
    assert ('<tr class="reference"><td>majority class (always “neutrophil”)</td><td>–</td><td>58.97</td>'
            "<td>20.00</td><td>–</td></tr>") in card
    assert '<tr class="reference"><td>chance (1/5)</td><td>20.00</td><td>20.00</td><td>20.00</td><td>–</td></tr>' in card
    assert "References on the test split (351 images)" in card and "scores <b>58.97 %</b>" in card
    # images per class and split, from the prepared manifest
    counts = card[card.index('id="counts-retinamnist"'):]
    assert "<tr><th>class</th><th>train</th><th>val</th><th>test</th></tr>" in counts
    assert '<tr><td title="retinamnist/basophil">basophil</td><td>5</td><td>1</td><td>3</td></tr>' in counts
    assert '<tr class="total"><td>all classes</td><td>75</td><td>15</td><td>351</td></tr>' in counts
    params = load_params(root / "params.yaml")
    assert f"trains on at most {params.finetune.shots_per_class} train" in counts


def test_class_names_are_escaped_everywhere(tmp_path: Path) -> None:
    root = _project(tmp_path)
    evil = "retinamnist/<script>alert('x')</script> \"q\" & more"
    names = ["retinamnist/0", evil]
    _manifest(root, {"train": [2, 3], "val": [1, 1], "test": [4, 2]}, names)
    sel = root / "models" / "target" / "retinamnist" / "selection.json"
    data = json.loads(sel.read_text())
    data["reason"] = "<script>alert('x')</script> & more"
    sel.write_text(json.dumps(data))
    (root / "reports" / "promotion.json").write_text(json.dumps({"retinamnist": _decision("rejected", reason=evil)}))
    page = _build(root)
    parser = _Refs()
    parser.feed(page)
    assert "script" not in parser.tags and "<script>" not in page
    short = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &#34;q&#34; &amp; more"
    assert f'<tr><td title="retinamnist/{short}">{short}</td><td>3</td><td>1</td><td>2</td></tr>' in page  # counts
    assert f'<td class="text">retinamnist/{short}</td>' in _promotion_section(page)
    assert "Why: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in page


def test_templates_are_package_data() -> None:
    # A non-editable install ships only the files pyproject.toml names: every template must match.
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["metatransfer.report"]
    package = PROJECT_ROOT / "metatransfer" / "report"
    files = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir()]
    assert "templates/report.html.j2" in files
    assert all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)


def test_missing_inputs_say_what_to_run(tmp_path: Path) -> None:
    _params_file(tmp_path)
    page = _build(tmp_path)
    assert "No evaluation yet" in page and "dvc repro evaluate" in page
    assert "No meta-training summary yet" in page
    assert "No fine-tuned target model yet" in page
    assert "No figures under plots/ yet" in page
    assert "not a git repository" in page and "no dvc.lock" in page


def test_broken_json_names_the_file(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "metrics" / "evaluate.json").write_text('{"episodes": ')
    with pytest.raises(DataError, match=r"metrics/evaluate.json: not valid JSON .*re-run the stage"):
        _build(root)
    assert report.main(["--params", str(root / "params.yaml")]) == 1


def test_main_writes_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(tmp_path)
    assert report.main(["--params", str(root / "params.yaml")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(root / "reports" / "index.html")
    assert "33.33 ± 1.49" in Path(out).read_text()
    assert not list((root / "reports").glob(".index.html.*"))  # temp file renamed away


def test_python_m_entry(tmp_path: Path) -> None:
    root = _project(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "metatransfer.report", "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(root / "reports" / "index.html")


def test_ui_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, health, url = ui.ui_command("mlflow", tmp_path, 5123)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1].startswith(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert argv[argv.index("--workers") + 1] == "1" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert (health, url) == ("http://127.0.0.1:5123/health", "http://127.0.0.1:5123/")
    argv, health, _ = ui.ui_command("prefect", tmp_path, 4321)
    assert argv[1:] == ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4321"]
    assert health == "http://127.0.0.1:4321/api/health"
    with pytest.raises(ValueError, match="ui kind must be one of"):
        ui.ui_command("tensorboard", tmp_path, 1)
    env = ui.ui_environment(tmp_path)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["DO_NOT_TRACK"] == "true"
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
    env = ui.ui_environment(tmp_path, "prefect", 4321)
    assert "PREFECT_API_URL" not in env  # the UI must call the server we start, not another one
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api" and env["PREFECT_SERVER_API_PORT"] == "4321"


def test_open_ui_uses_running_servers_and_builds_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000/")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    ml = ui.open_ui("mlflow", root=tmp_path)
    pf = ui.open_ui("prefect", root=tmp_path)
    assert (ml.url, ml.process) == ("http://tracking.example:5000/", None)
    assert (pf.url, pf.process) == ("http://127.0.0.1:4200/", None)
    root = _project(tmp_path / "p")
    rep = ui.open_ui("report", root=root)
    assert rep.url == (root / "reports" / "index.html").resolve().as_uri()
    assert (root / "reports" / "index.html").is_file()


def _live_in_group(pgid: int) -> list[int]:
    """Pids of the group that are not zombies (PID 1 in a container may not reap orphans)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_stop_kills_the_process_group() -> None:
    # sh prints its background child's pid once it has started it: no sleeping on a guess.
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    exited = os.pidfd_open(child)  # readable once the child has exited (it is not ours to reap)
    try:
        assert sorted(_live_in_group(proc.pid)) == sorted({proc.pid, child})
        ui.UiServer("mlflow", "http://127.0.0.1:1/", proc).stop()
        assert proc.returncode == -signal.SIGTERM
        # the background child went with its group (the timeout only bounds a failing run)
        assert select.select([exited], [], [], 60)[0] == [exited]
        assert _live_in_group(proc.pid) == []
    finally:
        os.close(exited)
        proc.stdout.close()


def test_wait_healthy_reports_a_dead_server() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(MetatransferError, match="exited with code 3 before it was healthy"):
        ui.wait_healthy(f"http://127.0.0.1:{ui.free_port()}/health", 5, proc)
    with pytest.raises(MetatransferError, match="did not answer within 1 s"):
        ui.wait_healthy(f"http://127.0.0.1:{ui.free_port()}/health", 1)


def test_run_ui_prints_report_url(tmp_path: Path) -> None:
    root = _project(tmp_path)
    lines: list[str] = []
    assert ui.run_ui("report", root=root, echo=lines.append) == 0
    assert lines == [f"report: {(root / 'reports' / 'index.html').resolve().as_uri()}"]


def test_target_cards_name_the_classes(tmp_path: Path) -> None:
    root = _project(tmp_path)
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    names = [f"retinamnist/{g}" for g in range(3)] + ["retinamnist/normal, benign <b>"]
    t = ev["target_models"]["retinamnist"]
    t.update(class_names=names, class_counts=[10, 8, 6, 4], confusion=[[7, 2, 1, 0], [1, 6, 1, 0], [0, 2, 4, 0], [0, 0, 1, 3]])
    t["methods"]["protonet"]["per_class_recall"] = dict(zip(names, [0.7, 0.75, 0.6667, 0.75]))
    t["methods"]["scratch"]["per_class_recall"] = dict(zip(names, [0.9, 0.5, 0.3333, 0.2]))  # last: below chance
    (root / "metrics" / "evaluate.json").write_text(json.dumps(ev))
    page = _build(root)
    card = page[page.index('id="target-retinamnist"'):page.index('id="evaluation"')]
    short = '<span class="cls" title="retinamnist/normal, benign &lt;b&gt;">normal, benign &lt;b&gt;</span>'
    assert 'Classes (4, label order): <span class="cls" title="retinamnist/0">0</span>' in card and short in card
    # per-class recall: one row per class, named without the dataset prefix, one column per method
    recall = card[card.index('id="recall-retinamnist"'):card.index('id="confusion-retinamnist"')]
    assert '<th class="chosen">protonet (selected)</th><th>scratch</th>' in recall
    assert ('<tr><td title="retinamnist/normal, benign &lt;b&gt;">normal, benign &lt;b&gt;</td><td>4</td>'
            '<td class="chosen">75.0</td><td class="low">20.0</td></tr>') in recall
    assert '<td>33.3</td>' in recall  # above chance (1/4): not marked
    # the shipped model's confusion matrix with class names on both axes
    confusion = card[card.index('id="confusion-retinamnist"'):]
    assert "Confusion matrix of protonet (selected)" in confusion
    assert confusion.count(">normal, benign &lt;b&gt;</th>") == 2  # column header and row header
    assert '<tr><th title="retinamnist/1">1</th><td style="background: rgba(9, 105, 218, 0.07)">1</td>' in confusion
    # the methods table names each method's weakest class
    assert '<td title="retinamnist/2">2: 66.7</td>' in card and ">normal, benign &lt;b&gt;: 20.0</td>" in card
    # without the prepared store: references and counts from evaluate.json's test counts (10 of 28 in class 0)
    assert ('<tr class="reference"><td>majority class (always “0”)</td><td>–</td><td>35.71</td><td>25.00</td>'
            "<td>–</td><td>–</td></tr>") in card
    counts = card[card.index('id="counts-retinamnist"'):card.index('id="recall-retinamnist"')]
    assert "<tr><th>class</th><th>test</th></tr>" in counts and "not in this folder" in counts
    assert '<tr class="total"><td>all classes</td><td>28</td></tr>' in counts


def test_target_card_takes_class_names_from_the_model_before_evaluate(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "metrics" / "evaluate.json").unlink()
    model = root / "models" / "target" / "retinamnist" / "protonet"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"kind": "target_model", "class_names": ["retinamnist/0", "retinamnist/1"]}))
    page = _build(root)
    assert ('Classes (2, label order): <span class="cls" title="retinamnist/0">0</span>, '
            '<span class="cls" title="retinamnist/1">1</span>') in page
    assert "Test recall per class" not in page  # needs evaluate's numbers


def test_evaluate_markdown_names_the_classes() -> None:
    from metatransfer.stages.evaluate import class_tables

    names = ["breastmnist/malignant", "breastmnist/normal, benign"]
    t = {"chosen": "protonet", "class_names": names, "class_counts": [42, 114], "confusion": [[30, 12], [9, 105]],
         "methods": {"protonet": {"per_class_recall": dict(zip(names, [30 / 42, 105 / 114]))},
                     "scratch": {"per_class_recall": dict(zip(names, [0.5, 0.9]))}}}
    lines = class_tables(t)
    assert "Classes (2, label order): 0 `malignant`, 1 `normal, benign`." in lines
    assert "| class | test images | protonet (shipped) | scratch |" in lines
    assert "| malignant | 42 | 71.43 | 50.00 |" in lines and "| normal, benign | 114 | 92.11 | 90.00 |" in lines
    assert "| true ↓ / predicted → | malignant | normal, benign |" in lines
    assert "| normal, benign | 9 | 105 |" in lines
    assert class_tables({"chosen": "x", "methods": {}}) == []  # evaluate.json written before class names
