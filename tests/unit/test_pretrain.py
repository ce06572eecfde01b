"""Invariants of supervised pre-training (metatransfer/training/pretrain.py) and of
starting learners from its backbone (metatransfer/learners.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.config import AugmentParams
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.learners import copy_backbone
from metatransfer.models import BackboneSpec
from metatransfer.training.checkpoint import CheckpointConfig
from metatransfer.training.pretrain import (
    PretrainError,
    PretrainSettings,
    batch_indices,
    centroid_accuracy,
    lr_at,
    pretrain,
    source_index,
)

SPEC = BackboneSpec(name="conv4", in_channels=3, image_size=16, hidden=8)


def toy_source(n_classes: int = 4, per_class: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable uint8 images: class c is bright in colour channel c % 3 and in quadrant c // 3."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n_classes * per_class, 3, 16, 16), dtype=np.uint8)
    y = np.repeat(np.arange(n_classes), per_class)
    for i, c in enumerate(y):
        q = c // 3
        x[i, c % 3, 8 * (q // 2): 8 * (q // 2) + 8, 8 * (q % 2): 8 * (q % 2) + 8] += 180
    return x, y.astype(np.int64)


def episodes_of(x: np.ndarray, y: np.ndarray, n: int = 3) -> list[Episode]:
    out = []
    for e in range(n):
        s_idx = [np.flatnonzero(y == c)[e] for c in range(2)]
        q_idx = [i for c in range(2) for i in np.flatnonzero(y == c)[6:9]]
        xs = torch.from_numpy(x[s_idx]).float() / 255
        xq = torch.from_numpy(x[q_idx]).float() / 255
        out.append(Episode(support_x=xs, support_y=torch.tensor([0, 1]), query_x=xq,
                           query_y=torch.tensor([0, 0, 0, 1, 1, 1]), n_way=2))
    return out


def learner(n_classes: int = 4):
    torch.manual_seed(0)
    return build_algorithm("baselinepp", SPEC, 2, None, num_classes=n_classes)


def settings(**kw) -> PretrainSettings:
    base = dict(steps=12, batch_size=8, lr=0.01, val_every=4, augment=AugmentParams())
    base.update(kw)
    return PretrainSettings(**base)


def test_batch_indices_cover_each_epoch_once_and_repeat_for_a_seed():
    n, b = 10, 4
    seen = np.concatenate([batch_indices(s, n, b, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seen) == sorted(list(range(n)) * 2)
    assert np.array_equal(batch_indices(2, n, b, 3), batch_indices(2, n, b, 3))
    assert not np.array_equal(np.concatenate([batch_indices(s, n, b, 3) for s in range(2)]),
                              np.concatenate([batch_indices(s, n, b, 4) for s in range(2)]))


def test_source_index_numbers_classes_of_later_splits_after_earlier_ones():
    split, row, label = source_index([np.array([0, 1, 1]), np.array([2, 0])])
    assert split.tolist() == [0, 0, 0, 1, 1]
    assert row.tolist() == [0, 1, 2, 0, 1]
    assert label.tolist() == [0, 1, 1, 4, 2]


def test_cosine_schedule_starts_at_lr_and_halves_midway():
    s = settings(steps=10, lr=0.2, lr_schedule="cosine")
    assert lr_at(0, s) == pytest.approx(0.2)
    assert lr_at(5, s) == pytest.approx(0.1)
    assert lr_at(3, settings(lr_schedule="constant", lr=0.2)) == 0.2


def test_pretraining_learns_the_source_and_keeps_the_best_validated_weights():
    x, y = toy_source()
    eps = episodes_of(x, y)
    lrn = learner()
    before = centroid_accuracy(lrn.backbone, eps, torch.device("cpu"))
    result = pretrain(lrn.backbone, lrn.head, [x], [y], eps, settings(steps=30, lr=0.01), seed=0)
    assert result.steps_done == 30
    assert [c["step"] for c in result.curve] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert result.best_val_acc == max(c["acc"] for c in result.curve)
    assert result.curve[-1]["loss"] < 1.0  # 4-way chance-level loss is ln 4 = 1.39
    after = centroid_accuracy(lrn.backbone, eps, torch.device("cpu"))
    assert after == pytest.approx(result.best_val_acc)  # the kept weights are the best validated ones
    assert after >= before


def test_same_seed_same_weights_other_seed_other_weights():
    x, y = toy_source()
    aug = AugmentParams(enabled=True)
    runs = []
    for seed in (0, 0, 1):
        lrn = learner()
        pretrain(lrn.backbone, lrn.head, [x], [y], [], settings(steps=5, augment=aug), seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in lrn.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_resume_after_a_kill_ends_with_identical_weights(tmp_path):
    # A constant lr makes "6 steps, killed" a prefix of the 8-step run (a cosine
    # schedule depends on the budget), so the resumed run must end bit-identical.
    x, y = toy_source()
    ckpt = CheckpointConfig(folder=tmp_path / "ck", every=3, fingerprint="f")
    whole, resumed = learner(), learner()
    pretrain(whole.backbone, whole.head, [x], [y], [], settings(steps=8, lr_schedule="constant"), seed=0)
    killed = learner()
    pretrain(killed.backbone, killed.head, [x], [y], [], settings(steps=6, lr_schedule="constant"), seed=0,
             checkpoint=ckpt)
    res = pretrain(resumed.backbone, resumed.head, [x], [y], [], settings(steps=8, lr_schedule="constant"), seed=0,
                   checkpoint=ckpt)
    assert res.resumed_from == 6 and res.steps_done == 8
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_settings_and_mismatched_head_are_refused_by_name():
    x, y = toy_source()
    lrn = learner()
    with pytest.raises(PretrainError, match=r"pretrain\.lr: must be a finite number > 0, found -1"):
        pretrain(lrn.backbone, lrn.head, [x], [y], [], settings(lr=-1.0), seed=0)
    with pytest.raises(PretrainError, match="pretrain.optimizer"):
        pretrain(lrn.backbone, lrn.head, [x], [y], [], settings(optimizer="rmsprop"), seed=0)
    with pytest.raises(PretrainError, match="the head has 3 outputs but the sources have 4 classes"):
        small = learner(3)
        pretrain(small.backbone, small.head, [x], [y], [], settings(), seed=0)


def test_non_finite_loss_stops_with_the_step_and_the_key():
    x, y = toy_source()
    lrn = learner()
    with torch.no_grad():
        next(lrn.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(PretrainError, match=r"non-finite loss at step 1; lower pretrain\.lr"):
        pretrain(lrn.backbone, lrn.head, [x], [y], [], settings(), seed=0)


def test_meta_learners_start_from_the_pretrained_backbone():
    pre = learner()
    for algorithm in ("protonet", "anil", "fomaml"):
        torch.manual_seed(1)
        target = build_algorithm(algorithm, SPEC, 5, None, num_classes=4)
        copy_backbone(pre.backbone, target.backbone, "test")
        src, dst = pre.backbone.state_dict(), target.backbone.state_dict()
        assert set(dst) <= set(src)  # MAML-family backbones drop the running statistics
        for k, v in dst.items():
            assert torch.equal(v, src[k]), (algorithm, k)


def test_a_backbone_of_another_shape_is_refused_with_the_keys():
    pre = learner()
    other = build_algorithm("protonet", BackboneSpec(name="conv4", in_channels=3, image_size=16, hidden=16), 5, None)
    with pytest.raises(ConfigError, match=r"shape mismatches \[.*\(8, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
        copy_backbone(pre.backbone, other.backbone, "test")


def test_meta_train_init_pretrained_file_loads_the_verified_weights(tmp_path):
    """meta_train.init: pretrained_file starts θ from model.pretrained (checksum verified)."""
    import copy

    import yaml
    from safetensors.torch import save_file

    from metatransfer.artifacts import sha256_file
    from metatransfer.config import params_from_mapping
    from metatransfer.learners import backbone_spec, init_backbone
    from metatransfer.models import PretrainedWeightsError

    raw = yaml.safe_load(open("params.yaml"))
    spec_params = params_from_mapping(raw)
    torch.manual_seed(3)
    source = build_algorithm("protonet", backbone_spec(spec_params), 5, None)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(weights))
    raw = copy.deepcopy(raw)
    raw["model"]["pretrained"] = {"path": str(weights), "sha256": sha256_file(weights)}
    raw["meta_train"]["init"] = "pretrained_file"
    params = params_from_mapping(raw)
    torch.manual_seed(0)
    learner = build_algorithm("fomaml", backbone_spec(params), 5, None)
    init_backbone(learner, params, tmp_path)
    for k, v in learner.backbone.state_dict().items():
        assert torch.equal(v, source.backbone.state_dict()[k]), k
    raw["model"]["pretrained"]["sha256"] = "0" * 64
    with pytest.raises(PretrainedWeightsError, match="w.safetensors"):
        init_backbone(learner, params_from_mapping(raw), tmp_path)


def test_finetune_augmentation_is_seeded_and_changes_training():
    from metatransfer.training.finetune import FinetuneSettings, finetune

    x, y = toy_source(n_classes=2, per_class=8)
    tx, ty = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
    pre = learner(2)

    def run(aug: AugmentParams) -> torch.Tensor:
        st = FinetuneSettings(steps=4, lr=1e-2, batch_size=8, train_layers="all", eval_every=100, patience=0,
                              augment=aug)
        model = finetune(pre, tx, ty, None, None, ["a", "b"], st, seed=0).model
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    on = AugmentParams(enabled=True, color_jitter=0.3)
    assert torch.equal(run(on), run(on))
    assert not torch.equal(run(on), run(AugmentParams()))
