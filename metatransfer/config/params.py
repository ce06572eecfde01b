"""The run sections of params.yaml (`runtime`, `evaluate`, `promote`) and `Params`, all of params.yaml.

Frozen dataclasses that describe shape and types only; defaults live in
params.yaml. Loading and checks: metatransfer/config/build.py, checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metatransfer.config.data import DataParams, EpisodesParams, FetchParams, PrepareParams
from metatransfer.config.training import FinetuneParams, MetaTrainParams, ModelParams, PretrainParams


PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 only on CUDA/MPS (metatransfer/runtime.py refuses it on the CPU)


DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class RuntimeParams:
    """Where and how every stage runs (metatransfer/runtime.py, docs/reproducibility.md).

    device: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" (or "cuda:N") or "mps".
    threads: intra-op CPU threads (torch.set_num_threads, OMP/MKL_NUM_THREADS
        for child processes); 0 = the machine's cores.
    precision: "fp32", "bf16" or "fp16" autocast of training steps (fp16 is
        refused on the CPU).
    deterministic: torch.use_deterministic_algorithms(True) (+ the cuBLAS
        workspace setting on CUDA): an op without a deterministic kernel raises.
    """

    device: str = "auto"
    threads: int = 0
    precision: str = "fp32"
    deterministic: bool = True


@dataclass(frozen=True)
class EvaluateParams:
    """Evaluation of every method on the fixed episode sets."""

    methods: tuple[str, ...]
    reference: str  # the fine-tuning baseline paired differences are taken against
    confidence: float


@dataclass(frozen=True)
class PromoteParams:
    """The promotion gate (metatransfer/registry/gate.py, docs/registry.md).

    margin: minimum mean per-episode accuracy gain of the challenger over the reference.
    confidence: level of the paired interval of the per-episode difference.
    n_episodes: disjoint held-out episodes cut from each target's test split.
    baseline: finetune method whose target model a first champion must beat.
    """

    margin: float
    confidence: float
    n_episodes: int
    baseline: str
    # The quality gate before registration (docs/reproducibility.md): a target
    # model whose validation accuracy is not significantly above chance, or a
    # learner whose validation-episode CI does not exceed 1/n_way, is not
    # registered as a challenger. Tested at `confidence`.
    quality_gate: bool = True


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    seed: int
    data: DataParams
    fetch: FetchParams
    prepare: PrepareParams
    model: ModelParams
    episodes: EpisodesParams | None = None
    pretrain: PretrainParams | None = None
    meta_train: MetaTrainParams | None = None
    finetune: FinetuneParams | None = None
    evaluate: EvaluateParams | None = None
    promote: PromoteParams | None = None
    # Device, threads, precision, determinism of every stage (defaults: old params files load).
    runtime: RuntimeParams = field(default_factory=lambda: RuntimeParams())
