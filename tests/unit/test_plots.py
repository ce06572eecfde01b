"""Confusion matrices and embedding maps: exact counts, PCA against an eigen-decomposition, PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metatransfer.errors import DataError
from metatransfer.evaluation.plots import (
    confusion_matrix,
    pca_2d,
    plot_accuracy_vs_shots,
    plot_confusion_matrix,
    plot_embedding_map,
)


def _non_blank_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.std() > 5.0, f"{path} looks blank"
    return im.size


def test_confusion_matrix_counts() -> None:
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 4)
    expected = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64 and cm.sum() == 6


def test_confusion_matrix_errors_name_the_problem() -> None:
    with pytest.raises(DataError, match="3 true labels but 2 predictions"):
        confusion_matrix([0, 1, 1], [0, 1], 2)
    with pytest.raises(DataError, match=r"predicted label 5 at index 1 is outside 0\.\.2 \(3 class names"):
        confusion_matrix([0, 1], [0, 5], 3)


def test_plot_confusion_matrix_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    out = plot_confusion_matrix(y, pred, [f"grade {i}" for i in range(5)], "retinamnist: protonet", tmp_path / "a" / "cm.png")
    assert out == tmp_path / "a" / "cm.png"
    w, h = _non_blank_png(out)
    assert w > h > 300  # colour bar on the right makes it wider than tall


def test_pca_matches_eigendecomposition() -> None:
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    x = rng.normal(size=(500, 6)) * np.array([5.0, 2.0, 0.5, 0.1, 0.1, 0.1]) @ basis.T + 3.0
    xy = pca_2d(x)
    xc = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(np.cov(xc.T))
    ref = xc @ vecs[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(xy), np.abs(ref), atol=1e-8)
    np.testing.assert_allclose(xy.mean(axis=0), 0.0, atol=1e-9)
    assert xy[:, 0].var() > 4 * xy[:, 1].var()


def test_pca_sign_is_fixed_and_tensors_accepted() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8)) * np.linspace(3, 1, 8)
    perm = rng.permutation(200)
    # A row permutation gives the same components; a free SVD sign could mirror the map.
    np.testing.assert_allclose(pca_2d(x)[perm], pca_2d(x[perm]), atol=1e-9)
    t = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    np.testing.assert_allclose(pca_2d(t), pca_2d(x.astype(np.float32)), atol=1e-5)
    one_d = pca_2d(x[:, :1])
    assert one_d.shape == (200, 2) and np.all(one_d[:, 1] == 0)
    with pytest.raises(DataError, match="at least 2 feature rows"):
        pca_2d(x[:1])


def test_plot_embedding_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 60)
    feats = rng.normal(size=(120, 16)) + labels[:, None] * 4.0
    out = plot_embedding_map(feats, labels, ["malignant", "normal, benign"], "breastmnist", tmp_path / "emb.png",
                             max_points=50)
    _non_blank_png(out)
    with pytest.raises(DataError, match="120 feature rows but 119 labels"):
        plot_embedding_map(feats, labels[:-1], ["a", "b"], "t", tmp_path / "x.png")
    with pytest.raises(DataError, match=r"label 1 at index 60 is outside 0\.\.0"):
        plot_embedding_map(feats, labels, ["a"], "t", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_existing_plot_still_writes(tmp_path: Path) -> None:
    out = plot_accuracy_vs_shots({"protonet": {1: (0.4, 0.02), 5: (0.6, 0.02)}}, "t", tmp_path / "s.png")
    _non_blank_png(out)


def test_figures_label_classes_without_the_dataset_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metatransfer.evaluation import plots

    texts: list[str] = []
    save = plots._save

    def capture(fig, path):
        ax = fig.axes[0]
        texts.extend(t.get_text() for t in [*ax.get_xticklabels(), *ax.get_yticklabels()])
        if ax.get_legend() is not None:
            texts.extend(t.get_text() for t in ax.get_legend().get_texts())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    names = ["brain_tumor_mri/glioma", "brain_tumor_mri/meningioma", "brain_tumor_mri/notumor", "brain_tumor_mri/pituitary"]
    y = np.repeat(np.arange(4), 5)
    plot_confusion_matrix(y, y[::-1], names, "brain_tumor_mri", tmp_path / "cm.png")
    assert texts[:4] == ["glioma", "meningioma", "notumor", "pituitary"] == texts[4:8]
    texts.clear()
    feats = np.random.default_rng(0).normal(size=(20, 8))
    plot_embedding_map(feats, y, names, "brain_tumor_mri", tmp_path / "emb.png")
    assert [t for t in texts if "(" in t] == ["glioma (5)", "meningioma (5)", "notumor (5)", "pituitary (5)"]
