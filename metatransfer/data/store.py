"""The prepared store: what `prepare` writes and everything downstream reads.

Layout (one folder per dataset under the prepared dir, e.g. data/prepared):

    <prepared>/<dataset>/images.npy        uint8 (N, C, H, W), C and H=W from params
    <prepared>/<dataset>/manifest.parquet  one row per image (see schemas.py)
    <prepared>/quarantine.csv              skipped inputs with a reason
    <prepared>/report.json                 counts per dataset/split

Manifest row i describes images.npy[i].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitData:
    """The images of one split of one dataset, preloaded.

    Attributes:
        dataset: dataset name (e.g. "omniglot").
        split: split name ("meta_train", "meta_val", "meta_test", "train", "val", "test").
        images: uint8 (N, C, H, W).
        labels: int64 (N,) class index 0..len(class_names)-1 within this split.
        class_names: global class names (e.g. "omniglot/Greek/character01").
    """

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
