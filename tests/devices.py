"""The devices tests run on: CPU always; CUDA and MPS when present, else skipped with the reason."""

from __future__ import annotations

import pytest

from metatransfer.runtime import unavailable_reason


def _param(kind: str):
    reason = unavailable_reason(kind)
    marks = [pytest.mark.skip(reason=f"{kind}: {reason}")] if reason else []
    return pytest.param(kind, marks=marks, id=kind)


DEVICES = [_param("cpu"), _param("cuda"), _param("mps")]
"""Use as `@pytest.mark.parametrize("device", DEVICES)`; `pytest -rs` prints why one was skipped."""
