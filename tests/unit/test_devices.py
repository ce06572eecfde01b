"""Every algorithm builds, meta-trains and adapts on every available device (CPU always;
CUDA/MPS when present, skipped otherwise with the reason), and what it saves there loads
and predicts the same on the CPU (serving maps any model to the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer.algorithms import CATALOG, build_algorithm
from metatransfer.artifacts import load_learner, save_learner
from metatransfer.data.store import SplitData
from metatransfer.episodes import EpisodeSampler
from metatransfer.models import BackboneSpec
from metatransfer.training.finetune import FinetuneSettings, finetune, load_target_model, save_target_model
from metatransfer.training.meta_train import TrainSettings, meta_train
from metatransfer.training.sources import mixed_source_sampler
from tests.devices import DEVICES

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)
N_WAY = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def split(seed: int, classes: int = 8, per_class: int = 5) -> SplitData:
    rng = np.random.default_rng(seed)
    return SplitData(dataset="synthetic", split="meta_train",
                     images=rng.integers(0, 256, (classes * per_class, 1, 16, 16), dtype=np.uint8),
                     labels=np.repeat(np.arange(classes), per_class),
                     class_names=tuple(f"c{i}" for i in range(classes)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CATALOG))
def test_every_algorithm_trains_on_the_device_and_serves_from_the_cpu(name: str, device: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = mixed_source_sampler([split(0)], [1.0], N_WAY, 1, 2, seed=0, rotation_augment=False)
    val = [EpisodeSampler(split(1), n_way=N_WAY, k_shot=1, n_query=2, seed=3).sample() for _ in range(2)]
    learner = build_algorithm(name, TINY, N_WAY, None, num_classes=source.num_classes).to(device)
    result = meta_train(learner, source.sample, val,
                        TrainSettings(steps=2, meta_batch_size=2, meta_lr=1e-3, val_every=1))
    assert result.steps_done == 2 and result.faults == 0 and result.budget_hit == ""
    assert all(p.device.type == device for p in learner.parameters())
    ep = val[0]
    torch.manual_seed(1)
    on_device = learner.adapt(ep.support_x, ep.support_y, N_WAY, unlabeled_x=ep.query_x if learner.transductive else None)
    with torch.no_grad():
        logits = on_device(ep.query_x)
    assert logits.shape == (len(ep.query_y), N_WAY) and torch.isfinite(logits).all()
    # Saved from the device, loaded on the CPU (what serving does), same answers.
    save_learner(learner, tmp_path / name)
    loaded = load_learner(tmp_path / name)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.manual_seed(1)
    on_cpu = loaded.adapt(ep.support_x, ep.support_y, N_WAY, unlabeled_x=ep.query_x if loaded.transductive else None)
    with torch.no_grad():
        cpu_logits = on_cpu(ep.query_x)
    # Kernels differ between devices: equal on the CPU, close elsewhere.
    tol = 0.0 if device == "cpu" else 1e-3
    torch.testing.assert_close(cpu_logits, logits.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_finetune_runs_on_the_device_and_the_target_model_loads_on_the_cpu(device: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    learner = build_algorithm("protonet", TINY, N_WAY, None)
    data = split(2, classes=N_WAY, per_class=6)
    x = torch.from_numpy(data.images).float() / 255
    y = torch.from_numpy(data.labels.astype(np.int64))
    settings = FinetuneSettings(steps=3, lr=1e-3, batch_size=6, train_layers="all", eval_every=1, patience=0,
                                device=device)
    result = finetune(learner, x, y, x, y, list(data.class_names), settings, seed=0)
    assert next(result.model.parameters()).device.type == device
    assert result.val_n == len(y) and result.val_chance == pytest.approx(1 / N_WAY)
    assert result.val_correct == round(result.val_acc * len(y))
    save_target_model(result.model, tmp_path / "t")
    served = load_target_model(tmp_path / "t")
    assert next(served.parameters()).device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(served(x), result.model(x.to(device)).cpu(), atol=1e-4, rtol=1e-4)
