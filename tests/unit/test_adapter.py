"""Heterogeneous transfer (issue 15 item 4): a target kept at its own channels and size
(`prepare.per_dataset`) is fine-tuned through a learned 1x1 input adapter that starts as
prepare's fixed conversion; the adapted target model saves, loads and serves at the target's
shape. Without an override nothing changes: same store, same saved target-model bytes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import metatransfer.algorithms  # noqa: F401  (registers the algorithm checks params_from_mapping runs)
from metatransfer.algorithms import build_algorithm
from metatransfer.config import DatasetShapeParams, NpzFileParams, PrepareParams, params_from_mapping
from metatransfer.data import importers as imp
from metatransfer.data import prepare as prep
from metatransfer.data.convert import convert_batch
from metatransfer.data.store import SplitData, image_shape, load_split
from metatransfer.episodes import EpisodeSampler
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec, build_backbone
from metatransfer.models.adapter import (LUMA, InputAdapter, convert_images, flattens_map, identity_weights,
                                         pooled_features)
from metatransfer.serving.target_model import TargetModelPredictor
from metatransfer.training.finetune import (FinetuneSettings, TargetModel, finetune, load_target_model,
                                            save_target_model)
from metatransfer.training.meta_train import TrainSettings, meta_train
from metatransfer.training.sources import mixed_source_sampler

ROOT = Path(__file__).resolve().parents[2]
N_WAY = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --------------------------------------------------------------------------- the adapter at step 0
def test_identity_weights_are_the_fixed_conversions() -> None:
    assert torch.equal(identity_weights(1, 3), torch.ones(3, 1, 1, 1))
    assert torch.equal(identity_weights(3, 1), torch.tensor([[[[0.299]], [[0.587]], [[0.114]]]]))
    assert torch.equal(identity_weights(3, 3).flatten(1), torch.eye(3))
    assert torch.equal(identity_weights(1, 1), torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"channels must be 1 or 3 \(grey or RGB\), found 2 -> 3"):
        identity_weights(2, 3)


def test_grey_to_rgb_adapter_at_init_copies_the_grey_value_exactly() -> None:
    x = torch.from_numpy(_uint8((4, 1, 16, 16))).float() / 255
    adapter = InputAdapter(1, 3)
    assert torch.equal(adapter.conv.bias, torch.zeros(3))
    with torch.no_grad():
        out = adapter(x)
    assert torch.equal(out, x.expand(-1, 3, -1, -1))  # prepare's replication, bit for bit


def test_rgb_to_grey_adapter_at_init_is_prepares_luma() -> None:
    u8 = _uint8((4, 16, 16, 3), seed=1)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = InputAdapter(3, 1)(x)
    luma = sum(w * x[:, i : i + 1] for i, w in enumerate(LUMA))
    torch.testing.assert_close(out, luma, atol=1e-6, rtol=0)
    # On the uint8 scale, prepare's stored pixel (same size: luma then rounding) is the adapter's output rounded.
    stored = convert_batch(imp.ImageBatch(u8), image_size=16, channels=1)
    assert np.abs((out * 255).round().numpy() - stored).max() <= 1
    assert ((out * 255).round().numpy() == stored).mean() > 0.99


def test_convert_images_is_prepares_conversion_in_float() -> None:
    u8 = _uint8((3, 20, 20, 3), seed=2)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    for channels, size in ((1, 16), (1, 28), (3, 16)):
        stored = convert_batch(imp.ImageBatch(u8), image_size=size, channels=channels)
        out = convert_images(x, channels, size)
        assert out.shape == (3, channels, size, size)
        assert np.abs((out * 255).round().numpy() - stored).max() <= 1
    assert convert_images(x, 3, 20) is x  # already the shape: untouched


# --------------------------------------------------------------------------- resolution
@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_pooled_features_keep_out_dim_at_another_size(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec(name=name, in_channels=1, image_size=32, hidden=4)).eval()
    assert flattens_map(backbone) == (name == "conv4")
    x32, x48 = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(pooled_features(backbone, x32), backbone(x32))  # the backbone's own size: unchanged
        assert pooled_features(backbone, x48).shape == (2, backbone.out_dim)
        if name == "conv4":  # it flattens a map whose side follows the input: 2x2 at 32 px, 3x3 at 48 px
            assert backbone(x48).shape[1] == 4 * 3 * 3 and backbone.out_dim == 4 * 2 * 2
        else:  # a global average: the backbone itself takes any size
            assert torch.equal(pooled_features(backbone, x48), backbone(x48))


def test_a_one_by_one_map_is_pooled_to_the_global_average() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec(name="resnet12", in_channels=1, image_size=16)).eval()
    assert backbone.feature_shape[1:] == (1, 1) and flattens_map(backbone)  # 640 == 640 x 1 x 1
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(backbone, x), backbone(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- end to end (library)
def _split(channels: int, size: int, seed: int, classes: int = 6, per_class: int = 6) -> SplitData:
    rng = np.random.default_rng(seed)
    # Class-dependent brightness so that fine-tuning has something to find.
    base = np.repeat(np.arange(classes) * (200 // classes), per_class)[:, None, None, None]
    noise = rng.integers(0, 56, (classes * per_class, channels, size, size))
    return SplitData(dataset=f"synthetic{channels}", split="meta_train", images=(base + noise).astype(np.uint8),
                     labels=np.repeat(np.arange(classes), per_class),
                     class_names=tuple(f"s/c{i}" for i in range(classes)))


def _meta_trained(channels: int, size: int) -> torch.nn.Module:
    """A tiny ProtoNet meta-trained for 3 steps on a source of `channels` x `size`."""
    torch.manual_seed(0)
    spec = BackboneSpec(name="conv4", in_channels=channels, image_size=size, hidden=4)
    source = mixed_source_sampler([_split(channels, size, 0)], [1.0], N_WAY, 1, 2, seed=0, rotation_augment=False)
    val = [EpisodeSampler(_split(channels, size, 1), n_way=N_WAY, k_shot=1, n_query=2, seed=3).sample()]
    learner = build_algorithm("protonet", spec, N_WAY, None)
    result = meta_train(learner, source.sample, val, TrainSettings(steps=3, meta_batch_size=2, meta_lr=1e-3, val_every=1))
    assert result.steps_done == 3
    return learner


def _target(channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    data = _split(channels, size, seed=5, classes=N_WAY, per_class=6)
    return (torch.from_numpy(data.images).float() / 255, torch.from_numpy(data.labels.astype(np.int64)),
            [f"t/{c}" for c in ("a", "b", "c")])


@pytest.mark.parametrize(("source", "target"), [((1, 16), (3, 20)), ((3, 16), (1, 16))],
                         ids=["grey-source-rgb-target", "rgb-source-grey-target"])
def test_heterogeneous_finetune_saves_loads_and_serves_at_the_targets_shape(source, target, tmp_path: Path) -> None:
    learner = _meta_trained(*source)
    x, y, names = _target(*target)
    settings = FinetuneSettings(steps=6, lr=1e-2, batch_size=6, train_layers="all", eval_every=2, patience=0)
    result = finetune(learner, x, y, None, None, names, settings, seed=0)
    model = result.model
    assert model.adapter is not None and (model.adapter.in_channels, model.adapter.out_channels) == (target[0], source[0])
    assert (model.input_channels, model.input_size) == target
    # Trained during fine-tuning: it moved away from the fixed conversion.
    assert not torch.equal(model.adapter.conv.weight, identity_weights(target[0], source[0]))
    # φ came from the learner (same architecture, its own channels) and was fine-tuned too.
    assert model.backbone_spec == learner.backbone_spec

    sums = save_target_model(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["input"] == {"channels": target[0], "image_size": target[1]}
    assert config["backbone"]["in_channels"] == source[0] and config["backbone"]["image_size"] == source[1]
    assert {"adapter.conv.weight", "adapter.conv.bias"} <= set(model.state_dict())
    loaded = load_target_model(tmp_path / "model", expected_sha256=sums["model.safetensors"])
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    served = TargetModelPredictor(tmp_path / "model")
    assert (served.channels, served.size) == target
    out = served.predict(x.numpy())
    assert out["prediction"].tolist() == model(x).argmax(1).tolist()
    wrong = torch.rand(2, source[0], source[1], source[1]).numpy()  # the backbone's shape is not the input shape
    from mlflow.exceptions import MlflowException  # the serving error MLflow answers with 400

    with pytest.raises(MlflowException, match=rf"expected float32 images of shape \(batch, {target[0]}, {target[1]}, "
                                        rf"{target[1]}\), found shape \(2, {source[0]}, {source[1]}, {source[1]}\)"):
        served.predict(wrong)


def test_adapter_before_training_gives_the_fixed_conversions_features() -> None:
    """Step 0: the adapted model on RGB images equals the same model on prepare's grey conversion of them."""
    learner = _meta_trained(1, 16)
    x, y, names = _target(3, 16)
    settings = FinetuneSettings(steps=0, lr=1e-2, batch_size=6, train_layers="all", eval_every=2, patience=0)
    adapted = finetune(learner, x, y, None, None, names, settings, seed=0).model
    plain = finetune(learner, convert_images(x, 1, 16), y, None, None, names, settings, seed=0).model
    assert plain.adapter is None and adapted.adapter is not None
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), plain(convert_images(x, 1, 16)), atol=1e-4, rtol=1e-4)


def test_head_only_finetune_trains_the_adapter_and_keeps_phi() -> None:
    learner = _meta_trained(1, 16)
    x, y, names = _target(3, 16)
    settings = FinetuneSettings(steps=4, lr=1e-2, batch_size=6, train_layers="head", eval_every=2, patience=0)
    model = finetune(learner, x, y, None, None, names, settings, seed=0).model
    phi = learner.backbone.state_dict()
    assert all(torch.equal(v, phi[k]) for k, v in model.backbone.state_dict().items() if k in phi and "running" not in k
               and "num_batches" not in k)
    assert not torch.equal(model.adapter.conv.weight, identity_weights(3, 1))


def test_a_target_model_without_adapter_saves_the_same_bytes_as_before(tmp_path: Path) -> None:
    """The homogeneous path is unchanged: the digests are those the code before the adapter wrote."""
    spec = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)
    plain = TargetModel(spec, ["t/a", "t/b"], "protonet")
    same_shape = TargetModel(spec, ["t/a", "t/b"], "protonet", input_shape=(1, 16))  # what finetune passes
    for model in (plain, same_shape):
        assert model.adapter is None and model.input_shape is None
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    first = save_target_model(plain, tmp_path / "a", extra={"val_acc": 0.5})
    second = save_target_model(same_shape, tmp_path / "b", extra={"val_acc": 0.5})
    # Computed with the target model of commit c6fc329 (before the adapter) on the same weights.
    assert first == second == {
        "model.safetensors": "9a731cb85cbf9e1f350f94994ce7036d4c9a16d7a2b4e783d0c3c8aba3c3ed50",
        "config.json": "46434e72daf1cf939c51c15cd39bbdf38a62036e193655f3cf1550eb1b1cd037"}
    assert "input" not in json.loads((tmp_path / "a" / "config.json").read_text())


def test_a_target_model_refuses_non_square_images() -> None:
    learner = _meta_trained(1, 16)
    with pytest.raises(ConfigError, match=r"target images must be \(N, C, S, S\), found shape \(6, 1, 16, 20\)"):
        finetune(learner, torch.rand(6, 1, 16, 20), torch.arange(3).repeat(2), None, None, ["a", "b", "c"],
                 FinetuneSettings(steps=1, lr=1e-2, batch_size=6, train_layers="all", eval_every=1, patience=0), seed=0)


# --------------------------------------------------------------------------- prepare and config
def _npz(path: Path, seed: int = 0) -> str:
    import hashlib

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in {"train": 6, "val": 2, "test": 3}.items():
        labels = np.repeat(np.arange(2, dtype=np.uint8), k)
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 24, 24, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_keeps_a_datasets_own_shape_and_leaves_the_others_as_they_were(tmp_path: Path) -> None:
    files = {name: NpzFileParams(path=f"own/{name}.npz", sha256=_npz(tmp_path / f"own/{name}.npz", seed=i))
             for i, name in enumerate(("skin", "eye"))}
    base = PrepareParams(image_size=16, channels=1, omniglot_protocol="background_evaluation", meta_val_classes=0,
                         val_fraction=0.25, npz_files=files)
    own = base.model_copy(update={"per_dataset": {"skin": DatasetShapeParams(channels=3, image_size=20)}})
    assert own.shape_of("skin") == (3, 20) and own.shape_of("eye") == (1, 16) == base.shape_of("skin")
    for params, out in ((base, "before"), (own, "after")):
        prep.prepare(params, ("skin", "eye"), tmp_path / "raw", tmp_path / out, seed=0, base_dir=tmp_path)
    assert image_shape(tmp_path / "after", "skin") == (3, 20, 20) and image_shape(tmp_path / "before", "skin") == (1, 16, 16)
    assert load_split(tmp_path / "after", "skin", "train").images.shape[1:] == (3, 20, 20)
    # The other dataset's files are byte-identical; report.json records only the override.
    for name in ("images.npy", "manifest.parquet"):
        assert (tmp_path / "after/eye" / name).read_bytes() == (tmp_path / "before/eye" / name).read_bytes()
    after = json.loads((tmp_path / "after/report.json").read_text())["datasets"]
    before = json.loads((tmp_path / "before/report.json").read_text())["datasets"]
    assert (after["skin"]["channels"], after["skin"]["image_size"]) == (3, 20)
    assert after["eye"] == before["eye"] and "channels" not in before["skin"]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_per_dataset_absent_is_the_default_and_a_valid_entry_loads(raw: dict) -> None:
    assert "per_dataset" not in raw["prepare"]
    assert params_from_mapping(copy.deepcopy(raw)).prepare.per_dataset == {}
    raw["prepare"]["per_dataset"] = {"retinamnist": {"channels": 1}}
    p = params_from_mapping(raw).prepare
    assert p.shape_of("retinamnist") == (1, p.image_size) and p.shape_of("breastmnist") == (p.channels, p.image_size)


@pytest.mark.parametrize(("entry", "expected"), [
    ({"nosuch": {"channels": 1}}, "prepare.per_dataset.nosuch: 'nosuch' is not a dataset prepare builds"),
    ({"mini_imagenet": {"channels": 1}}, "prepare.per_dataset.mini_imagenet: 'mini_imagenet' is a training source "
                                         "(pretrain.datasets)"),
    ({"retinamnist": {}}, "prepare.per_dataset.retinamnist: expected channels and/or image_size, found neither"),
    ({"retinamnist": {"channels": 2}}, "prepare.per_dataset.retinamnist.channels: must be 1 or 3, found 2"),
    ({"retinamnist": {"image_size": 8}}, "prepare.per_dataset.retinamnist.image_size: must be >= 16, found 8"),
    ({"retinamnist": {"size": 28}}, "prepare.per_dataset.retinamnist: unknown key(s) ['size']; valid keys: "
                                    "['channels', 'image_size']"),
    ({"retinamnist": {"channels": "rgb"}}, "prepare.per_dataset.retinamnist.channels: expected an integer, found str"),
])
def test_per_dataset_errors_name_the_key(raw: dict, entry: dict, expected: str) -> None:
    raw["prepare"]["per_dataset"] = entry
    with pytest.raises(ConfigError) as err:
        params_from_mapping(raw)
    assert expected in str(err.value)


def test_heterogeneous_scenario_loads_and_keeps_its_target_at_its_own_channels() -> None:
    from metatransfer.config import load_params

    p = load_params(ROOT / "scenarios" / "heterogeneous.yaml")
    assert (p.prepare.channels, p.prepare.image_size) == (1, 28)
    assert p.prepare.shape_of("retinamnist") == (3, 28)
    assert p.prepare.shape_of("omniglot") == (1, 28) and "retinamnist" in p.finetune.targets


def test_evaluate_feeds_learners_a_heterogeneous_targets_episodes_by_the_fixed_conversion() -> None:
    from metatransfer.config import load_params
    from metatransfer.episodes import Episode
    from metatransfer.stages.evaluate import to_backbone_shape

    p = load_params(ROOT / "scenarios" / "heterogeneous.yaml")
    rgb = torch.from_numpy(_uint8((6, 3, 28, 28), seed=3)).float() / 255
    y = torch.arange(3).repeat(2)
    episode = Episode(rgb[:3], y[:3], rgb[3:], y[3:], n_way=3)
    grey = to_backbone_shape(episode, p)
    assert grey.support_x.shape == (3, 1, 28, 28) and grey.query_x.shape == (3, 1, 28, 28)
    assert torch.equal(grey.support_x, convert_images(rgb[:3], 1, 28)) and torch.equal(grey.support_y, y[:3])
    same = Episode(grey.support_x, y[:3], grey.query_x, y[3:], n_way=3)
    assert to_backbone_shape(same, p) is same  # the backbone's shape already: untouched
