"""params.yaml `runtime:`: device resolution, threads, precision refusals, determinism, run tags,
the load warning; and the `runtime` section's validation."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from metatransfer import runtime
from metatransfer.config import params_from_mapping
from metatransfer.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.fixture()
def restore_torch_state():
    """apply() changes process-wide settings: put them back for the other tests."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    env = {k: os.environ.get(k) for k in runtime.THREAD_ENV}
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_old_params_without_runtime_load_with_the_defaults(raw: dict) -> None:
    raw.pop("runtime")
    raw["meta_train"].pop("time_budget_s", None)
    p = params_from_mapping(raw)
    assert (p.runtime.device, p.runtime.threads, p.runtime.precision, p.runtime.deterministic) == ("auto", 0, "fp32", True)
    assert p.meta_train.time_budget_s == 0.0  # no wall-clock guard unless asked for


def test_default_params_have_no_wall_clock_budget(raw: dict) -> None:
    assert "time_budget_s" not in raw["meta_train"]
    assert params_from_mapping(raw).meta_train.time_budget_s == 0.0


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("device", "tpu", r"runtime.device: must be one of \['auto', 'cpu', 'cuda', 'mps'\] or cuda:N, found 'tpu'"),
    ("threads", -1, r"runtime.threads: must be >= 0 \(0: the machine's cores\), found -1"),
    ("precision", "fp8", r"runtime.precision: must be one of \['fp32', 'bf16', 'fp16'\], found 'fp8'"),
    ("unknown", 1, r"runtime: unknown key\(s\) \['unknown'\]"),
])
def test_bad_runtime_values_are_refused_by_key(raw: dict, key: str, value, fragment: str) -> None:
    raw["runtime"][key] = value
    with pytest.raises(ConfigError, match=fragment):
        params_from_mapping(raw)


def test_fp16_on_the_cpu_is_refused_with_what_to_do(raw: dict) -> None:
    raw["runtime"].update(device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match=r"'fp16' on the CPU is refused.*use 'bf16' or 'fp32'"):
        params_from_mapping(copy.deepcopy(raw))
    with pytest.raises(ConfigError, match=r"runtime.precision: 'fp16' on the CPU is refused"):
        with runtime.autocast(torch.device("cpu"), "fp16"):
            pass


def test_resolve_device_auto_and_missing_devices() -> None:
    auto = runtime.resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if runtime.mps_available() else "cpu")
    assert auto.type == expected
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    for kind in ("cuda", "mps"):
        reason = runtime.unavailable_reason(kind)
        if reason is None:
            assert runtime.resolve_device(kind).type == kind
        else:  # named but absent: an error saying why and what to set, never a silent CPU fallback
            with pytest.raises(ConfigError, match=rf"runtime.device: '{kind}' was asked for but .*set runtime.device"):
                runtime.resolve_device(kind)


def test_bf16_autocast_on_cpu_and_fp32_is_a_no_op() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with runtime.autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_apply_sets_threads_env_and_determinism(restore_torch_state) -> None:
    info = runtime.apply(runtime.RuntimeSettings(device="cpu", threads=1, deterministic=True))
    assert info.threads == 1 and torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "1"
    assert torch.are_deterministic_algorithms_enabled()
    info = runtime.apply(runtime.RuntimeSettings(device="cpu", threads=0, deterministic=False))
    assert info.threads == runtime.cores() == torch.get_num_threads()  # 0 = the machine's cores
    assert not torch.are_deterministic_algorithms_enabled()
    tags = runtime.run_tags(info)
    assert tags["runtime.device"] == "cpu" and tags["runtime.threads"] == str(runtime.cores())
    assert tags["runtime.torch_version"] == torch.__version__ and tags["runtime.cpu_model"]
    assert float(tags["runtime.load_1min_at_start"]) == pytest.approx(info.load_1min, abs=0.01)


def test_a_load_above_the_cores_warns(monkeypatch, caplog, restore_torch_state) -> None:
    monkeypatch.setattr(runtime, "load_average", lambda: 7.5)
    monkeypatch.setattr(runtime, "cores", lambda: 2)
    with caplog.at_level("WARNING", logger="metatransfer.runtime"):
        info = runtime.apply(runtime.RuntimeSettings(device="cpu", threads=1))
    assert info.load_1min == 7.5
    assert "load average 7.50 at start exceeds the 2 core(s)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(runtime, "load_average", lambda: 1.0)
    with caplog.at_level("WARNING", logger="metatransfer.runtime"):
        runtime.apply(runtime.RuntimeSettings(device="cpu", threads=1))
    assert "load average" not in caplog.text


def test_deprecated_meta_train_precision_still_wins_with_a_warning(raw: dict, caplog) -> None:
    raw["meta_train"]["precision"] = "bf16"
    p = params_from_mapping(raw)
    with caplog.at_level("WARNING", logger="metatransfer.runtime"):
        assert runtime.precision_for(p) == "bf16"
    assert "meta_train.precision is deprecated: it moved to runtime.precision" in caplog.text
    raw["meta_train"].pop("precision")
    raw["runtime"]["precision"] = "fp32"
    assert runtime.precision_for(params_from_mapping(raw)) == "fp32"
