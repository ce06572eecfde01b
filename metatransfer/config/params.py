"""The run sections of params.yaml (`runtime`, `evaluate`, `promote`) and `Params`, all of params.yaml.

Frozen pydantic models (metatransfer/config/build.py) that describe shape, types, ranges and
choices; defaults live in params.yaml. Checks across keys: metatransfer/config/checks.py.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from metatransfer.config.build import Bool, ConfigModel, Float, Int, Str, bounded
from metatransfer.config.data import DataParams, EpisodesParams, FetchParams, PrepareParams
from metatransfer.config.training import FinetuneParams, MetaTrainParams, ModelParams, PretrainParams


PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 only on CUDA/MPS (metatransfer/runtime.py refuses it on the CPU)


DEVICES = ("auto", "cpu", "cuda", "mps")


class RuntimeParams(ConfigModel):
    """Where and how every stage runs (metatransfer/runtime.py, docs/reproducibility.md).

    device: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" (or "cuda:N") or "mps".
    threads: intra-op CPU threads (torch.set_num_threads, OMP/MKL_NUM_THREADS
        for child processes); 0 = the machine's cores.
    precision: "fp32", "bf16" or "fp16" autocast of training steps (fp16 is
        refused on the CPU).
    deterministic: torch.use_deterministic_algorithms(True) (+ the cuBLAS
        workspace setting on CUDA): an op without a deterministic kernel raises.
    """

    device: Str = "auto"  # DEVICES or cuda:N (checks.py)
    threads: Int = bounded(0, ge=0, hint="0: the machine's cores")
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    deterministic: Bool = True


class EvaluateParams(ConfigModel):
    """Evaluation of every method on the fixed episode sets."""

    methods: tuple[Str, ...]
    reference: Str  # the fine-tuning baseline paired differences are taken against
    confidence: Float = bounded(gt=0, lt=1)


class PromoteParams(ConfigModel):
    """The promotion gate (metatransfer/registry/gate.py, docs/registry.md).

    margin: minimum mean per-fold accuracy gain of the challenger over the reference.
    confidence: level of the paired interval of the per-fold difference.
    n_folds: disjoint held-out test folds cut from each target's test split (not N-way K-shot episodes).
    baseline: finetune method whose target model a first champion must beat.
    """

    # Keys renamed since older params files: an unknown-key error names the new one.
    renamed_keys: ClassVar[dict[str, str]] = {"n_episodes": "n_folds"}

    margin: Float = bounded(ge=0, hint="a minimum gain")
    confidence: Float = bounded(gt=0, lt=1)
    n_folds: Int = bounded(ge=2)
    baseline: Str  # one of finetune.methods (checks.py)
    # The quality gate before registration (docs/reproducibility.md): a target
    # model whose validation accuracy is not significantly above chance, or a
    # learner whose validation-episode CI does not exceed 1/n_way, is not
    # registered as a challenger. Tested at `confidence`.
    quality_gate: Bool = True


class Params(ConfigModel):
    """All of params.yaml."""

    seed: Int
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
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
