"""Distributed meta-training: 2 processes (gloo, CPU, loopback) equal 1 process.

Two ranks started with torch.multiprocessing (the environment torchrun would
set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free port) split
each seeded meta-batch (rank r takes tasks r, r+2, ...) and all-reduce the
meta-gradients. Checked against one process over the whole meta-batch:

- the meta-gradient of one meta-batch, and the weights after STEPS steps, for
  ProtoNet (BatchNorm statistics over the whole meta-batch, synchronised
  across ranks) and MAML (second order; per-task statistics);
- checkpoint + resume under 2 processes gives the same final weights as an
  uninterrupted 2-process run (bit for bit: same world size, same order);
- rank 0 alone writes checkpoints.

Tolerance: the sums run in another order (per rank, then across ranks;
ProtoNet's BatchNorm statistics from all-reduced sums instead of the native
kernel), so float32 results differ by rounding: gradients are compared with
rtol 1e-4, atol 1e-5 (measured: at most 8e-6 absolute on gradients up to 1.4).
Weights after STEPS Adam steps: atol 1e-6 (measured: at most 6e-8), except
parameters whose true gradient is zero (1-process gradient below 1e-5: the
conv biases under BatchNorm, ProtoNet's last BatchNorm bias, which shifts
every embedding alike) and the running means that follow those biases. Adam
divides each gradient element by its running RMS, which turns rounding noise
into steps of about the learning rate either way: two runs can part by twice
that per step, so those are held to 2 x STEPS x meta_lr = 8e-3 only
(measured: up to 4.8e-3).
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from metatransfer.algorithms import build_algorithm
from metatransfer.data.store import SplitData
from metatransfer.episodes import Episode, EpisodeSampler
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec
from metatransfer.training import distributed
from metatransfer.training.checkpoint import CheckpointConfig, load_latest
from metatransfer.training.meta_train import TrainSettings, meta_train

pytestmark = pytest.mark.slow

TINY = BackboneSpec(name="conv4", in_channels=1, image_size=16, hidden=4)
ALGORITHMS = ("protonet", "maml")
WORLD = 2
META_BATCH = 4
STEPS = 4
LR = 1e-3
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
WEIGHT_TOL = 1e-6
ZERO_GRAD = 1e-5  # a 1-process gradient below this is rounding noise around a true zero
NOISE_TOL = 2 * STEPS * LR



class Crash(Exception):
    """Stands for a kill after step 3 (the checkpoint of step 2 is on disk)."""


def split(seed: int = 0, classes: int = 12, per_class: int = 6) -> SplitData:
    rng = np.random.default_rng(seed)
    return SplitData(
        dataset="synthetic", split="meta_train",
        images=rng.integers(0, 256, (classes * per_class, 1, 16, 16), dtype=np.uint8),
        labels=np.repeat(np.arange(classes), per_class),
        class_names=tuple(f"c{i}" for i in range(classes)),
    )


def sampler() -> EpisodeSampler:
    return EpisodeSampler(split(), n_way=3, k_shot=1, n_query=2, seed=0)


def val_episodes() -> list[Episode]:
    s = EpisodeSampler(split(1), n_way=3, k_shot=1, n_query=2, seed=5)
    return [s.sample() for _ in range(2)]


def learner(algorithm: str):
    torch.manual_seed(0)
    return build_algorithm(algorithm, TINY, 3, {"first_order": False} if algorithm == "maml" else None)


def settings() -> TrainSettings:
    # select_best=False: every rank ends with the last weights (only rank 0 validates and selects).
    return TrainSettings(steps=STEPS, meta_batch_size=META_BATCH, meta_lr=LR, val_every=2, select_best=False)


def meta_gradient(algorithm: str, ctx: distributed.DistContext | None) -> dict[str, torch.Tensor]:
    """The meta-gradient of the first meta-batch (this rank's share, all-reduced, under a context)."""
    model = learner(algorithm)
    model.train()
    episodes = _batch()
    own = episodes if ctx is None else ctx.shard(episodes)
    params = [p for p in model.parameters() if p.requires_grad]
    with distributed.synced_batchnorm(model, ctx):
        out = model.meta_learn(own)
    if ctx is not None:
        distributed.reduce_meta_gradient(params, out, len(own), len(episodes), ctx)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _batch() -> list[Episode]:
    s = sampler()
    return [s.sample() for _ in range(META_BATCH)]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank: int, port: int, out: Path) -> None:
    """One rank: meta-gradients, an uninterrupted run, a crashed run and its resume, per algorithm."""
    import os

    os.environ.update(distributed.spawn_env(rank, WORLD, port))
    torch.set_num_threads(1)
    ctx = distributed.init_from_env()
    assert ctx is not None and ctx.rank == rank and ctx.backend == "gloo"
    results: dict[str, object] = {}
    try:
        for algorithm in ALGORITHMS:
            results[f"{algorithm}/grad"] = meta_gradient(algorithm, ctx)
            # Uninterrupted, each rank given its own checkpoint folder: only rank 0's may appear.
            own = CheckpointConfig(folder=out / f"{algorithm}-own-rank{rank}", every=2, fingerprint="f")
            r = meta_train(learner(algorithm), sampler().sample, val_episodes(), settings(), checkpoint=own, dist_ctx=ctx)
            results[f"{algorithm}/weights"] = weights(r.learner)
            results[f"{algorithm}/history"] = r.history
            results[f"{algorithm}/val_curve"] = [(v["step"], v["acc"]) for v in r.val_curve]
            # Crash after step 3 (checkpoint at 2), then resume from the folder both ranks share.
            shared = CheckpointConfig(folder=out / f"{algorithm}-shared", every=2, fingerprint="f")

            def crash(step: int, loss: float, acc: float) -> None:
                if step == 3:
                    raise Crash

            try:
                meta_train(learner(algorithm), sampler().sample, val_episodes(), settings(), checkpoint=shared,
                           dist_ctx=ctx, on_step=crash)
            except Crash:
                pass
            r2 = meta_train(learner(algorithm), sampler().sample, val_episodes(), settings(), checkpoint=shared,
                            dist_ctx=ctx)
            results[f"{algorithm}/resumed_from"] = r2.resumed_from
            results[f"{algorithm}/resumed"] = weights(r2.learner)
    finally:
        distributed.shutdown()
    torch.save(results, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def single(algorithm: str):
    return meta_train(learner(algorithm), sampler().sample, val_episodes(), settings())


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_ranks_give_the_one_process_meta_gradient(ranks, algorithm: str) -> None:
    _, res = ranks
    expected = meta_gradient(algorithm, None)
    for r in range(WORLD):
        assert_close(res[r][f"{algorithm}/grad"], expected, **GRAD_TOL)
    # Identical on every rank (the all-reduce gives every rank the same sum), bit for bit.
    for k, v in res[0][f"{algorithm}/grad"].items():
        assert torch.equal(v, res[1][f"{algorithm}/grad"][k]), k


def test_each_rank_computes_only_part_of_the_meta_batch() -> None:
    """Without the all-reduce, one rank's share gives another gradient: the reduction is what makes them equal."""
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0, backend="gloo")
    model = learner("maml")
    model.meta_learn(ctx.shard(_batch()))
    partial = {n: p.grad for n, p in model.named_parameters()}
    full = meta_gradient("maml", None)
    assert any((partial[k] - full[k]).abs().max() > 1e-4 for k in full)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_ranks_train_the_same_weights_as_one_process(ranks, algorithm: str) -> None:
    _, res = ranks
    one = single(algorithm)
    expected = weights(one.learner)
    got = res[0][f"{algorithm}/weights"]
    noise = {k for k, g in meta_gradient(algorithm, None).items() if g.abs().max() < ZERO_GRAD}
    assert got.keys() == expected.keys()
    for k in expected:
        diff = (got[k].float() - expected[k].float()).abs().max().item()
        # Zero true gradient: Adam steps of up to ±LR on rounding noise (module doc).
        tol = NOISE_TOL if k in noise or k.endswith("running_mean") else WEIGHT_TOL
        assert diff <= tol, f"{algorithm} {k}: max |2 ranks - 1 process| = {diff:.3g} > {tol:.3g}"
    assert len(noise) < len(expected) // 3  # most of the weights are held to WEIGHT_TOL
    # Both ranks hold the same weights, bit for bit.
    for k, v in got.items():
        assert torch.equal(v, res[1][f"{algorithm}/weights"][k]), k
    # The logged loss is the meta-batch mean, equal on both ranks.
    h0, h1 = res[0][f"{algorithm}/history"], res[1][f"{algorithm}/history"]
    assert [h["step"] for h in h0] == list(range(1, STEPS + 1)) and h0 == h1
    np.testing.assert_allclose([h["loss"] for h in h0], [h["loss"] for h in one.history], rtol=1e-4)
    # Only rank 0 validates.
    assert [s for s, _ in res[0][f"{algorithm}/val_curve"]] == [2, 4] and res[1][f"{algorithm}/val_curve"] == []


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_under_two_ranks_equals_an_uninterrupted_run(ranks, algorithm: str) -> None:
    out, res = ranks
    assert res[0][f"{algorithm}/resumed_from"] == 2 and res[1][f"{algorithm}/resumed_from"] == 2
    for r in range(WORLD):
        for k, v in res[r][f"{algorithm}/weights"].items():
            assert torch.equal(res[r][f"{algorithm}/resumed"][k], v), f"rank {r} {k}"
    # Rank 0 alone writes: its folder holds the final checkpoint (step 4), rank 1's was never created.
    newest = load_latest(CheckpointConfig(folder=out / f"{algorithm}-own-rank0", every=2, fingerprint="f"))
    assert newest is not None and newest.step == STEPS and newest.state["final"] is True
    assert not (out / f"{algorithm}-own-rank1").exists()


def test_no_process_group_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in distributed.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but MASTER_ADDR is not set; torchrun sets it"):
        distributed.init_from_env()


def test_uneven_split_is_refused_where_batchnorm_spans_the_meta_batch() -> None:
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0, backend="gloo")
    with pytest.raises(ConfigError, match=r"protonet: meta_train.meta_batch_size=3 must be a multiple of the 2"):
        distributed.check_settings(learner("protonet"), 3, ctx)
    distributed.check_settings(learner("maml"), 3, ctx)  # per-task statistics: any split is exact
    with pytest.raises(ConfigError, match=r"meta_batch_size=1 is below the 2 processes"):
        distributed.check_settings(learner("maml"), 1, ctx)
