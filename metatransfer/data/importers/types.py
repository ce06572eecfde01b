"""What every importer returns: image batches (arrays, or files decoded later), metadata rows and quarantine rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

META_COLUMNS = ("domain", "class", "origin", "source_path", "orig_height", "orig_width", "orig_channels")


@dataclass(frozen=True)
class ImageBatch:
    """Same-shape images.

    Attributes:
        data: (n, H, W, C) uint8, or (n, H, W, 1) bool.
        background_true: for bool data, True means the background (Omniglot);
            the ink (False) becomes 255 when converted.
    """

    data: np.ndarray
    background_true: bool = False

    def __len__(self) -> int:
        return int(self.data.shape[0])


@dataclass(frozen=True)
class ImageFiles:
    """Images still on disk, one path per metadata row; decoded later in chunks.

    Attributes:
        paths: the image files, in metadata row order.
    """

    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class QuarantineRow:
    """An input that was skipped, and why."""

    dataset: str
    source_path: str
    reason: str


@dataclass
class Imported:
    """What an importer read from one dataset's raw files.

    Attributes:
        dataset: dataset name (prefix of every class name).
        kind: importer kind ("omniglot_npz", "omniglot_zip", "medmnist", "kmnist", "image_folder",
            "csv_split", "split_folder", "npz_file").
        batches: images (arrays, or files decoded later); concatenated in order they match the rows of `meta`.
        meta: one row per image, columns META_COLUMNS.
        class_order: every class in the source's official order (Omniglot's vinyals split uses it;
            for image folders every class folder, including empty ones).
        quarantine: skipped inputs with reasons.
        empty_classes: class folders with no usable image (image folders; filled once decoded).
        layout: the image-folder layout used ("class", "domain/class", "split/class", "csv"; "" for arrays).
        version: the input's data version where the user pins one ("sha256:<hex>" of a prepare.npz_files
            file, set by prepare once checked); "" otherwise.
    """

    dataset: str
    kind: str
    batches: list[ImageBatch | ImageFiles]
    meta: pd.DataFrame
    class_order: tuple[str, ...]
    quarantine: list[QuarantineRow] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    layout: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        n = sum(len(b) for b in self.batches)
        if n != len(self.meta):  # a bug in an importer, not in the user's data
            raise AssertionError(f"{self.dataset}: {n} images but {len(self.meta)} metadata rows")


def meta_frame(rows: dict[str, list]) -> pd.DataFrame:
    """The metadata DataFrame of collected rows (columns META_COLUMNS, sizes as int64)."""
    df = pd.DataFrame({c: rows[c] for c in META_COLUMNS})
    for c in ("orig_height", "orig_width", "orig_channels"):
        df[c] = df[c].astype("int64")
    return df


def new_rows() -> dict[str, list]:
    """Empty metadata columns to collect rows into (see `meta_frame`)."""
    return {c: [] for c in META_COLUMNS}
