"""The meta-training loop: numerical-fault recovery (outer and inner loop) and
bit-identical resume from checkpoints after a crash."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from metatransfer.algorithms import build_algorithm
from metatransfer.algorithms.base import StepResult
from metatransfer.algorithms.protonet import ProtoNet
from metatransfer.data.store import SplitData
from metatransfer.episodes import Episode, EpisodeSampler
from metatransfer.models import BackboneSpec
from metatransfer.training.checkpoint import CheckpointConfig, checkpoint_dirs
from metatransfer.training.meta_train import NumericalFaultError, TrainSettings, meta_train

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def split(seed: int = 0, classes: int = 12, per_class: int = 6) -> SplitData:
    rng = np.random.default_rng(seed)
    return SplitData(
        dataset="synthetic", split="meta_train",
        images=rng.integers(0, 256, (classes * per_class, 1, 16, 16), dtype=np.uint8),
        labels=np.repeat(np.arange(classes), per_class),
        class_names=tuple(f"c{i}" for i in range(classes)),
    )


def sampler(seed: int = 0) -> EpisodeSampler:
    return EpisodeSampler(split(), n_way=3, k_shot=1, n_query=2, seed=seed)


def val_episodes() -> list[Episode]:
    s = EpisodeSampler(split(1), n_way=3, k_shot=1, n_query=2, seed=5)
    return [s.sample() for _ in range(2)]


def settings(**kw) -> TrainSettings:
    base = dict(steps=6, meta_batch_size=2, meta_lr=1e-2, val_every=2, max_consecutive_faults=3)
    base.update(kw)
    return TrainSettings(**base)


class Recorder:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int]] = []

    def __call__(self, name: str, value: float, step: int) -> None:
        self.rows.append((name, value, step))

    def of(self, name: str) -> list[tuple[float, int]]:
        return [(v, s) for n, v, s in self.rows if n == name]


class FaultyProtoNet(ProtoNet):
    """ProtoNet whose meta_learn call numbers in `nan_loss` return a NaN loss and
    in `nan_grad` leave a NaN gradient (with a finite loss)."""

    def __init__(self, *a, nan_loss=(), nan_grad=(), **kw) -> None:
        super().__init__(*a, **kw)
        self.calls, self.nan_loss, self.nan_grad = 0, set(nan_loss), set(nan_grad)
        self.seen: list[dict[str, torch.Tensor]] = []

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        self.calls += 1
        self.seen.append(copy.deepcopy(self.state_dict()))
        out = super().meta_learn(episodes)
        if self.calls in self.nan_grad:
            next(self.parameters()).grad.view(-1)[0] = float("nan")
        if self.calls in self.nan_loss:
            return StepResult(float("nan"), out.acc)
        return out


def faulty(**kw) -> FaultyProtoNet:
    torch.manual_seed(0)
    return FaultyProtoNet(backbone=TINY, n_way=3, hparams=ProtoNet.hparams_class(), **kw)


def test_nan_loss_and_nan_grad_are_skipped_and_state_restored() -> None:
    learner = faulty(nan_loss={2}, nan_grad={4})
    sink = Recorder()
    result = meta_train(learner, sampler().sample, [], settings(steps=4), sink=sink)
    assert learner.calls == 6 and result.steps_done == 4 and result.faults == 2
    # The call after a faulty one starts from exactly the state before it.
    for bad in (2, 4):
        for k, v in learner.seen[bad - 1].items():
            assert torch.equal(learner.seen[bad][k], v), k
    assert sink.of("meta_train/nonfinite_skips") == [(1.0, 1), (2.0, 2)]
    assert [s for _, s in sink.of("meta_train/loss")] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v, _ in sink.of("meta_train/loss"))


def test_k_consecutive_faults_stop_with_a_clear_error() -> None:
    learner = faulty(nan_loss={3, 4, 5})
    with pytest.raises(NumericalFaultError) as info:
        meta_train(learner, sampler().sample, [], settings(max_consecutive_faults=3))
    msg = str(info.value)
    assert "3 consecutive steps" in msg and "at step 3" in msg
    assert "meta_train.max_consecutive_faults=3" in msg and "meta_train.meta_lr" in msg


def test_non_consecutive_faults_do_not_stop_the_run() -> None:
    learner = faulty(nan_loss={1, 2, 4, 5, 7, 8})  # never 3 in a row
    result = meta_train(learner, sampler().sample, [], settings(steps=4, max_consecutive_faults=3))
    assert result.steps_done == 4 and result.faults == 6


def test_absurd_inner_lr_is_caught_in_the_first_step_and_stops_after_k() -> None:
    torch.manual_seed(0)
    learner = build_algorithm("maml", TINY, 3, {"inner_lr": 1e30, "inner_steps": 1})
    before = copy.deepcopy(learner.state_dict())
    sink = Recorder()
    with pytest.raises(NumericalFaultError, match="2 consecutive steps .* at step 1;"):
        meta_train(learner, sampler().sample, [], settings(max_consecutive_faults=2), sink=sink)
    assert sink.of("meta_train/nonfinite_skips") == [(1.0, 0), (2.0, 0)]  # no step ever completed
    assert sink.of("meta_train/loss") == []
    for k, v in before.items():
        assert torch.equal(learner.state_dict()[k], v), k


def test_inner_loop_fault_is_detected_in_the_same_step() -> None:
    """A NaN in one episode's support set poisons only MAML's inner loop (adapted
    weights); the outer step that used it is the one skipped."""
    torch.manual_seed(0)
    learner = build_algorithm("maml", TINY, 3, {"inner_lr": 0.1, "inner_steps": 1})
    base = sampler()
    draws = {"n": 0}

    def poisoned() -> Episode:
        draws["n"] += 1
        ep = base.sample()
        if draws["n"] == 5:  # the first episode of step 3 (meta-batch 2)
            sx = ep.support_x.clone()
            sx[0, 0, 0, 0] = float("nan")
            ep = Episode(sx, ep.support_y, ep.query_x, ep.query_y, ep.n_way, ep.classes)
        return ep

    sink = Recorder()
    result = meta_train(learner, poisoned, [], settings(steps=4), sink=sink)
    assert result.faults == 1 and result.steps_done == 4
    assert sink.of("meta_train/nonfinite_skips") == [(1.0, 2)]  # after 2 good steps, i.e. in step 3
    assert all(torch.isfinite(p).all() for p in learner.parameters())


class Crash(Exception):
    pass


def train(algorithm: str, ck: CheckpointConfig | None, crash_at: int | None = None, steps: int = 7):
    torch.manual_seed(0)
    learner = build_algorithm(algorithm, TINY, 3, {}, num_classes=12)

    def on_step(step: int, loss: float, acc: float) -> None:
        if crash_at is not None and step == crash_at:
            raise Crash

    return meta_train(learner, sampler().sample, val_episodes(), settings(steps=steps), on_step=on_step, checkpoint=ck)


def strip_seconds(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in curve]


@pytest.mark.parametrize("algorithm", ["protonet", "maml", "baselinepp"])
def test_crash_and_resume_is_bit_identical(tmp_path: Path, algorithm: str) -> None:
    ref = train(algorithm, None)
    ck = CheckpointConfig(tmp_path / algorithm, every=2, fingerprint="f")
    with pytest.raises(Crash):
        train(algorithm, ck, crash_at=5)  # checkpoints at 2 and 4; step 5 is lost
    assert [p.name for p in checkpoint_dirs(ck.folder)] == ["step-000000004", "step-000000002"]
    resumed = train(algorithm, ck)
    assert resumed.resumed_from == 4 and resumed.steps_done == 7
    for (k, a), b in zip(ref.learner.state_dict().items(), resumed.learner.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.history == ref.history
    assert strip_seconds(resumed.val_curve) == strip_seconds(ref.val_curve)
    assert (resumed.best_step, resumed.best_val_acc) == (ref.best_step, ref.best_val_acc)


def test_resume_from_final_checkpoint_does_no_steps(tmp_path: Path) -> None:
    ck = CheckpointConfig(tmp_path / "p", every=3, fingerprint="f")
    first = train("protonet", ck)
    assert [p.name for p in checkpoint_dirs(ck.folder)] == ["step-000000007", "step-000000006"]
    sink = Recorder()
    torch.manual_seed(0)
    learner = build_algorithm("protonet", TINY, 3, {})
    again = meta_train(learner, sampler().sample, val_episodes(), settings(steps=7), sink=sink, checkpoint=ck)
    assert again.resumed_from == 7 and sink.rows == []  # nothing trained or validated again
    for a, b in zip(first.learner.state_dict().values(), again.learner.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path) -> None:
    train("protonet", CheckpointConfig(tmp_path / "p", every=2, fingerprint="lr=0.1"), steps=4)
    result = train("protonet", CheckpointConfig(tmp_path / "p", every=2, fingerprint="lr=0.2"), steps=4)
    assert result.resumed_from is None and result.steps_done == 4


def test_finetune_crash_and_resume_is_bit_identical(tmp_path: Path) -> None:
    from metatransfer.training.finetune import FinetuneSettings, finetune

    torch.manual_seed(0)
    learner = build_algorithm("protonet", TINY, 3, {})
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(18, 1, 16, 16, generator=gen), torch.arange(3).repeat(6)
    vx, vy = torch.rand(9, 1, 16, 16, generator=gen), torch.arange(3).repeat(3)
    st = FinetuneSettings(steps=9, lr=1e-2, batch_size=6, train_layers="all", eval_every=2, patience=0)

    def run(ck: CheckpointConfig | None, crash_at: int | None = None):
        def sink(name: str, value: float, step: int) -> None:
            if crash_at is not None and name == "finetune/loss" and step == crash_at:
                raise Crash

        return finetune(learner, x, y, vx, vy, ["a", "b", "c"], st, seed=3, sink=sink, checkpoint=ck)

    ref = run(None)
    ck = CheckpointConfig(tmp_path / "ft", every=3, fingerprint="f")
    with pytest.raises(Crash):
        run(ck, crash_at=5)
    assert [p.name for p in checkpoint_dirs(ck.folder)] == ["step-000000003"]
    resumed = run(ck)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert (resumed.val_acc, resumed.best_step, resumed.steps_done, resumed.curve) == \
        (ref.val_acc, ref.best_step, ref.steps_done, ref.curve)


# --------------------------------------------------------------- speed/accuracy levers
class UnitGradProtoNet(ProtoNet):
    """A ProtoNet whose step sets every gradient to 1 and whose outer optimizer is
    plain SGD, so each step moves every weight by exactly the current learning rate."""

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        for p in self.parameters():
            p.grad = torch.ones_like(p)
        return StepResult(1.0, 0.5)

    def outer_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=lr)


def test_cosine_schedule_anneals_the_outer_lr_over_the_step_budget() -> None:
    torch.manual_seed(0)
    learner = UnitGradProtoNet(TINY, 3, ProtoNet.hparams_class())
    weight = learner.backbone.encoder[0][0].weight
    seen = [weight.detach().clone()]
    meta_train(learner, sampler().sample, [], settings(steps=4, meta_lr=0.1, grad_clip=0.0, lr_schedule="cosine"),
               on_step=lambda step, loss, acc: seen.append(weight.detach().clone()))
    moves = [float((a - b).mean()) for a, b in zip(seen, seen[1:])]
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]  # 0.1, 0.0854, 0.05, 0.0146
    assert moves == pytest.approx(expected, rel=1e-5)


def test_lr_factor_follows_the_steps_and_ignores_the_time_guard() -> None:
    from metatransfer.training.meta_train import lr_factor

    s = TrainSettings(steps=100, meta_batch_size=1, meta_lr=1e-3, val_every=10, time_budget_s=60.0, lr_schedule="cosine")
    assert lr_factor(s, 0, 0.0) == 1.0
    assert lr_factor(s, 50, 1.0) == pytest.approx(0.5)       # half the steps
    assert lr_factor(s, 1, 30.0) == pytest.approx(lr_factor(s, 1, 0.0))  # seconds change nothing: reproducible
    assert lr_factor(s, 100, 90.0) == pytest.approx(0.0)     # clamped at the end
    assert lr_factor(settings(), 3, 1e9) == 1.0              # constant ignores the budget
    # Benchmarks comparing at equal wall time anneal over whichever budget ends first.
    t = TrainSettings(steps=100, meta_batch_size=1, meta_lr=1e-3, val_every=10, time_budget_s=60.0,
                      lr_schedule="cosine", anneal_over_time=True)
    assert lr_factor(t, 1, 30.0) == pytest.approx(0.5)


def test_bad_schedule_or_precision_is_refused_by_name() -> None:
    from metatransfer.errors import MetatransferError

    with pytest.raises(MetatransferError, match=r"lr_schedule must be one of \['constant', 'cosine'\], found 'step'"):
        settings(lr_schedule="step")
    with pytest.raises(MetatransferError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\], found 'fp8'"):
        settings(precision="fp8")


def test_bf16_channels_last_training_returns_a_float32_contiguous_learner(tmp_path: Path) -> None:
    from metatransfer.artifacts import save_learner

    torch.manual_seed(0)
    learner = ProtoNet(TINY, 3, ProtoNet.hparams_class())
    before = copy.deepcopy(learner.state_dict())
    result = meta_train(learner, sampler().sample, val_episodes(), settings(precision="bf16", channels_last=True))
    assert result.steps_done == 6 and result.faults == 0
    state = learner.state_dict()
    assert all(v.dtype == before[k].dtype and v.is_contiguous() for k, v in state.items())
    assert any(not torch.equal(v, before[k]) for k, v in state.items())  # it did train
    save_learner(learner, tmp_path / "m")  # safetensors refuses non-contiguous tensors


def test_select_best_false_keeps_the_last_weights() -> None:
    def run(val, select_best):
        torch.manual_seed(0)
        learner = ProtoNet(TINY, 3, ProtoNet.hparams_class())
        result = meta_train(learner, sampler().sample, val, settings(val_every=1, select_best=select_best))
        return learner.state_dict(), result

    last, _ = run([], True)                       # no validation: the last weights
    kept, result = run(val_episodes(), False)
    assert len(result.val_curve) == 6
    assert all(torch.equal(v, last[k]) for k, v in kept.items())


class FakeClock:
    """Seconds that pass only when the test says so: 0.1 s per training step, 5 s per validation."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_guard_counts_training_steps_not_validation_and_is_marked(monkeypatch, caplog) -> None:
    import metatransfer.training.meta_train as trainer

    clock = FakeClock()
    real = trainer.episode_accuracies

    def slow_validation(learner, episodes, **kw):
        clock.now += 5.0  # validation is slow; it must not eat the training budget
        return real(learner, episodes, **kw)

    monkeypatch.setattr(trainer, "episode_accuracies", slow_validation)
    torch.manual_seed(0)
    learner = ProtoNet(TINY, 3, ProtoNet.hparams_class())

    def tick(step, loss, acc):
        clock.now += 0.1

    with caplog.at_level("WARNING", logger="metatransfer.training.meta_train"):
        result = meta_train(learner, sampler().sample, val_episodes(),
                            settings(steps=100, val_every=2, time_budget_s=1.0), on_step=tick, clock=clock)
    # 1.0 s of training = 10 steps of 0.1 s (had validation counted, it would stop after 2).
    assert result.steps_done == 10 and result.budget_hit == "time"
    assert result.train_seconds == pytest.approx(1.0)
    assert result.seconds - result.train_seconds == pytest.approx(5.0 * len(result.val_curve))
    assert [p["step"] for p in result.val_curve] == [2, 4, 6, 8, 10]
    assert [p["seconds"] for p in result.val_curve] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert "the wall-clock guard (time_budget_s=1) ended meta-training after 10 of 100 steps" in caplog.text


def test_the_step_budget_ends_a_run_unmarked_whatever_the_clock(caplog) -> None:
    clock = FakeClock()

    def tick(step, loss, acc):
        clock.now += 1000.0  # a very loaded machine: without a guard it only takes longer

    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="metatransfer.training.meta_train"):
        slow = meta_train(ProtoNet(TINY, 3, ProtoNet.hparams_class()), sampler().sample, val_episodes(),
                          settings(), on_step=tick, clock=clock)
    torch.manual_seed(0)
    fast = meta_train(ProtoNet(TINY, 3, ProtoNet.hparams_class()), sampler().sample, val_episodes(), settings())
    assert slow.steps_done == fast.steps_done == 6 and slow.budget_hit == fast.budget_hit == ""
    assert "wall-clock guard" not in caplog.text
    assert all(torch.equal(v, fast.learner.state_dict()[k]) for k, v in slow.learner.state_dict().items())
    # The evidence of the learner quality gate: per-episode accuracies of the best validation.
    assert len(slow.best_val_episode_accs) == len(val_episodes())
    assert np.mean(slow.best_val_episode_accs) == pytest.approx(slow.best_val_acc)
