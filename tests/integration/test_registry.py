"""Model registry: registration by `finetune`, the statistical promotion gate, rollback.

The gate is exercised with cheap, deterministic challengers built by the
library on a copy of the `dvc_project` fixture (with its own, fresh MLflow
store): a "worse" model (one training step from scratch), a "good" one (the
prototype classifier on a random backbone, 0 steps) and a "better" one (30
steps on 20 images per class); the baseline a first champion must beat is a
one-step model written where `finetune` keeps the baseline method's model.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metatransfer import registry
from metatransfer.cli import main as cli
from metatransfer.evaluation.stats import paired_difference

TARGET = "breastmnist"
NAME = registry.model_name(TARGET)
SETTINGS = registry.GateSettings(margin=0.01, confidence=0.95, n_folds=20, baseline="scratch", seed=0)


# --------------------------------------------------------------------------- the gate's pure parts (fast)
def test_test_folds_are_disjoint_cover_the_split_and_are_seeded() -> None:
    eps = registry.test_folds(156, 20, seed=0)
    allidx = np.concatenate(eps)
    assert len(eps) == 20 and sorted(allidx.tolist()) == list(range(156))  # every image exactly once
    assert {len(e) for e in eps} == {7, 8}
    again = registry.test_folds(156, 20, seed=0)
    assert registry.folds_digest(eps) == registry.folds_digest(again)
    assert registry.folds_digest(eps) != registry.folds_digest(registry.test_folds(156, 20, seed=1))
    with pytest.raises(registry.RegistryError, match=r"promote\.n_folds: must be in \[2, 5\]"):
        registry.test_folds(5, 6, seed=0)


def test_fold_accuracies_average_per_image_correctness() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0])
    pred = np.array([0, 1, 0, 0, 0, 0])
    eps = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    assert registry.fold_accuracies(pred, labels, eps).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_decide_needs_margin_and_an_interval_above_zero() -> None:
    ref = np.linspace(0.5, 0.7, 10)
    same = registry.decide(ref, ref, 0.0, 0.95)
    assert not same.promote and same.gain.mean == 0 and "does not exclude 0" in same.reason
    up = ref + 0.05 + np.tile([0.0, 0.01], 5)  # consistently better: +0.05..0.06
    d = registry.decide(up, ref, 0.01, 0.95)
    assert d.promote and d.gain.low > 0 and d.gain.mean == pytest.approx(0.055)
    small = registry.decide(up, ref, 0.10, 0.95)  # significant but below the margin
    assert not small.promote and "below the margin 0.1000" in small.reason
    noisy = registry.decide(ref + np.tile([0.3, -0.25], 5), ref, 0.01, 0.95)  # mean +0.025, CI spans 0
    assert not noisy.promote and noisy.gain.mean >= 0.01 and noisy.gain.low < 0
    worse = registry.decide(ref - 0.05, ref, 0.0, 0.95)
    assert not worse.promote and worse.gain.mean < 0


def test_gate_settings_refuse_bad_values() -> None:
    with pytest.raises(registry.RegistryError, match=r"promote.confidence: must be in \(0, 1\), found 1.5"):
        registry.gate_settings(confidence=1.5)
    with pytest.raises(registry.RegistryError, match=r"promote.margin: must be >= 0 \(a minimum gain\), found -0.1"):
        registry.gate_settings(margin=-0.1)
    assert registry.gate_settings(None, margin=None, n_folds=10).n_folds == 10  # None = unset flag


def test_gate_settings_come_from_the_params_file_then_the_flags(tmp_path: Path, project_root: Path) -> None:
    """params.yaml's `promote` section and `seed`, loaded by the real config loader, then CLI flags on top."""
    from metatransfer.config import load_params

    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["seed"] = 3
    raw["promote"].update(margin=0.02, confidence=0.9, n_folds=10, baseline="pretrain")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    assert registry.gate_settings(params) == registry.GateSettings(
        margin=0.02, confidence=0.9, n_folds=10, baseline="pretrain", seed=3)
    assert registry.gate_settings(params, n_folds=12, margin=None) == registry.GateSettings(
        margin=0.02, confidence=0.9, n_folds=12, baseline="pretrain", seed=3)
    # A params file without a `promote` section: the code defaults, with the file's seed.
    del raw["promote"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert registry.gate_settings(load_params(tmp_path / "params.yaml")) == registry.GateSettings(seed=3)


def test_promote_task_retries_registry_io_only() -> None:
    from prefect.states import Failed

    from tasks.registry import _registry_io_failed

    assert _registry_io_failed(None, None, Failed(data=OSError("database is locked"))) is True
    assert _registry_io_failed(None, None, Failed(data=registry.RegistryError("no challenger"))) is False


# --------------------------------------------------------------------------- registration by finetune
def test_challenger_moves_only_when_its_run_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`finetune` registers versions during its run but moves `challenger` as the run's last
    step: a run that fails (before or while moving it) leaves the alias where it was."""
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    tracking.configure(tmp_path)
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    client.create_registered_model("m")
    client.set_registered_model_alias("m", "challenger", client.create_model_version("m", "file:///v1").version)

    def challenger() -> str:
        return str(client.get_model_version_by_alias("m", "challenger").version)

    with pytest.raises(RuntimeError, match="evaluation died"), tracking.stage_run("finetune", tmp_path) as failed:
        assert registry.register_version(client, "file:///v2", "m", {}, "v2") == "2"
        assert challenger() == "1"  # registered, not yet challenger
        raise RuntimeError("evaluation died")
    assert challenger() == "1" and client.get_run(failed.info.run_id).info.status == "FAILED"

    with pytest.raises(OSError, match="registry down"), tracking.stage_run("finetune", tmp_path) as half:
        registry.register_version(client, "file:///v3", "m", {}, "v3")
        tracking.at_run_end(lambda: (_ for _ in ()).throw(OSError("registry down")))  # after the move
    assert challenger() == "1"  # the move it made was undone
    assert tracking.registry_changes(client.get_run(half.info.run_id).data.tags)[0]["to"] == "3"

    with tracking.stage_run("finetune", tmp_path) as done:
        registry.register_version(client, "file:///v4", "m", {}, "v4")
        assert challenger() == "1"
    assert challenger() == "4" and client.get_run(done.info.run_id).info.status == "FINISHED"
    assert tracking.registry_changes(client.get_run(done.info.run_id).data.tags) == [
        {"name": "m", "alias": "challenger", "from": "1", "to": "4"}]


@pytest.mark.slow
def test_finetune_registers_challengers_with_provenance(dvc_project: Path, tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{dvc_project / 'mlflow.db'}")
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    params_sha = hashlib.sha256((dvc_project / "params.yaml").read_bytes()).hexdigest()
    # Registered versions are run-specific: reports/run_facts.json, not selection.json (a DVC output).
    facts = json.loads((dvc_project / "reports" / "run_facts.json").read_text())["finetune"]
    for target in yaml.safe_load((dvc_project / "params.yaml").read_text())["finetune"]["targets"]:
        sel = json.loads((dvc_project / "models" / "target" / target / "selection.json").read_text())
        assert "registered" not in sel and "model_uri" not in sel
        mv = client.get_model_version_by_alias(registry.model_name(target), "challenger")
        assert facts[target]["registered"]["model"] == {"name": registry.model_name(target), "version": str(mv.version)}
        assert mv.tags["data_version"] == data_md5
        assert mv.tags["params_sha256"] == params_sha
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", mv.tags["git_commit"])
        assert mv.tags["method"] == sel["chosen"]
        table = json.loads(mv.tags["validation_table"])
        assert {m: v["val_acc"] for m, v in table.items()} == {m: v["val_acc"] for m, v in sel["methods"].items()}
        assert f"| {sel['chosen']} |" in mv.description and "val acc" in mv.description
        lv = client.get_model_version_by_alias(registry.learner_name(target), "challenger")
        assert mv.tags[registry.LEARNER_TAG] == str(lv.version) == facts[target]["registered"]["learner"]["version"]
        assert lv.tags["method"] == sel["chosen"] and lv.tags["data_version"] == data_md5
    # The registered challenger is the shipped model: same predictions as the library's.
    from metatransfer.data.store import load_split
    from metatransfer.training.finetune import load_target_model

    mlflow.set_tracking_uri(f"sqlite:///{dvc_project / 'mlflow.db'}")
    test = load_split(dvc_project / "data" / "prepared", TARGET, "test")
    x = test.images[:40].astype(np.float32) / 255
    sel = json.loads((dvc_project / "models" / "target" / TARGET / "selection.json").read_text())
    # dst_path: loading from the shared fixture's store must not write into its artifact folder.
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger", dst_path=str(tmp_path)).predict(x)
    with torch.no_grad():
        lib = load_target_model(dvc_project / "models" / "target" / TARGET / sel["chosen"])(torch.from_numpy(x)).argmax(1)
    assert served["prediction"].tolist() == lib.tolist()


# --------------------------------------------------------------------------- the promotion chain
def _copy_project(src: Path, dest: Path) -> Path:
    """A mutable copy of a project with a fresh MLflow store (the source stays untouched)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {"mlflow.db", "mlflow.db.lock", "mlartifacts", ".prefect"} & set(names)
        if Path(folder).name == ".dvc" and "cache" in names:
            skip.add("cache")
        return skip

    shutil.copytree(src, dest, ignore=ignore)
    return dest


def _train(project: Path, seed: int, shots: int, steps: int):
    """A scratch-initialised target model trained `steps` Adam steps on `shots` images per class (seeded)."""
    from metatransfer.algorithms import build_algorithm
    from metatransfer.config import load_params
    from metatransfer.data.store import load_split
    from metatransfer.stages.finetune import per_class_subset
    from metatransfer.learners import backbone_spec
    from metatransfer.training.finetune import FinetuneSettings, finetune

    params = load_params(project / "params.yaml")
    train = load_split(project / params.data.prepared_dir, TARGET, "train")
    x, y = per_class_subset(train, shots, seed)
    torch.manual_seed(seed)
    learner = build_algorithm("scratch", backbone_spec(params), 2, None)
    settings = FinetuneSettings(steps, 1e-3, 50, "all", 10_000, 0)
    return finetune(learner, x, y, None, None, list(train.class_names), settings, seed).model


def _register(project: Path, model, tag: str, with_learner: bool) -> dict:
    """Save, log (in an MLflow run) and register a candidate exactly as `finetune` does."""
    import mlflow

    from metatransfer import tracking
    from metatransfer.config import load_params
    from metatransfer.training.finetune import save_target_model

    folder = project / "candidates" / tag
    save_target_model(model, folder)
    tracking.configure(project)
    with mlflow.start_run(run_name=f"candidate/{tag}") as run:
        prep = load_params(project / "params.yaml").prepare
        uri = tracking.log_target_model(folder, prep.channels, prep.image_size, 2, name=f"target_{tag}")
        learner_uri = registry.log_learner_for("protonet", load_params(project / "params.yaml"), project, TARGET) if with_learner else None
    # Not the baseline method's name: a baseline challenger with no champion is judged against the
    # next-best method instead (test_promote_baseline.py); these candidates must meet the baseline.
    entry = {"chosen": "candidate", "reason": f"test candidate {tag}",
             "methods": {"candidate": {"val_acc": 0.5, "best_step": 0}}}
    return registry.register_finetune_result(project, TARGET, entry, uri, learner_uri, run.info.run_id,
                                             class_names=list(model.class_names))


def _served_predictions(uri: str, x: np.ndarray):
    import mlflow

    return mlflow.pyfunc.load_model(uri).predict(x)


@pytest.fixture(scope="module")
def chain(dvc_project: Path, tmp_path_factory: pytest.TempPathFactory):
    """worse → good → worse again → better, each registered as challenger and gated."""
    from metatransfer import tracking
    from metatransfer.data.store import load_split
    from metatransfer.training.finetune import accuracy, save_target_model

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
        project = _copy_project(dvc_project, tmp_path_factory.mktemp("registry") / "project")
        test = load_split(project / "data" / "prepared", TARGET, "test")
        x = test.images.astype(np.float32) / 255
        tx, ty = torch.from_numpy(x), torch.from_numpy(test.labels.astype(np.int64))
        models = {"baseline": _train(project, 0, 5, 3), "worse": _train(project, 1, 5, 1),
                  "good": _train(project, 0, 5, 0), "better": _train(project, 0, 20, 30)}
        accs = {k: accuracy(m, tx, ty) for k, m in models.items()}
        # Preconditions of the scenario (deterministic on CPU); if the training code
        # changes these, choose other recipes above.
        assert accs["worse"] < accs["baseline"] < accs["good"] < accs["better"], accs
        baseline_dir = project / "models" / "target" / TARGET / "scratch"
        shutil.rmtree(baseline_dir)
        save_target_model(models["baseline"], baseline_dir)

        steps = {}
        reg = _register(project, models["worse"], "worse", with_learner=False)
        steps["worse_first"] = (reg, registry.promote(project, TARGET, SETTINGS))
        reg = _register(project, models["good"], "good", with_learner=True)
        steps["good"] = (reg, registry.promote(project, TARGET, SETTINGS))
        good_out = _served_predictions(f"models:/{NAME}@champion", x)
        reg = _register(project, models["worse"], "worse_again", with_learner=False)
        steps["worse_again"] = (reg, registry.promote(project, TARGET, SETTINGS))
        reg = _register(project, models["better"], "better", with_learner=True)
        parent = tracking.begin_pipeline_run(project)  # as the Prefect flow does
        steps["better"] = (reg, registry.promote(project, TARGET, SETTINGS, parent_run_id=parent))
        tracking.end_pipeline_run(parent, project)
        steps["repeat"] = (reg, registry.promote(project, TARGET, SETTINGS))  # nothing new to judge
        yield {"project": project, "x": x, "labels": test.labels, "steps": steps, "accs": accs,
               "good_out": good_out, "models": models, "parent": parent}


@pytest.mark.slow
def test_worse_challengers_never_become_champion_and_better_ones_do(chain) -> None:
    from mlflow.tracking import MlflowClient

    s = chain["steps"]
    version = {k: s[k][0]["model"]["version"] for k in s}
    assert [version[k] for k in ("worse_first", "good", "worse_again", "better", "repeat")] == ["1", "2", "3", "4", "4"]
    first = s["worse_first"][1]
    assert (first.decision, first.champion_after, first.reference) == ("rejected", None, "baseline scratch")
    good = s["good"][1]
    assert (good.decision, good.champion_before, good.champion_after) == ("promoted", None, "2")
    assert good.reference == "baseline scratch" and good.gain_ci_low > 0 and good.gain_mean >= SETTINGS.margin
    again = s["worse_again"][1]
    assert (again.decision, again.champion_after, again.reference) == ("rejected", "2", "champion v2")
    assert again.gain_mean < 0
    better = s["better"][1]
    assert (better.decision, better.champion_before, better.champion_after) == ("promoted", "2", "4")
    assert better.gain_ci_low > 0
    repeat = s["repeat"][1]
    assert (repeat.decision, repeat.champion_after, repeat.run_id) == ("already_champion", "4", "")
    client = MlflowClient(f"sqlite:///{chain['project'] / 'mlflow.db'}")
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "2,4"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    # The learner registered with the champion follows it.
    learner_champion = str(client.get_model_version_by_alias(registry.learner_name(TARGET), "champion").version)
    assert learner_champion == s["better"][0]["learner"]["version"]
    assert client.get_model_version(NAME, "3").tags["gate_decision"] == "rejected"
    # The gate's mean accuracies are the per-image test accuracies (the test folds partition the split).
    assert better.evidence["challenger"]["acc"] == pytest.approx(chain["accs"]["better"], abs=0.02)


@pytest.mark.slow
def test_promote_runs_log_the_decision_and_reproducible_evidence(chain) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{chain['project'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("metatransfer")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'promote'", max_results=100)
    by_challenger = {r.data.tags["challenger_version"]: r for r in runs}
    assert sorted(by_challenger) == ["1", "2", "3", "4"]
    run = by_challenger["4"]
    assert run.data.tags["decision"] == "promoted" and run.data.tags["champion_version"] == "4"
    assert run.data.tags["previous_champion_version"] == "2" and run.data.tags["reference"] == "champion v2"
    assert run.data.tags["mlflow.parentRunId"] == chain["parent"]  # a child of the pipeline run
    evidence = json.loads(Path(client.download_artifacts(run.info.run_id, f"promote/{TARGET}.json")).read_text())
    # Recompute the interval from the logged per-fold accuracies: it must match the logged metrics.
    d = paired_difference(evidence["per_fold"]["challenger"], evidence["per_fold"]["reference"], 0.95)
    assert run.data.metrics["promote/gain_mean"] == pytest.approx(d.mean)
    assert run.data.metrics["promote/gain_ci_low"] == pytest.approx(d.low)
    assert run.data.metrics["promote/gain_ci_high"] == pytest.approx(d.high)
    # The test folds are exactly the seeded partition of the test split.
    expected = registry.test_folds(len(chain["labels"]), SETTINGS.n_folds, SETTINGS.seed)
    assert evidence["folds"]["indices"] == [e.tolist() for e in expected]
    assert evidence["folds"]["sha256"] == registry.folds_digest(expected)
    assert by_challenger["1"].data.tags["decision"] == "rejected"
    assert by_challenger["1"].data.tags["reference"] == "baseline scratch"


@pytest.mark.slow
def test_rollback_restores_the_previous_champion_exactly(chain, capsys: pytest.CaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    project, x = chain["project"], chain["x"]
    before = _served_predictions(f"models:/{NAME}@champion", x)
    assert cli(["--root", str(project), "rollback", "--target", TARGET]) == 0
    assert "rolled back from v4 to v2" in capsys.readouterr().out
    after = _served_predictions(f"models:/{NAME}@champion", x)
    # Exactly the previous champion's output (every column, bit for bit), not the rolled-back one's.
    assert after.equals(chain["good_out"])
    assert not after["prediction"].equals(before["prediction"])
    with torch.no_grad():
        lib = torch.softmax(chain["models"]["good"](torch.from_numpy(x)), 1).numpy()
    assert np.array_equal(after["prediction"].to_numpy(), lib.argmax(1))
    record = json.loads((project / "reports" / "promotion.json").read_text())[TARGET]  # shown by the HTML report
    assert (record["decision"], record["champion_before"], record["champion_after"]) == ("rolled_back", "4", "2")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_registered_model(NAME).tags[registry.HISTORY_TAG] == "2"
    assert client.get_model_version(NAME, "4").tags["rolled_back"] == "true"
    learner_champion = str(client.get_model_version_by_alias(registry.learner_name(TARGET), "champion").version)
    assert learner_champion == chain["steps"]["good"][0]["learner"]["version"]
    # The rolled-back version lost `challenger`, so the next promote cannot re-promote it.
    assert cli(["--root", str(project), "promote", "--target", TARGET]) == 1
    assert "no version with alias 'challenger'" in capsys.readouterr().err
    # v2 is the first champion: nothing earlier to roll back to.
    assert cli(["--root", str(project), "rollback", "--target", TARGET]) == 1
    assert "first champion" in capsys.readouterr().err
    assert cli(["--root", str(project), "status", "--target", TARGET, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)[TARGET][NAME]
    assert status["aliases"] == {"champion": "2"} and status["history"] == ["2"]
    assert [v["version"] for v in status["versions"] if v["rolled_back"]] == ["4"]


def test_cli_usage_errors_exit_2_and_help_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["rollback"]) == 2  # --target missing
    assert "required: --target" in capsys.readouterr().err
    assert cli(["frobnicate"]) == 2
    for command in ("promote", "rollback", "status", "serve"):
        assert cli([command, "--help"]) == 0
        assert f"usage: metatransfer {command}" in capsys.readouterr().out
    assert cli(["--root", str(tmp_path), "status"]) == 1
    assert "params.yaml not found" in capsys.readouterr().err
