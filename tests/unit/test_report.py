"""The HTML report: tables and numbers as formatted, escaping, self-containedness, run facts,
inputs missing or broken; the UI launcher's commands and process handling."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from metatransfer import report
from metatransfer.config import load_params
from metatransfer.errors import DataError, MetatransferError
from metatransfer.report import build_report, fmt_acc_ci, fmt_diff, fmt_pct

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
    assert "retinamnist/test, 5-way" in page  # caption from params.yaml's episode set
    # Shipped model and why
    assert "<tr class=\"shipped\"><td>protonet (shipped)</td><td>55.00</td><td>52.25 ± 4.90</td><td>31.00</td><td>–</td></tr>" in page
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


def test_promotion_rendered_and_escaped(tmp_path: Path) -> None:
    root = _project(tmp_path)
    sel = root / "models" / "target" / "retinamnist" / "selection.json"
    data = json.loads(sel.read_text())
    data["reason"] = "<script>alert('x')</script> & more"
    sel.write_text(json.dumps(data))
    (root / "reports" / "promotion.json").write_text(json.dumps(
        {"decision": "promote", "model": "retinamnist", "checks": {"test_acc_gain": 0.03}}))
    page = _build(root)
    assert "No promotion decision yet" not in page
    assert "<tr><th>decision</th><td style='text-align:left'>promote</td></tr>" in page
    assert "&quot;test_acc_gain&quot;: 0.03" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "<script>" not in page


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


def test_ui_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, health, url = report.ui_command("mlflow", tmp_path, 5123)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1].startswith(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    assert argv[argv.index("--workers") + 1] == "1" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert (health, url) == ("http://127.0.0.1:5123/health", "http://127.0.0.1:5123/")
    argv, health, _ = report.ui_command("prefect", tmp_path, 4321)
    assert argv[1:] == ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4321"]
    assert health == "http://127.0.0.1:4321/api/health"
    with pytest.raises(ValueError, match="ui kind must be one of"):
        report.ui_command("tensorboard", tmp_path, 1)
    env = report.ui_environment(tmp_path)
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false" and env["DO_NOT_TRACK"] == "true"
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")
    env = report.ui_environment(tmp_path, "prefect", 4321)
    assert "PREFECT_API_URL" not in env  # the UI must call the server we start, not another one
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api" and env["PREFECT_SERVER_API_PORT"] == "4321"


def test_open_ui_uses_running_servers_and_builds_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000/")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    ml = report.open_ui("mlflow", root=tmp_path)
    pf = report.open_ui("prefect", root=tmp_path)
    assert (ml.url, ml.process) == ("http://tracking.example:5000/", None)
    assert (pf.url, pf.process) == ("http://127.0.0.1:4200/", None)
    root = _project(tmp_path / "p")
    rep = report.open_ui("report", root=root)
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
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    deadline = time.monotonic() + 5
    while len(_live_in_group(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_live_in_group(proc.pid)) >= 2  # sh (or the exec-ed sleep) and the background sleep
    report.UiServer("mlflow", "http://127.0.0.1:1/", proc).stop()
    assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _live_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _live_in_group(proc.pid) == []  # the background child went with its group


def test_wait_healthy_reports_a_dead_server() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(MetatransferError, match="exited with code 3 before it was healthy"):
        report.wait_healthy(f"http://127.0.0.1:{report.free_port()}/health", 5, proc)
    with pytest.raises(MetatransferError, match="did not answer within 1 s"):
        report.wait_healthy(f"http://127.0.0.1:{report.free_port()}/health", 1)


def test_run_ui_prints_report_url(tmp_path: Path) -> None:
    root = _project(tmp_path)
    lines: list[str] = []
    assert report.run_ui("report", root=root, echo=lines.append) == 0
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
    assert '<th class="shipped">protonet (shipped)</th><th>scratch</th>' in recall
    assert ('<tr><td title="retinamnist/normal, benign &lt;b&gt;">normal, benign &lt;b&gt;</td><td>4</td>'
            '<td class="shipped">75.0</td><td class="low">20.0</td></tr>') in recall
    assert '<td>33.3</td>' in recall  # above chance (1/4): not marked
    # the shipped model's confusion matrix with class names on both axes
    confusion = card[card.index('id="confusion-retinamnist"'):]
    assert "Confusion matrix of protonet (shipped)" in confusion
    assert confusion.count(">normal, benign &lt;b&gt;</th>") == 2  # column header and row header
    assert '<tr><th title="retinamnist/1">1</th><td style="background: rgba(9, 105, 218, 0.07)">1</td>' in confusion
    # the methods table names each method's weakest class
    assert '<td title="retinamnist/2">2: 66.7</td>' in card and ">normal, benign &lt;b&gt;: 20.0</td>" in card


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
