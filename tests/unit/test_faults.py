"""The meta-training loop's fault detection and rollback: the fused finiteness
check is exact, and a step that overflows a weight (finite gradients, so it is
only seen after the optimizer step) is undone exactly, even twice in a row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from metatransfer.algorithms.base import StepResult
from metatransfer.algorithms.protonet import ProtoNet
from metatransfer.data.store import SplitData
from metatransfer.episodes import Episode, EpisodeSampler
from metatransfer.models import BackboneSpec
from metatransfer.training.checkpoint import optimizer_state
from metatransfer.training.meta_train import TrainSettings, all_finite, meta_train

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_all_finite_is_exact_per_element() -> None:
    big = torch.full((4,), 3e38)  # finite, but its 2-norm would overflow: must not count as a fault
    assert all_finite([big, torch.zeros(2, dtype=torch.bfloat16), None, torch.empty(0)])
    assert all_finite([])
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(5)
        t[3] = bad
        assert not all_finite([big, t]), bad
        assert not all_finite([torch.tensor([bad, 1.0])]), bad  # NaN first: a max must still see it


def sampler() -> EpisodeSampler:
    rng = np.random.default_rng(0)
    data = SplitData(
        dataset="synthetic", split="meta_train",
        images=rng.integers(0, 256, (72, 1, 16, 16), dtype=np.uint8),
        labels=np.repeat(np.arange(12), 6), class_names=tuple(f"c{i}" for i in range(12)),
    )
    return EpisodeSampler(data, n_way=3, k_shot=1, n_query=2, seed=0)


class OverflowingProtoNet(ProtoNet):
    """ProtoNet with a momentum-SGD outer optimizer (state updated in place) whose
    meta_learn calls in `overflow` leave a finite gradient of 3e38 on one weight:
    the optimizer step (lr 10) then overflows that weight to inf."""

    def __init__(self, *a, overflow: set[int], **kw) -> None:
        super().__init__(*a, **kw)
        self.calls, self.overflow = 0, overflow
        self.seen: list[dict[str, torch.Tensor]] = []
        self.seen_optimizer: list[dict] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def outer_optimizer(self, lr: float) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        return self.optimizer

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        self.calls += 1
        self.seen.append({k: v.clone() for k, v in self.state_dict().items()})
        state = optimizer_state(self.optimizer)["state"]
        self.seen_optimizer.append({k: {n: v.clone() for n, v in s.items()} for k, s in state.items()})
        out = super().meta_learn(episodes)
        if self.calls in self.overflow:
            next(self.parameters()).grad.view(-1)[0] = 3e38
        return out


@pytest.mark.parametrize("overflow", [{1}, {3}, {3, 4}])
def test_overflowed_weight_is_rolled_back_exactly(overflow: set[int]) -> None:
    torch.manual_seed(0)
    learner = OverflowingProtoNet(TINY, 3, ProtoNet.hparams_class(), overflow=overflow)
    settings = TrainSettings(steps=5, meta_batch_size=2, meta_lr=10.0, val_every=100, grad_clip=0.0,
                             max_consecutive_faults=3)
    result = meta_train(learner, sampler().sample, [], settings)
    assert result.faults == len(overflow) and result.steps_done == 5 and learner.calls == 5 + len(overflow)
    # Each call after a faulty one starts from exactly the state before it: weights,
    # BatchNorm statistics and the optimizer's momentum (absent before the first step).
    for bad in sorted(overflow):
        before, after = learner.seen[bad - 1], learner.seen[bad]
        assert before.keys() == after.keys()
        for k, v in before.items():
            assert torch.equal(after[k], v), k
        assert learner.seen_optimizer[bad].keys() == learner.seen_optimizer[bad - 1].keys()
        for k, s in learner.seen_optimizer[bad - 1].items():
            for n, v in s.items():
                assert torch.equal(learner.seen_optimizer[bad][k][n], v), (k, n)
    assert all(torch.isfinite(p).all() for p in learner.parameters())
