"""Distributed meta-training with `torch.distributed`, started by `torchrun`.

`torchrun --nproc_per_node N -m metatransfer.stages.meta_train` starts N
processes (ranks) with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in their environment. `init_from_env` joins them in one process
group (gloo for CPU tensors, NCCL for CUDA tensors); without WORLD_SIZE, or
with WORLD_SIZE=1, it does nothing and the single-process code path runs
unchanged.

How one outer step is split (`meta_train(..., dist_ctx=...)`):

- every rank draws the SAME seeded meta-batch of B episodes and keeps tasks
  r, r+W, r+2W, ... (`DistContext.shard`): the union over ranks is exactly the
  1-process meta-batch, and every rank's sampler stays in step;
- each rank runs `learner.meta_learn` on its B_r tasks, which leaves the mean
  over its own tasks in `.grad`; `reduce_meta_gradient` all-reduces
  (sum over ranks of grad_r * B_r / B) = (sum over all B tasks) / B, the
  1-process mean, and the loss and accuracy the same way;
- every rank then clips and steps the same optimizer on the same gradient, so
  the weights stay identical on all ranks without broadcasting them.

Learners whose BatchNorm statistics span the whole meta-batch (one forward
over every episode: ProtoNet, MatchingNet, RelationNet, Baseline, ...;
`track_running_stats = True`) would see only their own tasks' statistics; in
their `meta_learn` every BatchNorm layer is synchronised across ranks
(`synced_batchnorm`: the batch mean and variance come from an autograd-aware
all-reduce, as `torch.nn.SyncBatchNorm` does, which runs on CUDA only), so the
statistics, the running averages and the gradients are those of the whole
meta-batch. That needs B divisible by W (the per-rank losses are means over
equal shares). The MAML family (per-task BatchNorm statistics) splits any B >= W.

What is equal and what is not: the reduced gradient equals the 1-process one
up to float summation order (about 1e-7 relative in float32); so do the
weights after N steps, up to that error carried through the optimizer.
Learners that draw from torch's global RNG inside `meta_learn` (Reptile with
`inner_batch` below the support size) draw different numbers per rank than
one process would: their runs are valid but not equal to the 1-process run.
TADAM is refused: its FiLM layers call `F.batch_norm` themselves, which this
module cannot synchronise.

Only rank 0 validates, writes checkpoints, metric files and models and logs
to MLflow; the others wait for it at the next collective (a barrier after
each checkpoint write). On resume rank 0 reads (and cleans) the checkpoint
folder first, then the others read the same checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from metatransfer.algorithms.base import MetaLearner, StepResult
from metatransfer.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# FiLM-modulated batch norm (tadam.py) calls F.batch_norm directly: not synchronisable here.
UNSUPPORTED = {"tadam": "its FiLM layers call F.batch_norm directly, so its BatchNorm statistics cannot be "
                        "synchronised across ranks"}


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group.

    Attributes:
        rank: global rank (0 writes every file).
        world_size: number of processes, > 1.
        local_rank: rank on this machine (the CUDA device index with NCCL).
        backend: what `init_process_group` got ("gloo", or "cpu:gloo,cuda:nccl").
        local_world_size: processes on this machine (they share its cores).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that validates and writes files."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a meta-batch: items r, r+W, r+2W, ... (the union over ranks is `items`)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.backend != "gloo" and torch.cuda.is_available():
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then (after a barrier) on the others, e.g. a load that may clean files."""
        if self.is_main:
            out = fn()
            self.barrier()
            return out
        self.barrier()
        return fn()

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's value of `flag` on every rank (decisions taken from rank 0's clock)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.broadcast(t, src=0)
        return bool(t.item() > 0.5)


_current: DistContext | None = None


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ConfigError(f"distributed meta-training: WORLD_SIZE is set but {name} is not; start the stage with "
                          "`torchrun --nproc_per_node N -m metatransfer.stages.meta_train`, which sets "
                          f"{', '.join(ENV_VARS)}")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"distributed meta-training: environment variable {name} must be an integer, "
                          f"found {raw!r}") from None


def world_from_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's variables; None when WORLD_SIZE is absent or 1.

    Raises:
        ConfigError: a variable is missing or not an integer, or the rank is out of range.
    """
    if os.environ.get("WORLD_SIZE") in (None, "", "1"):
        return None
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"distributed meta-training: RANK={rank} must lie in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"distributed meta-training: WORLD_SIZE={world} but {name} is not set; torchrun "
                              "sets it (or export it: the address and a free port of rank 0's machine)")
    return (rank, world, local) if world > 1 else None


def init_from_env() -> DistContext | None:
    """Join the process group torchrun described in the environment (no-op without one).

    The backend is gloo, plus NCCL for CUDA tensors when CUDA is available
    ("cpu:gloo,cuda:nccl"), each rank then using CUDA device LOCAL_RANK.

    Returns:
        The context, or None when WORLD_SIZE is absent or 1 (single process).
    """
    global _current
    if _current is not None:
        return _current
    world = world_from_env()
    if world is None:
        return None
    rank, size, local = world
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=size)
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    _current = DistContext(rank, size, local, backend, local_size)
    log.info("distributed meta-training: rank %d of %d (local rank %d, backend %s)", rank, size, local, backend)
    return _current


def current() -> DistContext | None:
    """The context `init_from_env` set up in this process (None: single process)."""
    return _current


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _current
    if _current is not None and dist.is_initialized():
        dist.destroy_process_group()
    _current = None


@contextlib.contextmanager
def session() -> Iterator[DistContext | None]:
    """`init_from_env()` for the duration of a block, leaving the group at its end if it joined it."""
    joined = _current is None
    ctx = init_from_env()
    try:
        yield ctx
    finally:
        if joined and ctx is not None:
            shutdown()


def share_threads(ctx: DistContext | None, threads: int) -> int:
    """With `runtime.threads: 0` (all cores), give each of the machine's ranks its share of the cores.

    Without it every rank would start one thread per core, N times more
    threads than cores. An explicit `runtime.threads` is kept as it is.

    Returns:
        The intra-op thread count now in effect.
    """
    from metatransfer import runtime

    if ctx is None or threads > 0:
        return torch.get_num_threads()
    return runtime.apply_threads(max(1, runtime.cores() // max(1, ctx.local_world_size)))


def couples_meta_batch(learner: MetaLearner) -> bool:
    """True when the learner's BatchNorm statistics span the meta-batch (they must then be synchronised)."""
    return bool(getattr(learner, "track_running_stats", True)) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in learner.modules())


def check_settings(learner: MetaLearner, meta_batch_size: int, ctx: DistContext, anneal_over_time: bool = False) -> None:
    """Refuse a split this module cannot make equal to the 1-process meta-batch.

    Raises:
        ConfigError: the learner is unsupported, meta_batch_size is below the
            world size (a rank would get no task) or, for learners with
            meta-batch BatchNorm statistics, not a multiple of it; or the
            learning rate anneals over wall time (ranks' clocks differ).
    """
    name = getattr(learner, "name", type(learner).__name__)
    if name in UNSUPPORTED:
        raise ConfigError(f"distributed meta-training does not support {name}: {UNSUPPORTED[name]}; train it in "
                          "one process (python -m metatransfer.stages.meta_train, without torchrun)")
    if meta_batch_size < ctx.world_size:
        raise ConfigError(f"meta_train.meta_batch_size={meta_batch_size} is below the {ctx.world_size} processes "
                          "torchrun started: every rank needs at least one task; raise meta_batch_size or lower "
                          "--nproc_per_node")
    if couples_meta_batch(learner) and meta_batch_size % ctx.world_size:
        raise ConfigError(f"{name}: meta_train.meta_batch_size={meta_batch_size} must be a multiple of the "
                          f"{ctx.world_size} processes: its BatchNorm statistics span the meta-batch and are "
                          "synchronised across ranks, which is exact only for equal shares; change "
                          "meta_batch_size or --nproc_per_node")
    if anneal_over_time:
        raise ConfigError("distributed meta-training: anneal_over_time (a benchmark setting) anneals by each "
                          "rank's own clock and would give ranks different learning rates; anneal over steps")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks.

    The output on every rank is the same sum, so d(sum of all ranks' losses)/d(input
    on rank r) is the sum over ranks of each rank's gradient w.r.t. the output.
    (torch.distributed.nn.functional.all_reduce does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (see `_AllReduceSum`)."""
    return _AllReduceSum.apply(t)


def _synced_forward(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward for `bn` that uses the batch statistics of every rank's batch together."""
    plain = bn.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if not use_batch_stats:
            return plain(x)
        dtype = x.dtype
        x = x.float()  # statistics in float32 also under bf16/fp16 autocast (as the native kernels keep them)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]])
        # Two passes (mean, then centred squares) as the native kernel does, not E[x²]-E[x]².
        first = _all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = first[-1]
        mean = first[:-1] / n
        centred = x - mean.view(shape)
        var = _all_reduce_sum((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.weight is not None:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                assert bn.num_batches_tracked is not None and bn.running_var is not None
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
                unbiased = var.detach() * (n / (n - 1))
                bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y.to(dtype)

    return forward


@contextlib.contextmanager
def synced_batchnorm(learner: MetaLearner, ctx: DistContext | None) -> Iterator[None]:
    """Within the block, the learner's BatchNorm layers in train mode use every rank's batch statistics.

    A no-op without a context or for learners with per-task statistics
    (`couples_meta_batch` False). Only for the `meta_learn` call: every rank
    must run the same forward (the same layers, in the same order).
    """
    if ctx is None or not couples_meta_batch(learner):
        yield
        return
    layers = [m for m in learner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.forward = _synced_forward(m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def reduce_meta_gradient(params: Sequence[torch.Tensor], out: StepResult, own: int, total: int,
                         ctx: DistContext) -> StepResult:
    """Make `.grad` of `params` the meta-gradient of the whole meta-batch on every rank.

    Each rank's `.grad` holds the mean over its `own` tasks; the result is
    sum over ranks of grad_r * own_r / total, the mean over all `total` tasks
    (what one process computes), identical on every rank. A parameter with no
    gradient on any rank keeps `.grad = None`; one with a gradient on some
    ranks only counts zeros on the others. A non-finite gradient or loss on
    any rank makes the result non-finite on every rank, so all skip the step.

    Args:
        params: the meta-parameters (the optimizer's), in the same order on every rank.
        out: this rank's StepResult (the mean over its own tasks).
        own: tasks this rank trained on; total: the meta-batch size.
        ctx: the process group.

    Returns:
        The meta-batch's mean loss and accuracy (identical on every rank).
    """
    device = params[0].device if params else torch.device("cpu")
    weight = own / total
    head = torch.tensor([out.loss * weight, out.acc * weight] + [0.0 if p.grad is None else 1.0 for p in params],
                        dtype=torch.float64, device=device)
    dist.all_reduce(head)
    present = [p for p, n in zip(params, head[2:].tolist()) if n > 0]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in present:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).mul_(weight)
        dist.all_reduce(flat)
        offset = 0
        with torch.no_grad():
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
    loss, acc = head[0].item(), head[1].item()
    return StepResult(loss=float(loss), acc=float(acc))


def spawn_env(rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    """The environment torchrun would give rank `rank` of `world_size` on one machine (for tests and scripts)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
