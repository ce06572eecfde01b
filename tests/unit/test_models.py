"""Backbones (Conv4, ResNet12, ResNet18): shapes at 28-224 px and 1/3 channels,
BatchNorm behaviour, torchvision's ResNet-18 key layout, and loading external
pre-trained weights (checksum, keys, shapes)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from metatransfer.config import params_from_mapping
from metatransfer.errors import ConfigError
from metatransfer.models import (
    BackboneSpec,
    PretrainedWeights,
    PretrainedWeightsError,
    build_backbone,
    load_pretrained,
)
from metatransfer.models.conv4 import Conv4
from metatransfer.models.resnet12 import ResNet12
from metatransfer.models.resnet18 import ResNet18

ROOT = Path(__file__).resolve().parents[2]

SMALL = (8, 12, 16, 20)  # ResNet12 channels small enough for fast CPU tests


@pytest.mark.parametrize("in_channels", [1, 3])
def test_conv4_shapes_at_28(in_channels: int) -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels=in_channels, image_size=28)
    x = torch.rand(4, in_channels, 28, 28)
    assert model.out_dim == 64 and model.feature_shape == (64, 1, 1)
    assert model(x).shape == (4, 64)
    assert model.feature_map(x).shape == (4, 64, 1, 1)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_resnet12_shapes_at_28(in_channels: int) -> None:
    torch.manual_seed(0)
    model = ResNet12(in_channels=in_channels, image_size=28)
    x = torch.rand(2, in_channels, 28, 28)
    assert model.out_dim == 640 and model.feature_shape == (640, 1, 1)
    out = model(x)
    assert out.shape == (2, 640) and out.dtype == torch.float32
    assert model.feature_map(x).shape == (2, 640, 1, 1)
    # 4 blocks x (3 convs + 1 shortcut conv), as in the literature.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert sum(1 for c in convs if c.kernel_size == (1, 1)) == 4


def test_resnet12_features_are_global_average_of_map_at_84() -> None:
    torch.manual_seed(0)
    model = ResNet12(in_channels=3, image_size=84, channels=SMALL).eval()
    x = torch.rand(3, 3, 84, 84)
    fmap = model.feature_map(x)
    assert model.feature_shape == (20, 5, 5) and fmap.shape == (3, 20, 5, 5)
    assert model.out_dim == 20
    torch.testing.assert_close(model(x), fmap.mean(dim=(2, 3)))


def test_resnet12_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = ResNet12(in_channels=1, image_size=28, channels=SMALL)
    model(torch.rand(4, 1, 28, 28)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_resnet12_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image_size >= 16.*got image_size=15"):
        ResNet12(image_size=15)
    with pytest.raises(ValueError, match=r"4 positive channel counts; got channels=\(8, 8, 8\)"):
        ResNet12(channels=(8, 8, 8))


def test_build_backbone_resnet12_and_conv4() -> None:
    res = build_backbone(BackboneSpec(name="resnet12", in_channels=3, image_size=28))
    assert isinstance(res, ResNet12) and res.out_dim == 640
    assert res.encoder[0].conv1.in_channels == 3
    conv = build_backbone(BackboneSpec(name="conv4", hidden=32), track_running_stats=False)
    assert isinstance(conv, Conv4) and conv.out_dim == 32
    assert all(not m.track_running_stats for m in conv.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    "make",
    [
        lambda t: Conv4(in_channels=1, image_size=28, hidden=16, track_running_stats=t),
        lambda t: ResNet12(in_channels=1, image_size=28, track_running_stats=t, channels=SMALL),
        # The ImageNet stem keeps the float64 ResNet-18 fast at 28 px (layer1 at 7x7).
        lambda t: ResNet18(in_channels=1, image_size=28, stem="imagenet", track_running_stats=t),
    ],
    ids=["conv4", "resnet12", "resnet18"],
)
def test_batchnorm_without_running_stats_uses_batch_statistics_in_eval(make) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28, dtype=torch.float64)

    batch_stats = make(False).double()
    batch_stats.train()
    train_out = batch_stats(x)
    batch_stats.eval()
    eval_out = batch_stats(x)
    # Eval mode still normalises with the batch's own statistics ...
    torch.testing.assert_close(eval_out, train_out)
    # ... so an item's features depend on the rest of the batch.
    assert not torch.allclose(batch_stats(x[:3])[0], eval_out[0])

    running = make(True).double()
    running.train()
    running_train_out = running(x)  # also updates the running averages
    running.eval()
    full = running(x)
    # With running statistics eval mode differs from batch statistics, and
    # eval-mode items are independent of each other.
    assert not torch.allclose(full, running_train_out)
    torch.testing.assert_close(running(x[:3])[0], full[0])


# --------------------------------------------------------------------------- any size
# Expected (out_dim, feature side) per image size, worked out by hand:
# Conv4 floors at each of four 2x2 pools; ResNet12 likewise, then a global
# average; ResNet18 rounds up at each stride-2 op (two in the ImageNet stem,
# none in the small stem, one at the start of layer2..layer4).
CONV4_SIDE = {28: 1, 32: 2, 84: 5, 224: 14}
RESNET18_AUTO_SIDE = {28: 4, 32: 4, 84: 3, 224: 7}  # "auto": small stem below 64 px


def _backbone_at(name: str, size: int, channels: int) -> tuple[nn.Module, int, tuple[int, int, int]]:
    """A backbone and its expected out_dim and feature_shape at `size` px."""
    if name == "conv4":
        side = CONV4_SIDE[size]
        return Conv4(in_channels=channels, image_size=size, hidden=16), 16 * side * side, (16, side, side)
    if name == "resnet12":
        side = CONV4_SIDE[size]
        return ResNet12(in_channels=channels, image_size=size, channels=SMALL), 20, (20, side, side)
    side = RESNET18_AUTO_SIDE[size]
    return ResNet18(in_channels=channels, image_size=size), 512, (512, side, side)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 84, 224])
@pytest.mark.parametrize("name", ["conv4", "resnet12", "resnet18"])
def test_every_backbone_at_every_size(name: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model, out_dim, feature_shape = _backbone_at(name, size, channels)
    model.eval()
    batch = 1 if size == 224 else 3
    x = torch.rand(batch, channels, size, size)
    with torch.no_grad():
        features, fmap = model(x), model.feature_map(x)
    assert model.out_dim == out_dim and tuple(model.feature_shape) == feature_shape
    assert features.shape == (batch, out_dim) and fmap.shape == (batch, *feature_shape)
    assert torch.isfinite(features).all() and features.abs().sum() > 0


@pytest.mark.parametrize(
    ("stem", "size", "side"),
    [("imagenet", 224, 7), ("imagenet", 28, 1), ("imagenet", 84, 3), ("small", 84, 11), ("small", 32, 4)],
)
def test_resnet18_stems_fix_the_feature_side(stem: str, size: int, side: int) -> None:
    model = ResNet18(in_channels=3, image_size=size, stem=stem).eval()
    assert model.feature_shape == (512, side, side)
    with torch.no_grad():
        assert model.feature_map(torch.rand(1, 3, size, size)).shape == (1, 512, side, side)
    # Both stems keep torchvision's 7x7 conv1: ImageNet weights fit either.
    assert model.conv1.weight.shape == (64, 3, 7, 7)
    assert model.conv1.stride == ((2, 2) if stem == "imagenet" else (1, 1))
    assert isinstance(model.maxpool, nn.MaxPool2d) == (stem == "imagenet")


def test_build_backbone_resnet18_and_bad_stem() -> None:
    model = build_backbone(BackboneSpec(name="resnet18", in_channels=1, image_size=32), track_running_stats=False)
    assert isinstance(model, ResNet18) and model.stem == "small" and model.out_dim == 512
    assert all(not m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ConfigError, match=r"model.stem: expected one of \['auto', 'imagenet', 'small'\], found 'big'"):
        build_backbone(BackboneSpec(name="resnet18", stem="big"))
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet50'; valid: \['conv4', 'resnet12', 'resnet18'\]"):
        build_backbone(BackboneSpec(name="resnet50"))


def test_resnet18_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = ResNet18(in_channels=1, image_size=28, stem="imagenet")  # cheaper than "small"
    model(torch.rand(4, 1, 28, 28)).pow(2).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# --------------------------------------------------------------------------- torchvision layout
def _torchvision_resnet18_keys() -> list[str]:
    """torchvision.models.resnet18().state_dict() keys without fc.*, in its order (written out)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for layer in (1, 2, 3, 4):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{b}" for b in bn]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{b}" for b in bn]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in bn]
    return keys


def test_resnet18_state_dict_has_torchvision_keys_and_shapes() -> None:
    state = ResNet18(in_channels=3, image_size=224, stem="imagenet").state_dict()
    expected = _torchvision_resnet18_keys()
    assert len(expected) == 120  # torchvision's 122 minus fc.weight, fc.bias
    assert list(state) == expected
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.1.weight": (512,),
        "layer4.1.bn2.running_var": (512,),
        "layer4.1.bn2.num_batches_tracked": (),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in ResNet18(3, 224).parameters()) == 11_176_512  # 11,689,512 - fc's 513,000


def test_resnet18_without_running_stats_drops_only_the_batchnorm_buffers() -> None:
    state = ResNet18(in_channels=3, image_size=32, track_running_stats=False).state_dict()
    stats = (".running_mean", ".running_var", ".num_batches_tracked")
    assert list(state) == [k for k in _torchvision_resnet18_keys() if not k.endswith(stats)]
    assert len(state) == 60


# --------------------------------------------------------------------------- pre-trained weights
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return _sha256(path)


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """A real ResNet-18 state dict with non-trivial BatchNorm statistics and an fc head, as torchvision saves it."""
    torch.manual_seed(123)
    source = ResNet18(in_channels=3, image_size=224, stem="imagenet")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for k in state:
        if k.endswith(("running_mean", "running_var")):
            state[k] = torch.rand_like(state[k]) + 0.5
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
    full = dict(state, **{"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.safetensors"
    return path, _save(full, path), state


def test_pretrained_round_trip_ignores_fc(imagenet_like, caplog: pytest.LogCaptureFixture) -> None:
    path, sha, state = imagenet_like
    torch.manual_seed(0)
    model = ResNet18(in_channels=3, image_size=84)  # another size and stem: same keys and shapes
    assert not torch.equal(model.conv1.weight, state["conv1.weight"])
    with caplog.at_level("DEBUG", logger="metatransfer.models.pretrained"):
        load_pretrained(model, path, sha.upper())  # hex case does not matter
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert "ignoring 2 classifier tensor(s) ['fc.bias', 'fc.weight']" in caplog.text


def test_build_backbone_applies_pretrained_with_a_path_relative_to_root(imagenet_like) -> None:
    path, sha, state = imagenet_like
    spec = BackboneSpec(name="resnet18", in_channels=3, image_size=32)
    model = build_backbone(spec, pretrained=(path.name, sha), root=path.parent)
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    same = build_backbone(spec, pretrained=PretrainedWeights(str(path), sha))
    assert torch.equal(same.bn1.running_var, state["bn1.running_var"])


def test_pretrained_rgb_weights_into_grey_backbone_sum_conv1(imagenet_like) -> None:
    path, sha, state = imagenet_like
    model = ResNet18(in_channels=1, image_size=28)
    load_pretrained(model, path, sha)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    # Summing is exact for conv1: on a grey image it equals the RGB conv on the image replicated.
    x = torch.rand(2, 1, 28, 28)
    rgb = nn.functional.conv2d(x.expand(-1, 3, -1, -1), state["conv1.weight"], padding=3)
    torch.testing.assert_close(model.conv1(x), rgb, atol=1e-5, rtol=1e-5)


def test_pretrained_into_batch_statistics_backbone_skips_running_stats(imagenet_like) -> None:
    path, sha, state = imagenet_like
    model = ResNet18(in_channels=3, image_size=32, track_running_stats=False)
    load_pretrained(model, path, sha)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_pretrained_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match=r"model.pretrained.path: .*nowhere.safetensors: file not found"):
        load_pretrained(ResNet18(3, 32), "nowhere.safetensors", "0" * 64, root=tmp_path)


def test_pretrained_wrong_checksum_names_file_and_both_hashes(imagenet_like) -> None:
    path, sha, _ = imagenet_like
    wrong = "ab" * 32
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(ResNet18(3, 32), path, wrong)
    msg = str(err.value)
    assert str(path) in msg and f"expected {wrong}, found {sha}" in msg
    assert isinstance(err.value, ConfigError)


def test_pretrained_pickle_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(ResNet18(3, 32).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"weights.pth: not a readable safetensors file"):
        load_pretrained(ResNet18(3, 32), path, _sha256(path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("layer3.0.conv1.weight"), r"missing key\(s\) layer3.0.conv1.weight"),
        (lambda s: s.update({"layer5.0.conv1.weight": torch.zeros(3)}), r"unexpected key\(s\) layer5.0.conv1.weight"),
        (lambda s: s.update({"layer4.1.bn2.running_var": torch.ones(256)}),
         r"shape mismatch: layer4.1.bn2.running_var \(expected \[512\], found \[256\]\)"),
        (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
         r"shape mismatch: conv1.weight \(expected \[64, 3, 7, 7\], found \[64, 3, 3, 3\]\)"),
    ],
    ids=["missing", "unexpected", "bn-shape", "conv1-shape"],
)
def test_pretrained_key_problems_name_the_key(imagenet_like, tmp_path: Path, edit, message: str) -> None:
    _, _, state = imagenet_like
    bad = dict(state)
    edit(bad)
    path = tmp_path / "bad.safetensors"
    sha = _save(bad, path)
    model = ResNet18(3, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PretrainedWeightsError, match=message) as err:
        load_pretrained(model, path, sha)
    assert str(path) in str(err.value)
    # Nothing is half-loaded when the file does not fit.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pretrained_works_for_the_other_backbones(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = ResNet12(in_channels=3, image_size=32, channels=SMALL)
    path = tmp_path / "r12.safetensors"
    sha = _save(source.state_dict(), path)
    target = ResNet12(in_channels=1, image_size=84, channels=SMALL)
    load_pretrained(target, path, sha)
    # Both convolutions that read the image (conv1 and the shortcut of block 0) are summed over RGB.
    for key in ("encoder.0.conv1.weight", "encoder.0.shortcut.0.weight"):
        torch.testing.assert_close(target.state_dict()[key], source.state_dict()[key].sum(1, keepdim=True))
    torch.testing.assert_close(target.encoder[3].conv3.weight, source.encoder[3].conv3.weight)


# --------------------------------------------------------------------------- params keys
@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_model_params_stem_and_pretrained_load(raw: dict) -> None:
    weights = {"path": "weights/r18.safetensors", "sha256": "A" * 64}
    raw["model"].update(name="resnet18", stem="small", pretrained=weights)
    p = params_from_mapping(raw)
    assert p.model.stem == "small"
    assert p.model.pretrained is not None and p.model.pretrained.path == "weights/r18.safetensors"
    assert params_from_mapping(yaml.safe_load((ROOT / "params.yaml").read_text())).model.pretrained is None


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"stem": "tiny"}, r"model.stem: must be one of \['auto', 'imagenet', 'small'\], found 'tiny'"),
        ({"pretrained": {"path": "w.safetensors", "sha256": "abc"}},
         r"model.pretrained.sha256: must be 64 hex digits.*'abc'"),
        ({"pretrained": {"path": " ", "sha256": "a" * 64}}, r"model.pretrained.path: must name a safetensors file"),
        ({"pretrained": {"path": "w.safetensors"}}, r"model.pretrained.sha256: missing required key"),
    ],
    ids=["stem", "sha256", "path", "missing-sha"],
)
def test_model_params_bad_values_name_the_key(raw: dict, model: dict, message: str) -> None:
    raw["model"].update(copy.deepcopy(model))
    with pytest.raises(ConfigError, match=message):
        params_from_mapping(raw)
