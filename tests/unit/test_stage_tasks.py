"""Retries sit where the I/O is: a download is retried inside the library (3
attempts, then an error naming the URL); no Prefect stage task retries on top
(that would repeat each download 3 x 3 times, and re-run training steps)."""

from __future__ import annotations

import io
import socket

import pytest

from metatransfer.data import fetch
from metatransfer.errors import DataError


def test_no_stage_task_is_retried_by_prefect() -> None:
    from prefect import Task

    from tasks import stages

    found = {name: obj.retries for name, obj in vars(stages).items() if isinstance(obj, Task)}
    assert {"fetch", "prepare", "meta_train", "finetune", "evaluate"} <= set(found)
    assert found == dict.fromkeys(found, 0)


def test_a_download_is_tried_three_times_then_names_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.npz"
    waits: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)  # the back-off, not waited here
    with pytest.raises(DataError) as info:
        fetch._download(url, io.BytesIO())
    assert str(info.value).startswith(f"{url}: download failed after 3 attempts (")
    assert "data.mirror" in str(info.value)
    assert waits == [2.0, 4.0]  # two waits: three attempts
