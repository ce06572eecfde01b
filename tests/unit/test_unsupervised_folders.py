"""A clinic's image folder without class sub-folders (issue 15 item 3): prepared as an unlabelled target,
usable only as `finetune.unlabeled.<name>`, clustered end to end through the finetune stage, also when it
is stored at its own channels and size (heterogeneous + unlabelled: the fixed-conversion input adapter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from metatransfer.algorithms import build_algorithm
from metatransfer.config import ImageFolderParams, params_from_mapping
from metatransfer.data import importers as imp
from metatransfer.data.prepare import prepare
from metatransfer.data.schemas import validate_manifest
from metatransfer.data.store import UNLABELED, has_labels, load_manifest, load_split
from metatransfer.errors import ConfigError, DataError
from metatransfer.models import BackboneSpec
from metatransfer.models.adapter import identity_weights
from metatransfer.training.unsupervised import ClusterSettings, adapter_note, fit_unlabeled

ROOT = Path(__file__).resolve().parents[2]
TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


def png(path: Path, value: int, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A real PNG of brightness about `value` (a little seeded noise), `size` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    noise = np.random.default_rng(seed).integers(0, 20, shape)
    Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8), mode).save(path)
    return path


def flat_folder(root: Path, per: int = 6) -> Path:
    """`per` dark then `per` bright images at the top of `root` (mixed RGB/grey, two sizes), no class folder."""
    for i in range(per):
        png(root / f"dark_{i}.png", 30, "RGB" if i % 2 else "L", seed=i)
        png(root / f"bright_{i}.jpg", 220, "RGB", size=(32, 32), seed=100 + i)
    return root


def raw_params(folders: dict[str, dict], **finetune) -> dict:
    """scenarios/characters.yaml shrunk (16 px grey, a 4-channel Conv-4, scratch only) with these image folders."""
    raw = yaml.safe_load((ROOT / "scenarios" / "characters.yaml").read_text())
    raw.pop("pretrain", None)
    raw["prepare"].update(channels=1, image_size=16, image_folders=folders)
    raw["model"].update(hidden=4)
    raw["finetune"].update(methods=["scratch"], **finetune)
    raw["promote"]["baseline"] = "scratch"
    return raw


def folder_entry(path: Path, role: str = "target") -> dict:
    return {"path": str(path), "role": role, "split_fractions": [0.6, 0.2, 0.2]}


# ---------------------------------------------------------------- prepare


def test_flat_folder_prepares_as_an_unlabelled_target(tmp_path: Path) -> None:
    folder = flat_folder(tmp_path / "clinic")
    (folder / "copy.png").write_bytes((folder / "dark_0.png").read_bytes())  # an exact copy: dropped, named
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty_subfolder").mkdir()  # holds no file: not a class, not an error
    params = params_from_mapping(raw_params({"clinic": folder_entry(folder)}))
    report = prepare(params.prepare, ("clinic",), tmp_path / "raw", tmp_path / "prepared", 0, base_dir=tmp_path)
    assert report.datasets["clinic"] == {
        "kind": "image_folder", "role": "target", "n_images": 12, "n_classes": 0, "labels": "none",
        "splits": {"train": {"images": 12, "classes": 0}, "val": {"images": 0, "classes": 0},
                   "test": {"images": 0, "classes": 0}}, "quarantined": 2, "empty_classes": []}
    written = json.loads((tmp_path / "prepared" / "report.json").read_text())["datasets"]["clinic"]
    assert written["labels"] == "none" and written["n_classes"] == 0
    reasons = {Path(p).name: r for p, r in pd.read_csv(tmp_path / "prepared" / "quarantine.csv")[
        ["source_path", "reason"]].itertuples(index=False)}
    assert reasons["notes.txt"].startswith("not an image")
    # of two copies the first by path is kept
    assert reasons["dark_0.png"] == f"exact duplicate of {folder / 'copy.png'} in the same class"
    m = load_manifest(tmp_path / "prepared", "clinic")  # validated against the schema
    assert set(m["label"]) == {UNLABELED} and set(m["class"]) == {"clinic/"} and set(m["split"]) == {"train"}
    train = load_split(tmp_path / "prepared", "clinic", "train")
    assert train.class_names == () and train.labels.tolist() == [UNLABELED] * 12
    assert train.images.shape == (12, 1, 16, 16)
    assert not has_labels(tmp_path / "prepared", "clinic")


def test_a_flat_folder_as_a_source_is_refused_naming_the_key_and_the_folder(tmp_path: Path) -> None:
    folder = flat_folder(tmp_path / "clinic", per=2)
    params = params_from_mapping(raw_params({"clinic": folder_entry(folder, "source")}))
    with pytest.raises(DataError) as err:
        prepare(params.prepare, ("clinic",), tmp_path / "raw", tmp_path / "prepared", 0, base_dir=tmp_path)
    assert str(err.value) == (
        f"prepare.image_folders.clinic.role: 'source', but the folder {folder} has no class sub-folders, so its "
        "images have no labels and cannot be a meta-training source; set role: target and use it as "
        "finetune.unlabeled.clinic (docs/guide.md, \"Targets without labels\"), or sort its images into class folders.")
    assert not (tmp_path / "prepared").exists()


def test_loose_images_beside_class_folders_are_an_error_naming_them(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for cls in ("a", "b"):
        png(root / cls / "0.png", 50)
    png(root / "loose_1.png", 60)
    png(root / "loose_2.JPG", 70)
    (root / "README.txt").write_text("a loose file that is not an image: quarantined as before")
    with pytest.raises(DataError) as err:
        imp.import_image_folder(root, "mixed")
    assert str(err.value) == (
        f"{root}: 2 image(s) lie at the top of the folder beside its class folders (layout class): loose_1.png, "
        "loose_2.JPG. A folder is either labelled (every image in a class folder) or unlabelled (no class folder, "
        "every image at the top); move these images into their class folders, or move them to a folder of their "
        "own (an unlabelled dataset: prepare.image_folders entry + finetune.unlabeled.<name>), then re-run prepare "
        "(prepare.image_folders.mixed.path).")
    for p in (root / "loose_1.png", root / "loose_2.JPG"):
        p.unlink()
    data = imp.import_image_folder(root, "mixed")  # without the loose images: labelled, README quarantined
    assert sorted(data.meta["class"]) == ["mixed/a", "mixed/b"]
    assert [(Path(q.source_path).name, q.reason.split(",")[0]) for q in data.quarantine] == [
        ("README.txt", "file at the top of the tree")]


def test_layout_auto_detects_flat_and_layout_class_on_a_flat_folder_says_so(tmp_path: Path) -> None:
    folder = flat_folder(tmp_path / "f", per=1)
    assert imp.detect_layout(folder) == "flat"
    data = imp.import_image_folder(folder, "f")
    assert (data.layout, data.class_order, sorted(set(data.meta["class"]))) == ("flat", (), ["f/"])
    explicit = imp.import_image_folder(folder, "f", "flat")  # params may name the layout too
    assert (explicit.layout, list(explicit.meta["source_path"])) == ("flat", list(data.meta["source_path"]))
    entry = {"path": str(folder), "role": "target", "layout": "flat", "split_fractions": [1, 0, 0]}
    assert params_from_mapping(raw_params({"f": entry})).prepare.image_folders["f"].layout == "flat"
    with pytest.raises(DataError) as err:
        imp.import_image_folder(folder, "f", "class")
    assert str(err.value) == (
        f"{folder}: no usable image found (2 file(s) quarantined); expected class/image.* files (layout class). "
        "Every file lies at the top: a folder without class sub-folders is read as an unlabelled dataset with "
        "layout auto or flat (docs/guide.md, \"Targets without labels\").")


def test_schema_keeps_unlabelled_rows_apart(tmp_path: Path) -> None:
    n = 4
    df = pd.DataFrame({
        "id": np.arange(n, dtype=np.int64), "dataset": ["u"] * n, "domain": ["u"] * n, "class": ["u/"] * n,
        "label": np.full(n, UNLABELED, np.int64), "split": ["train"] * n,
        "source_path": [f"f{i}.png" for i in range(n)], "pixel_hash": [f"{i:032x}" for i in range(n)],
        "orig_height": np.full(n, 28, np.int64), "orig_width": np.full(n, 28, np.int64),
        "orig_channels": np.ones(n, np.int64)})
    assert len(validate_manifest(df, "u")) == n
    bad = df.copy()
    bad.loc[1, "split"] = "test"  # an unlabelled image outside train
    bad.loc[2, ["class", "label"]] = ["u/a", 0]  # a labelled row in an unlabelled manifest
    bad.loc[3, "label"] = 0  # the no-class name with a label
    with pytest.raises(DataError) as err:
        validate_manifest(bad, "u")
    msg = str(err.value)
    for row in (1, 2, 3):
        assert re.search(rf"row {row} file 'f{row}.png' .*: unlabeled_rows_consistent", msg), msg
    assert "row 0 file" not in msg


# ---------------------------------------------------------------- uses that need labels are refused


def test_every_labelled_use_of_an_unlabelled_dataset_is_refused_by_key(tmp_path: Path) -> None:
    from metatransfer import preflight

    folder = flat_folder(tmp_path / "clinic", per=2)
    raw = raw_params({"clinic": folder_entry(folder)}, targets=["clinic"])
    params = params_from_mapping(raw)
    prepare(params.prepare, ("clinic",), tmp_path / "raw", tmp_path / "prepared", 0, base_dir=tmp_path)
    raw["episodes"]["sets"]["clinic_test"] = {"dataset": "clinic", "split": "train", "n_way": 2, "shots": [1],
                                              "n_query": 1, "n_episodes": 2}
    raw["meta_train"]["sources"].append({"dataset": "clinic", "weight": 1.0})
    raw["pretrain"] = {**yaml.safe_load((ROOT / "scenarios" / "characters.yaml").read_text())["pretrain"],
                       "datasets": ["omniglot", "clinic"]}
    where = f"'clinic' has no labels (its folder {folder} (prepare.image_folders.clinic.path) has no class sub-folders)"
    with pytest.raises(ConfigError) as err:
        preflight.check_labels(params_from_mapping(raw), tmp_path / "prepared")
    assert str(err.value) == (
        "a dataset without labels is used where labels are needed:\n"
        f"  - episodes.sets.clinic_test.dataset: {where}; its episodes need labelled supports and queries\n"
        f"  - meta_train.sources[1].dataset: {where}; meta-training episodes need labels\n"
        f"  - pretrain.datasets[1]: {where}; pre-training is supervised\n"
        f"  - finetune.targets: {where}; fine-tuning needs labelled images; to cluster it without labels add "
        "finetune.unlabeled.clinic (e.g. {k: 2}; docs/guide.md, \"Targets without labels\")\n"
        "A dataset without labels can only be clustered (finetune.unlabeled.<name>); or sort its images into "
        "class folders and re-run prepare.")
    # the finetune stage's own guard on a labelled target (stages/finetune.py: check_finetune_classes)
    with pytest.raises(ConfigError, match=r"finetune.targets: 'clinic' has no labels"):
        preflight.check_finetune_classes(params, tmp_path / "prepared", ["clinic"])
    # as finetune.unlabeled.clinic nothing is refused
    raw = raw_params({"clinic": folder_entry(folder)}, targets=["clinic"], unlabeled={"clinic": {"k": 2}})
    preflight.check_labels(params_from_mapping(raw), tmp_path / "prepared")
    preflight.check_finetune_classes(params_from_mapping(raw), tmp_path / "prepared")


def test_the_image_folders_manifest_stage_lists_a_flat_folder(tmp_path: Path) -> None:
    from metatransfer.stages.image_folders import run

    folder = flat_folder(tmp_path / "clinic", per=1)
    raw = raw_params({"clinic": folder_entry(folder)})
    raw["data"]["mirror"] = ""
    out = run("clinic", params_from_mapping(raw), tmp_path)
    files = json.loads(out.read_text())["files"]
    assert [f[0] for f in files] == ["bright_0.jpg", "dark_0.png"]
    assert files[1][1] == (folder / "dark_0.png").stat().st_size


# ---------------------------------------------------------------- heterogeneous + unlabelled


def bright_and_dark(channels: int, size: int, per: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([0.15 + 0.05 * torch.rand(per, channels, size, size, generator=g),
                      0.85 - 0.05 * torch.rand(per, channels, size, size, generator=g)])


@pytest.mark.parametrize(("backbone_channels", "target_channels"), [(1, 3), (3, 1)])
def test_an_unlabelled_target_of_other_channels_and_size_clusters_through_the_fixed_adapter(
        backbone_channels: int, target_channels: int, tmp_path: Path) -> None:
    from metatransfer.training.finetune import load_target_model, save_target_model

    spec = BackboneSpec(name="conv4", in_channels=backbone_channels, image_size=16, hidden=4)
    learner = build_algorithm("scratch", spec, 2, {"steps": 1})
    images = bright_and_dark(target_channels, 24)
    fixed = fit_unlabeled(learner, images, ClusterSettings(k=2), seed=0)
    model = fixed.model
    assert model.input_shape == (target_channels, 24) and model.adapter is not None
    assert torch.equal(model.adapter.conv.weight, identity_weights(target_channels, backbone_channels))
    assert sorted(fixed.cluster_sizes) == [8, 8] and fixed.steps == 0
    grey, rgb = ("grey", "RGB") if target_channels == 1 else ("RGB", "grey")
    assert adapter_note(model, 0) == (
        f"{grey} -> {rgb} by a 1x1 input adapter that starts as the fixed conversion, kept fixed (no self-training "
        "step: without labels nothing else can train it); 24 px images pooled adaptively to the map of the "
        "backbone's 16 px")
    sums = save_target_model(model, tmp_path / "m")  # saved, loaded and predicting at the target's own shape
    again = load_target_model(tmp_path / "m", expected_sha256=sums["model.safetensors"])
    assert torch.equal(again(images).argmax(1), model(images).argmax(1))
    trained = fit_unlabeled(learner, images, ClusterSettings(k=2, temperature=1.0, self_training_steps=2,
                                                            confidence=0.5), seed=0)
    assert trained.steps == 2 and not torch.equal(trained.model.adapter.conv.weight, model.adapter.conv.weight)
    assert adapter_note(trained.model, 2).startswith(f"{grey} -> {rgb} by a 1x1 input adapter that starts as the "
                                                     "fixed conversion, trained by the 2 self-training steps")


def test_a_homogeneous_cluster_model_has_no_adapter_and_no_note() -> None:
    r = fit_unlabeled(build_algorithm("scratch", TINY, 2, {"steps": 1}), bright_and_dark(1, 16), ClusterSettings(k=2), 0)
    assert r.model.input_shape is None and r.model.adapter is None and adapter_note(r.model, 0) == ""


# ---------------------------------------------------------------- end to end through the finetune stage


@pytest.mark.slow  # a real finetune stage run (MLflow sqlite store, registration) and evaluate's scoring
def test_flat_folders_run_through_finetune_and_evaluate_without_scores(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from metatransfer.config import load_params
    from metatransfer.stages.evaluate import evaluate_unlabeled_targets, unlabeled_report_lines
    from metatransfer.stages.finetune import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METATRANSFER_PARENT_RUN_ID", raising=False)
    project = tmp_path / "project"
    folders = {"cells": folder_entry(flat_folder(tmp_path / "cells")),
               "scans": folder_entry(flat_folder(tmp_path / "scans"))}
    raw = raw_params(folders, targets=["cells", "scans"], unlabeled={"cells": {"k": 2}, "scans": {"k": 2}})
    raw["prepare"]["per_dataset"] = {"scans": {"channels": 3, "image_size": 24}}  # heterogeneous and unlabelled
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(project / "params.yaml")
    prepare(params.prepare, ("cells", "scans"), project / "raw", project / raw["data"]["prepared_dir"], 0,
            base_dir=project)
    summary = run(params, project)
    for target in ("cells", "scans"):
        entry = json.loads((project / "models" / "target" / target / "selection.json").read_text())
        assert entry == summary[target]
        assert entry["unlabeled"]["scoring"] == "no labels available to score the clusters"
        assert entry["unlabeled"]["labels_used"] == 0 and entry["unlabeled"]["images"] == 12
        assert sorted(entry["methods"]["scratch"]["cluster_sizes"]) == [6, 6]  # dark vs bright
    assert "input_adapter" not in summary["cells"]["unlabeled"]
    assert summary["scans"]["unlabeled"]["input_adapter"].startswith("RGB -> grey by a 1x1 input adapter")
    scores = evaluate_unlabeled_targets(params, project)
    assert scores["cells"]["scoring"] == "no labels available to score the clusters"
    assert set(scores["cells"]["methods"]["scratch"]) == {"k", "silhouette"}  # no NMI, ARI, matched accuracy
    lines = unlabeled_report_lines(scores)
    assert "## Unlabelled target: scans (clustering, no labels)" in lines
    assert any("embedding; no labels available to score the clusters. Shipped: **scratch**" in line for line in lines)


def test_report_card_of_a_target_without_any_label_says_nothing_can_score_it() -> None:
    from metatransfer.report.inputs import ReportInputs, RunFacts
    from metatransfer.report.page import render_report

    sel = {"chosen": "scratch", "reason": "no labels: ...", "methods": {"scratch": {"k": 2, "silhouette": 0.3}},
           "unlabeled": {"labels_used": 0, "k": 2, "images": 12, "scoring": "no labels available to score the clusters"}}
    page = render_report(ReportInputs(RunFacts("abc", "", "", "now", "p"), selections={"clinic": sel}))
    assert ("No labels were used for training; k=2, clustering in the scratch embedding; no labels available to "
            "score the clusters.") in page
    assert "appear after dvc repro evaluate" not in page
