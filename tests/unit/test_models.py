"""Backbone shapes and BatchNorm behaviour (Conv4, ResNet12) on tiny inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metatransfer.models import BackboneSpec, build_backbone
from metatransfer.models.conv4 import Conv4
from metatransfer.models.resnet12 import ResNet12

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
    ],
    ids=["conv4", "resnet12"],
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
