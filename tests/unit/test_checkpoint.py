"""Checkpoint files: exact round trip of every state kind, atomic writes that
survive a crash at any point, refusal of altered or pickled checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from metatransfer.artifacts import CHECKSUMS, CONFIG, WEIGHTS, sha256_file
from metatransfer.training import checkpoint as ck
from metatransfer.training.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    ResumableSampler,
    checkpoint_dirs,
    load_latest,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def cfg(tmp_path: Path, fp: str = "fp", keep: int = 2) -> CheckpointConfig:
    return CheckpointConfig(folder=tmp_path / "ck", every=1, fingerprint=fp, keep=keep)


def test_every_state_kind_round_trips_exactly(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    state = {
        "weights": {"a": shared[:3], "b": shared[3:], "scalar": torch.tensor(2.5), "flag": torch.tensor([True, False])},
        "mt": np.arange(624, dtype=np.uint32) * 7,
        "arrays": [np.array(-3), np.linspace(0, 1, 6, dtype=np.float16).reshape(2, 3)[:, ::2], np.array([], np.uint64)],
        "tuple": (3, (1, 2), None),
        "big": 2**127 + 5,  # PCG64 state words are 128-bit integers
        "floats": [0.1, 1e-300, float("inf")],
        "nested": [{"step": 1, "loss": 0.25}],
        "text": "x",
        "none": None,
    }
    save_checkpoint(cfg(tmp_path), 7, state)
    got = load_latest(cfg(tmp_path))
    assert got is not None and got.step == 7
    s = got.state
    assert torch.equal(s["weights"]["a"], torch.arange(3.0)) and torch.equal(s["weights"]["b"], torch.arange(3.0, 6.0))
    assert s["weights"]["scalar"].shape == () and float(s["weights"]["scalar"]) == 2.5
    assert s["weights"]["flag"].dtype == torch.bool
    assert s["mt"].dtype == np.uint32 and np.array_equal(s["mt"], np.arange(624, dtype=np.uint32) * 7)
    for got_array, saved in zip(s["arrays"], state["arrays"]):
        assert isinstance(got_array, np.ndarray) and got_array.dtype == saved.dtype and np.array_equal(got_array, saved)
    assert [a.shape for a in s["arrays"]] == [(), (2, 2), (0,)]
    # Arrays are safetensors tensors of their own dtype and shape, named by their place in the state.
    with safe_open(got.path / WEIGHTS, framework="pt") as f:
        assert f.get_slice("mt").get_dtype() == "U32" and f.get_slice("mt").get_shape() == [624]
        assert sorted(f.keys()) == ["arrays.0", "arrays.1", "arrays.2", "mt", "weights.a", "weights.b", "weights.flag",
                                    "weights.scalar"]
    assert s["tuple"] == (3, (1, 2), None) and isinstance(s["tuple"][1], tuple)
    assert s["big"] == 2**127 + 5
    assert s["floats"] == [0.1, 1e-300, float("inf")]
    assert s["nested"] == [{"step": 1, "loss": 0.25}] and s["text"] == "x" and s["none"] is None


def test_non_string_keys_and_objects_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="keys must be strings"):
        save_checkpoint(cfg(tmp_path), 1, {"state": {0: torch.zeros(1)}})
    with pytest.raises(TypeError, match="cannot store object"):
        save_checkpoint(cfg(tmp_path), 1, {"x": object()})
    with pytest.raises(TypeError, match=r"checkpoint state at 'x.1': cannot store a <U1 array"):
        save_checkpoint(cfg(tmp_path), 1, {"x": [1, np.array(["a"])]})
    # torch takes arrays of the machine's byte order only
    with pytest.raises(TypeError, match=r"checkpoint state at 'x': cannot store a >i4 array"):
        save_checkpoint(cfg(tmp_path), 1, {"x": np.arange(2, dtype=">i4")})
    # Dotted keys (state_dict names) and nesting could name one tensor twice: refused, not overwritten.
    with pytest.raises(TypeError, match=r"checkpoint state at 'm.w': two tensors of the state have this name"):
        save_checkpoint(cfg(tmp_path), 1, {"m.w": torch.zeros(1), "m": {"w": torch.ones(1)}})
    assert checkpoint_dirs(tmp_path / "ck") == []  # nothing half-written


def test_checkpoint_of_an_older_format_is_discarded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format 1 stored arrays as raw uint8 bytes: decoding it with today's rules would resume a wrong state."""
    path = save_checkpoint(cfg(tmp_path), 4, {"mt": np.arange(3, dtype=np.uint32)})
    doc = json.loads((path / CONFIG).read_text())
    assert doc["format"] == ck.FORMAT == 2
    (path / CONFIG).write_text(json.dumps({**doc, "format": 1}))
    (path / CHECKSUMS).write_text(json.dumps({name: sha256_file(path / name) for name in (WEIGHTS, CONFIG)}))
    with caplog.at_level("WARNING", logger=ck.__name__):
        assert load_latest(cfg(tmp_path)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: checkpoint written with format 1 (this version reads format 2); discarding it and starting from "
        "step 0"]
    assert not (tmp_path / "ck").exists()


def test_global_rng_states_resume_the_same_streams(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(2)  # noqa: B018 (move the streams)
    save_checkpoint(cfg(tmp_path), 1, {"rng": rng_state()})
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(load_latest(cfg(tmp_path)).state["rng"])
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected


def test_optimizer_state_resumes_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    x = torch.randn(8, 4)

    def step(m: torch.nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    save_checkpoint(cfg(tmp_path), 3, {"model": model.state_dict(), "opt": optimizer_state(opt)})
    for _ in range(2):
        step(model, opt)
    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1, betas=(0.8, 0.95))
    st = load_latest(cfg(tmp_path)).state
    fresh.load_state_dict(st["model"])
    load_optimizer_state(fresh_opt, st["opt"])
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.95)
    for _ in range(2):
        step(fresh, fresh_opt)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_keeps_the_newest_and_same_step_is_replaced(tmp_path: Path) -> None:
    for step in (1, 2, 3, 3):
        save_checkpoint(cfg(tmp_path), step, {"v": step})
    assert [p.name for p in checkpoint_dirs(tmp_path / "ck")] == ["step-000000003", "step-000000002"]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]


def test_crash_before_rename_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(cfg(tmp_path), 1, {"v": torch.ones(3)})

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def crash(src, dst):  # the process dies between writing the files and renaming them
        if Path(dst).name.startswith(ck.STEP_PREFIX):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(Killed):
        save_checkpoint(cfg(tmp_path), 2, {"v": torch.full((3,), 2.0)})
    monkeypatch.undo()
    # A SIGKILL would also leave the temporary folder: plant one as it would look.
    leftover = tmp_path / "ck" / ".tmp-step-2-abc"
    leftover.mkdir()
    (leftover / WEIGHTS).write_bytes(b"partial")
    got = load_latest(cfg(tmp_path))
    assert got.step == 1 and torch.equal(got.state["v"], torch.ones(3))
    assert not leftover.exists()


WRITER = """
import sys, torch
from pathlib import Path
from metatransfer.training.checkpoint import CheckpointConfig, save_checkpoint
config = CheckpointConfig(folder=Path(sys.argv[1]), every=1, fingerprint="fp", keep=2)
for step in range(1, 300):
    save_checkpoint(config, step, {"v": torch.full((1 << 20,), float(step)), "step": step})
"""


def test_sigkill_inside_a_real_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    """A real process writing checkpoints is stopped (SIGSTOP) whenever a write is
    seen in flight; once the stop has taken effect with the temporary folder still
    there, the process is inside a write and is SIGKILLed. No hook in the write
    path, no sleep: a write that finished before the stop is let go and the next
    one is tried. The newest complete checkpoint must then load, intact."""
    folder = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)])
    landed: list[Path] = []
    tries = 0
    try:
        while not landed:
            assert proc.poll() is None, f"the writer ended (rc {proc.returncode}) before a kill landed in a write"
            inflight = [p for p in folder.glob(".tmp-*")] if folder.is_dir() else []
            if not inflight:
                time.sleep(0.001)
                continue
            tries += 1
            assert tries <= 1000, "1000 writes seen in flight, none still in flight once stopped"
            os.kill(proc.pid, signal.SIGSTOP)
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the stop took effect
            assert os.WIFSTOPPED(status)
            landed = [p for p in inflight if p.exists()]
            if not landed:
                os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert all(p.exists() for p in landed)  # the kill left the write unfinished
    written = int(landed[0].name.split("-")[2])  # .tmp-step-<step>-<random>
    got = load_latest(cfg(tmp_path))
    if written == 1:  # killed inside the first write: nothing to resume
        assert got is None
    else:
        assert got is not None and got.step == written - 1 and got.state["step"] == written - 1
        assert torch.equal(got.state["v"], torch.full((1 << 20,), float(written - 1)))
    assert not list(folder.glob(".*"))  # the leftover of the killed write is gone


def test_other_fingerprint_is_discarded_not_resumed(tmp_path: Path) -> None:
    save_checkpoint(cfg(tmp_path, fp="old settings"), 5, {"v": 1})
    assert load_latest(cfg(tmp_path, fp="new settings")) is None
    assert checkpoint_dirs(tmp_path / "ck") == []


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def plant_pickle(folder: Path, marker: Path, fix_checksums: bool) -> None:
    """Replace the weights of a checkpoint/model folder by a malicious pickle."""
    (folder / WEIGHTS).write_bytes(pickle.dumps(Payload(marker)))
    if fix_checksums:  # an attacker who also rewrites checksums.json
        sums = json.loads((folder / CHECKSUMS).read_text())
        sums[WEIGHTS] = sha256_file(folder / WEIGHTS)
        (folder / CHECKSUMS).write_text(json.dumps(sums))


@pytest.mark.parametrize("fix_checksums", [True, False])
def test_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path, fix_checksums: bool) -> None:
    path = save_checkpoint(cfg(tmp_path), 1, {"v": torch.ones(2)})
    marker = tmp_path / "marker"
    plant_pickle(path, marker, fix_checksums)
    expected = "a Python pickle; refusing to load" if fix_checksums else "checksum mismatch"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_latest(cfg(tmp_path))
    assert "Delete" in str(info.value) and str(tmp_path / "ck") in str(info.value)
    assert not marker.exists()


def test_altered_state_json_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(cfg(tmp_path), 1, {"v": 1})
    doc = json.loads((path / CONFIG).read_text())
    doc["state"]["v"] = 2
    (path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_latest(cfg(tmp_path))


def test_resumable_sampler_replays_or_uses_the_source_state() -> None:
    def source():
        rng = np.random.default_rng(4)
        return (lambda: float(rng.random())), rng

    sample, _ = source()
    a = ResumableSampler(sample)
    [a() for _ in range(5)]
    saved = a.state()
    assert saved == {"draws": 5, "inner": None}
    after = [a() for _ in range(3)]
    b = ResumableSampler(source()[0])
    b.restore(saved)
    assert [b() for _ in range(3)] == after and b.draws == 8
    # With a state API the position is restored without replay.
    sample, rng = source()
    c = ResumableSampler(sample, lambda: rng.bit_generator.state, lambda s: setattr(rng.bit_generator, "state", s))
    [c() for _ in range(5)]
    saved = c.state()
    after = [c() for _ in range(3)]
    sample2, rng2 = source()
    d = ResumableSampler(sample2, lambda: rng2.bit_generator.state, lambda s: setattr(rng2.bit_generator, "state", s))
    d.restore(json.loads(json.dumps(saved)))
    assert [d() for _ in range(3)] == after
    with pytest.raises(ValueError, match="freshly built"):
        a.restore({"draws": 1, "inner": None})


def test_state_digest_sees_every_bit_and_name() -> None:
    from metatransfer.training.checkpoint import state_digest

    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    same = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    flipped = {"w": torch.tensor([1.0, 2.0000002]), "n": torch.tensor(3)}
    renamed = {"v": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    assert state_digest(a) == state_digest(same)
    assert len({state_digest(a), state_digest(flipped), state_digest(renamed)}) == 3
