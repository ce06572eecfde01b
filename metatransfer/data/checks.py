"""Checks of data already on disk, used by the `data` flow's validate step."""

from __future__ import annotations

from pathlib import Path

from metatransfer.data.fetch import raw_files


def verify_raw(raw_dir: str | Path, datasets: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """Verify the checksum of every fetched raw file of `datasets`.

    Returns:
        {dataset: [file names verified]}.

    Raises:
        DataError / ChecksumError: a file is missing or altered (the message
            names it and says to re-run `fetch`).
    """
    return {name: sorted(raw_files(name, Path(raw_dir), verify=True)) for name in datasets}
