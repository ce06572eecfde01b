"""Where and how tensors run: device, threads, precision, determinism (params.yaml `runtime:`).

One module owns these decisions so every stage (pretrain, meta_train,
finetune, evaluate) and serving make them the same way:

- `device_for(params)` / `resolve_device(name)`: "auto" picks CUDA, then MPS,
  then CPU; naming a device that is not there is an error, not a silent
  fallback (a run that was meant for a GPU must not quietly take 50x longer).
- `apply(settings)`: `torch.set_num_threads` (0 = the machine's cores) and
  OMP_NUM_THREADS / MKL_NUM_THREADS for child processes (DVC and Prefect start
  stages as subprocesses; without the variables each one would size its
  OpenMP pool by itself); `torch.use_deterministic_algorithms(True)` (plus
  CUBLAS_WORKSPACE_CONFIG on CUDA) when `deterministic` is set; a WARNING when
  the 1-minute load average at start exceeds the cores (the run will be slow,
  not different: budgets are steps).
- `autocast(device, precision)`: the training step's autocast context (bf16 on
  CPU and CUDA, fp16 on CUDA/MPS; fp16 on CPU is refused: CPU autocast to
  float16 is slow and loses accuracy for no gain).
- `run_tags()`: what every MLflow stage run records (device name, torch
  version, threads, CPU model, load average at start).

Serving: weights are always saved from CPU copies (metatransfer/artifacts.py)
and loaded onto the CPU, so a model trained on CUDA or MPS loads anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from metatransfer.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); ":4096:8"
# is the setting NVIDIA documents (the other, ":16:8", costs more speed).
CUBLAS_WORKSPACE = ":4096:8"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class RuntimeSettings:
    """Resolved runtime settings (mirrors `config.RuntimeParams`, usable without params).

    device: "auto", "cpu", "cuda", "cuda:N" or "mps".
    threads: intra-op CPU threads; 0 = the machine's cores.
    precision: "fp32", "bf16" or "fp16" (autocast of the training step).
    deterministic: torch.use_deterministic_algorithms(True).
    """

    device: str = "auto"
    threads: int = 0
    precision: str = "fp32"
    deterministic: bool = True


@dataclass(frozen=True)
class RuntimeInfo:
    """What `apply` did: the device, thread count and load seen at start."""

    device: torch.device
    threads: int
    precision: str
    deterministic: bool
    load_1min: float
    cores: int


_current: RuntimeInfo | None = None


def settings_of(params: Any) -> RuntimeSettings:
    """The runtime settings of loaded `Params` (its `runtime` section, defaults when absent)."""
    section = getattr(params, "runtime", None)
    if section is None:
        return RuntimeSettings()
    return RuntimeSettings(section.device, section.threads, section.precision, section.deterministic)


def cores() -> int:
    """CPU cores this process may use (the affinity mask, e.g. a container's share; else cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def mps_available() -> bool:
    """True when PyTorch can use Apple's Metal (MPS) backend here."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Device types usable here: "cpu" always, then "cuda" and "mps" when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if mps_available():
        out.append("mps")
    return out


def unavailable_reason(device_type: str) -> str | None:
    """Why `device_type` cannot be used here (None when it can): for messages and test skips."""
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if torch.cuda.is_available():
            return None
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"CUDA is not available (torch {torch.__version__} is {build}, or no GPU/driver is visible)"
    if device_type == "mps":
        return None if mps_available() else "MPS (Apple Metal) is not available on this machine"
    return f"unknown device type {device_type!r}; expected one of {list(DEVICES)}"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a `runtime.device` value.

    Args:
        name: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps".

    Raises:
        ConfigError: the device is unknown or not available here (the message says why and what to set).
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ConfigError(f"runtime.device: must be one of {list(DEVICES)} (or cuda:N), found {name!r}")
    reason = unavailable_reason(kind)
    if reason is not None:
        raise ConfigError(f"runtime.device: {name!r} was asked for but {reason}; set runtime.device to "
                          "'auto' or 'cpu' in params.yaml, or run on a machine that has it")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"runtime.device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run usefully.

    Raises:
        ConfigError: unknown precision, or fp16 on CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"runtime.precision: must be one of {list(PRECISIONS)}, found {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("runtime.precision: 'fp16' on the CPU is refused (CPU autocast to float16 is slower "
                          "than fp32 and loses accuracy); use 'bf16' or 'fp32' on the CPU, or set runtime.device "
                          "to 'cuda'/'mps'")


def device_for(params: Any) -> torch.device:
    """The device every stage puts its tensors on, from `params.runtime` (see `resolve_device`).

    Raises:
        ConfigError: the device is not available, or the precision does not fit it.
    """
    s = settings_of(params)
    dev = resolve_device(s.device)
    check_precision(dev, s.precision)
    return dev


def precision_for(params: Any) -> str:
    """The effective training precision: `runtime.precision` (a deprecated non-empty
    `meta_train.precision` from an older params file wins, with a warning)."""
    legacy = getattr(getattr(params, "meta_train", None), "precision", "") or ""
    if legacy:
        log.warning("meta_train.precision is deprecated: it moved to runtime.precision (using %r)", legacy)
        return legacy
    return settings_of(params).precision


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Autocast for one training step: nothing for fp32, bf16/fp16 autocast otherwise.

    Args:
        device: the device the step runs on (its type picks the autocast backend).
        precision: "fp32", "bf16" or "fp16".

    Raises:
        ConfigError: fp16 on the CPU, or an unknown precision.
    """
    dev = torch.device(device) if isinstance(device, str) else device
    check_precision(dev, precision)
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(dev.type, dtype=dtype):
        yield


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads and the OpenMP/MKL variables for child processes.

    Args:
        threads: 0 = the machine's cores (`cores()`), else that many.

    Returns:
        The thread count set.
    """
    n = threads if threads > 0 else cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    return n


def apply_determinism(enabled: bool, device: torch.device) -> None:
    """`torch.use_deterministic_algorithms(enabled)`; on CUDA also the cuBLAS workspace and cuDNN flags.

    An op without a deterministic implementation then raises a RuntimeError
    naming it, instead of silently giving different bits run to run.
    """
    if enabled and device.type == "cuda":
        # Must be set before the first cuBLAS call; a value the user set is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = enabled


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_model()


def apply(settings: RuntimeSettings | Any | None = None, warn_load: bool = True) -> RuntimeInfo:
    """Apply the runtime settings to this process (threads, determinism) and remember them.

    Args:
        settings: a `RuntimeSettings`, loaded `Params` (its `runtime` section), or None (defaults).
        warn_load: log a WARNING when the 1-minute load average exceeds the cores.

    Returns:
        RuntimeInfo (also what `run_tags()` reports afterwards).

    Raises:
        ConfigError: the device is not available or the precision does not fit it.
    """
    global _current
    s = settings if isinstance(settings, RuntimeSettings) else settings_of(settings)
    dev = resolve_device(s.device)
    check_precision(dev, s.precision)
    n = apply_threads(s.threads)
    apply_determinism(s.deterministic, dev)
    load, ncores = load_average(), cores()
    if warn_load and load > ncores:
        log.warning("load average %.2f at start exceeds the %d core(s): other processes compete for the CPU, "
                    "so this run will be slower (its results do not change: budgets are steps). With %d "
                    "threads beside a busy process a training step can be 8-34x slower (benchmarks/RESULTS.md, "
                    "section 4); runtime.threads: 1 avoids that, but results then differ bit-wise from a "
                    "%d-thread run (CPU reductions split by thread)", load, ncores, n, n)
    _current = RuntimeInfo(dev, n, s.precision, s.deterministic, load, ncores)
    return _current


def current() -> RuntimeInfo | None:
    """What the last `apply` in this process resolved (None before any)."""
    return _current


def run_tags(info: RuntimeInfo | None = None) -> dict[str, str]:
    """MLflow tags describing where a run ran: device, torch, threads, CPU, load at start.

    Args:
        info: from `apply` (default: the current one; without one, this process's state).
    """
    info = info or _current
    if info is None:
        dev, threads, load, precision, det = torch.device("cpu"), torch.get_num_threads(), load_average(), "", ""
    else:
        dev, threads, load, precision, det = info.device, info.threads, info.load_1min, info.precision, str(info.deterministic).lower()
    return {
        "runtime.device": str(dev),
        "runtime.device_name": device_name(dev),
        "runtime.torch_version": torch.__version__,
        "runtime.threads": str(threads),
        "runtime.cpu_model": cpu_model(),
        "runtime.cores": str(cores()),
        "runtime.load_1min_at_start": f"{load:.2f}",
        "runtime.precision": precision,
        "runtime.deterministic": det,
    }
