"""Predictions the promotion gate compares: of a registered model, of a model on disk, on the test split."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from metatransfer.layout import Layout


def predict_uri(model_uri: str, images: np.ndarray) -> np.ndarray:
    """Class predictions of a registered/logged pyfunc target model (what serving answers)."""
    from metatransfer.artifacts import load_pyfunc_model

    # A private copy: loading a registered model straight from a local store
    # writes a metadata file into the store's artifact folder. The copy's code is
    # checked before it is loaded (artifacts.check_model_code).
    with tempfile.TemporaryDirectory(prefix="metatransfer-gate-") as tmp:
        out = load_pyfunc_model(model_uri, tmp).predict(images)
    return np.asarray(out["prediction"], dtype=np.int64)


def predict_folder(folder: str | Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class predictions of a target model saved on disk (the baseline)."""
    import torch

    from metatransfer.training.finetune import load_target_model

    model = load_target_model(folder)
    preds = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            preds.append(model(torch.from_numpy(images[i : i + batch_size])).argmax(1).numpy())
    return np.concatenate(preds).astype(np.int64)


def held_out_images(params: Any, root: str | Path, target: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The target's test split (what the gate judges on).

    Args:
        params: the loaded params (`data.prepared_dir`).
        root: the project root.
        target: the target dataset.

    Returns:
        The images as float32 in [0, 1] (N, C, H, W), the int64 labels and the split's fingerprint.
    """
    from metatransfer.data.store import load_split
    from metatransfer.episodes import split_fingerprint

    split = load_split(Layout.of(root, params).prepared_dir, target, "test")
    images = np.ascontiguousarray(split.images, dtype=np.float32) / np.float32(255.0)
    return images, split.labels.astype(np.int64), split_fingerprint(split)
