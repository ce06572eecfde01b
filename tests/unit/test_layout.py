"""metatransfer.layout: dvc.yaml and the code name the same paths, the data
folders follow `params.data.*`, and `--params sub/params.yaml` puts every
output under `sub/` whatever the working directory."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from metatransfer.config import params_from_mapping
from metatransfer.layout import Layout, episode_path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = re.compile(r"\$\{([^}]+)\}")
CODE_PREFIX = "metatransfer/"
OTHER_DATA = {"raw_dir": "inputs/raw_files", "prepared_dir": "store/prep"}


def default_raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_data(raw: dict[str, Any], **data: str) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["data"].update(data)
    return raw


def lookup(variables: dict[str, Any], dotted: str) -> Any:
    value: Any = variables
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"dvc.yaml: ${{{dotted}}} is not in params.yaml"
        value = value[part]
    return value


def resolve(text: str, variables: dict[str, Any]) -> str:
    """`${a.b}` replaced by its value in `variables`, as DVC interpolates params.yaml (verbatim)."""
    return TEMPLATE.sub(lambda m: str(lookup(variables, m.group(1).strip())), text)


def entry_path(entry: str | dict[str, Any]) -> str:
    """An outs/deps/metrics/plots entry: a path, or {path: options}."""
    return entry if isinstance(entry, str) else next(iter(entry))


def dvc_paths(raw_params: dict[str, Any]) -> dict[str, tuple[set[PurePosixPath], set[PurePosixPath], set[str]]]:
    """Every stage of dvc.yaml resolved with `raw_params`: (outputs incl. metrics and plots, data deps, code deps).

    A `foreach` group is resolved for one entry named NAME with the folder FOLDER.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out: dict[str, tuple[set[PurePosixPath], set[PurePosixPath], set[str]]] = {}
    for name, stage in stages.items():
        variables = raw_params
        if "foreach" in stage:
            stage, name = stage["do"], f"{name}@NAME"
            variables = {**raw_params, "key": "NAME", "item": {"path": "FOLDER"}}
        outs = {PurePosixPath(resolve(entry_path(e), variables))
                for section in ("outs", "metrics", "plots") for e in stage.get(section, [])}
        deps = [resolve(entry_path(e), variables) for e in stage.get("deps", [])]
        code = {d for d in deps if d.startswith(CODE_PREFIX)}
        data = {PurePosixPath(d) for d in deps if d not in code and d not in ("params.yaml", "FOLDER")}
        out[name] = (outs, data, code)
    return out


def expected_outs(layout: Layout) -> dict[str, set[PurePosixPath]]:
    """What the stages write, as metatransfer.layout builds it (relative to the root)."""
    def rel(*paths: Path) -> set[PurePosixPath]:
        return {PurePosixPath(p.relative_to(layout.root).as_posix()) for p in paths}

    per_stage = {s: rel(d, layout.metrics(s), layout.plots(s)) for s, d in
                 (("pretrain", layout.pretrain_dir), ("meta_train", layout.meta_dir), ("finetune", layout.target_dir))}
    return {
        "check_params": rel(layout.params_ok),
        "image_folders@NAME": rel(layout.manifest("NAME")),
        "fetch": rel(layout.raw_dir),
        "prepare": rel(layout.prepared_dir),
        "episodes": rel(layout.episodes_dir),
        **per_stage,
        "evaluate": rel(layout.evaluate_report, layout.metrics("evaluate"), layout.plots("evaluate")),
    }


@pytest.mark.parametrize("data", [{}, OTHER_DATA, {"raw_dir": "./raw/", "prepared_dir": "p"}],
                         ids=["default", "other-folders", "unnormalised"])
def test_dvc_yaml_outputs_and_data_deps_are_the_layout_paths(data: dict[str, str]) -> None:
    raw = with_data(default_raw(), **data)
    layout = Layout.of(Path("/project"), params_from_mapping(raw))
    stages = dvc_paths(raw)

    assert {name: outs for name, (outs, _, _) in stages.items()} == expected_outs(layout)
    rel = lambda p: PurePosixPath(p.relative_to(layout.root).as_posix())  # noqa: E731
    produced = {rel(p) for p in (layout.params_ok, layout.raw_dir, layout.prepared_dir, layout.episodes_dir,
                                 layout.pretrain_dir, layout.meta_dir, layout.target_dir)}
    for name, (_, data_deps, _) in stages.items():
        assert data_deps <= produced | {rel(layout.checks_dir)}, (name, data_deps - produced)
        if name != "check_params":  # every stage waits for the params check (directly or through data/checks)
            assert data_deps & {rel(layout.params_ok), rel(layout.checks_dir)}, name
    assert stages["prepare"][1] == {rel(layout.checks_dir), rel(layout.raw_dir)}
    for name in ("episodes", "pretrain", "meta_train", "finetune", "evaluate"):
        assert rel(layout.prepared_dir) in stages[name][1], name


def test_dvc_yaml_code_deps_exist_and_cover_the_layout() -> None:
    for name, (_, _, code) in dvc_paths(default_raw()).items():
        missing = sorted(c for c in code if not (ROOT / c).exists())
        assert not missing, f"dvc.yaml stage {name}: code deps {missing} do not exist"
        assert "metatransfer/layout.py" in code, f"dvc.yaml stage {name}: its paths come from metatransfer/layout.py"
    stages = dvc_paths(default_raw())
    assert {"metatransfer/algorithms", "metatransfer/models", "metatransfer/artifacts.py"} <= stages["finetune"][2]
    assert "metatransfer/training/finetune.py" in stages["evaluate"][2]


@pytest.mark.parametrize("prepared_dir", ["store/prep", "./store/prep/"])
def test_data_version_is_read_from_the_configured_prepared_folder(tmp_path: Path, prepared_dir: str) -> None:
    """DVC records an interpolated out path verbatim: the key the stages look up is what dvc.yaml resolves
    to, and the runs' data version is the md5 recorded under the configured prepared folder."""
    from metatransfer.provenance import dvc_out_md5, identify

    raw = with_data(default_raw(), raw_dir="inputs/raw_files", prepared_dir=prepared_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    layout = Layout.of(tmp_path, params_from_mapping(raw))
    (fetch_out,), (prepare_out,) = (dvc_paths(raw)[s][0] for s in ("fetch", "prepare"))
    keys = {"fetch": resolve("${data.raw_dir}", raw), "prepare": resolve("${data.prepared_dir}", raw)}
    assert (PurePosixPath(keys["fetch"]), PurePosixPath(keys["prepare"])) == (fetch_out, prepare_out)
    lock = {"schema": "2.0", "stages": {
        "fetch": {"cmd": "python -m metatransfer.stages.fetch", "outs": [{"path": keys["fetch"], "md5": "a" * 32 + ".dir"}]},
        "prepare": {"cmd": "python -m metatransfer.stages.prepare",
                    "outs": [{"path": keys["prepare"], "md5": "b" * 32 + ".dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))

    assert (layout.raw_key, layout.prepared_key) == (keys["fetch"], keys["prepare"])
    assert dvc_out_md5(tmp_path, layout.prepared_key) == "b" * 32 + ".dir"
    assert dvc_out_md5(tmp_path, layout.raw_key) == "a" * 32 + ".dir"
    assert identify(tmp_path).data_version == identify(tmp_path, layout.prepared_key).data_version == "b" * 32 + ".dir"
    assert layout.prepared_dir == tmp_path / prepared_dir and layout.raw_dir == tmp_path / "inputs/raw_files"


def test_paths_of_one_project() -> None:
    layout = Layout.of(Path("/p"), params_from_mapping(with_data(default_raw(), **OTHER_DATA)))
    assert layout.prepared_dataset("breastmnist") == Path("/p/store/prep/breastmnist")
    assert layout.episode_file("bt_test", 5) == Path("/p/data/episodes/bt_test/5shot.safetensors") \
        == episode_path(Path("/p/data/episodes"), "bt_test", 5)
    assert layout.meta_learner("protonet") == Path("/p/models/meta/protonet")
    assert layout.target_model("breastmnist", "scratch") == Path("/p/models/target/breastmnist/scratch")
    assert layout.selection("breastmnist") == Path("/p/models/target/breastmnist/selection.json")
    assert layout.checkpoints("finetune") == Path("/p/checkpoints/finetune")
    assert layout.manifest("mine") == Path("/p/data/checks/image_folders/mine.json")
    assert (layout.promotion_record, layout.run_facts, layout.report_page) == (
        Path("/p/reports/promotion.json"), Path("/p/reports/run_facts.json"), Path("/p/reports/index.html"))


@pytest.mark.slow  # real data and two MLflow runs
def test_params_in_another_folder_put_every_output_there(tmp_path: Path, mirror: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`--params sub/params.yaml` from another working directory: fetch, prepare and episodes read
    and write under sub/ (with non-default data folders), and prepare's MLflow run records the DVC md5s
    of sub/dvc.lock under the configured folders' keys (raw data input, data_version tag)."""
    import mlflow

    from metatransfer.stages import episodes, fetch, prepare
    from metatransfer.tracking import tracking_uri

    for var in ("MLFLOW_TRACKING_URI", "METATRANSFER_PARENT_RUN_ID", "METATRANSFER_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    raw = with_data(default_raw(), mirror=str(mirror), **OTHER_DATA)
    for section in ("pretrain", "meta_train", "finetune", "evaluate"):
        raw.pop(section)
    raw["fetch"]["datasets"] = ["breastmnist"]
    raw["episodes"] = {"sets": {"bt": {"dataset": "breastmnist", "split": "test", "n_way": 2, "shots": [1],
                                       "n_query": 2, "n_episodes": 2}}}
    sub, elsewhere = tmp_path / "sub", tmp_path / "elsewhere"
    sub.mkdir()
    elsewhere.mkdir()
    (sub / "params.yaml").write_text(yaml.safe_dump(raw))
    raw_md5, prepared_md5 = "c" * 32 + ".dir", "d" * 32 + ".dir"  # as a previous `dvc repro` recorded them
    (sub / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "fetch": {"cmd": "python -m metatransfer.stages.fetch", "outs": [{"path": OTHER_DATA["raw_dir"], "md5": raw_md5}]},
        "prepare": {"cmd": "python -m metatransfer.stages.prepare",
                    "outs": [{"path": OTHER_DATA["prepared_dir"], "md5": prepared_md5}]}}}))
    monkeypatch.chdir(elsewhere)
    argv = ["--params", os.path.relpath(sub / "params.yaml", elsewhere)]

    assert fetch.main(argv) == 0
    assert prepare.main(argv) == 0
    assert episodes.main(argv) == 0

    assert list(elsewhere.iterdir()) == []
    assert (sub / "inputs/raw_files/breastmnist/breastmnist.npz").is_file()
    assert (sub / "store/prep/breastmnist/images.npy").is_file()
    assert (sub / "data/episodes/bt/1shot.safetensors").is_file()
    assert not (sub / "data/raw").exists() and not (sub / "data/prepared").exists()
    client = mlflow.MlflowClient(tracking_uri(sub))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'prepare'")
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {"raw": raw_md5[:36]}
    assert run.data.tags["data_version"] == prepared_md5
