"""Matplotlib figures saved as PNG (headless: the Agg backend): curves, accuracy
against shots, paired differences, confusion matrices and embedding maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from metatransfer.classnames import display_names
from metatransfer.errors import DataError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(
    curves: Mapping[str, Sequence[Mapping[str, float]]], x: str, y: str, title: str, path: str | Path
) -> Path:
    """One line per name (e.g. algorithm) of y against x; returns the PNG path."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, rows in curves.items():
        if rows:
            ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", ms=3, label=name)
    return _finish(fig, ax, (x, y, title), path)


def plot_accuracy_vs_shots(
    table: Mapping[str, Mapping[int, tuple[float, float]]], title: str, path: str | Path
) -> Path:
    """Accuracy (mean ± CI band) against shots, one line per method.

    Args:
        table: method -> {shots: (mean, ci half-width)} with accuracies in [0, 1].
    """
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method, by_shot in table.items():
        shots = sorted(by_shot)
        mean = [100 * by_shot[k][0] for k in shots]
        ci = [100 * by_shot[k][1] for k in shots]
        ax.plot(shots, mean, marker="o", label=method)
        ax.fill_between(shots, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k for v in table.values() for k in v}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    return _finish(fig, ax, ("shots (labelled images per class)", "accuracy (%) ± 95% CI", title), path)


def plot_paired_differences(
    diffs: Mapping[str, tuple[float, float]], reference: str, title: str, path: str | Path
) -> Path:
    """Horizontal bars: mean paired difference vs `reference` with CI error bars (in points)."""
    names = list(diffs)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.5), dpi=110)
    means = [100 * diffs[n][0] for n in names]
    cis = [100 * diffs[n][1] for n in names]
    colors = ["tab:green" if m - c > 0 else "tab:red" if m + c < 0 else "tab:gray" for m, c in zip(means, cis)]
    ax.barh(names, means, xerr=cis, color=colors, alpha=0.8, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"accuracy difference vs {reference} (points, paired 95% CI)")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes): row = true class, column = predicted class.

    Args:
        y_true: true labels in 0..n_classes-1.
        y_pred: predicted labels in 0..n_classes-1, same length.
        n_classes: number of classes (rows/columns, also for classes never seen).

    Returns:
        int64 matrix whose total is len(y_true).

    Raises:
        DataError: lengths differ or a label is outside 0..n_classes-1.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise DataError(f"confusion matrix: {t.size} true labels but {p.size} predictions; pass one prediction per image")
    for name, a in (("true", t), ("predicted", p)):
        bad = np.flatnonzero((a < 0) | (a >= n_classes))
        if bad.size:
            raise DataError(f"confusion matrix: {name} label {int(a[bad[0]])} at index {int(bad[0])} is outside "
                            f"0..{n_classes - 1} ({n_classes} class names given); check the class list")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def plot_confusion_matrix(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    title: str,
    path: str | Path,
) -> Path:
    """Confusion matrix as a heat map: colour = share of the true class (row), text = count and row %.

    Row-normalised colours keep a rare class (e.g. the most severe grade)
    visible next to a frequent one; the counts keep the absolute numbers.

    Args:
        y_true: true labels (N,) in 0..len(class_names)-1.
        y_pred: predicted labels (N,).
        class_names: names in label order; the ticks show them without the `<dataset>/`
            prefix (`classnames.display_names`).
        title: figure title.
        path: PNG to write (folders are created).

    Returns:
        The PNG path.
    """
    n = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    labels = [_short(c) for c in display_names(class_names)]
    ax.set_xticks(range(n), labels, rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            colour = "white" if share[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=7, color=colour)
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}\naccuracy {100 * acc:.1f}% on {int(cm.sum())} images", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(features: np.ndarray | Any) -> np.ndarray:
    """Project features onto their first two principal components (float64, centred).

    Computed with numpy's SVD (no scikit-learn dependency). Each component's
    sign is fixed so that its largest-magnitude loading is positive, so the
    same features always give the same picture.

    Args:
        features: (N, D) array or tensor, N >= 2.

    Returns:
        (N, 2) float64 coordinates (the second column is 0 when D == 1).
    """
    x = _as_numpy(features).astype(np.float64).reshape(len(features), -1)
    if x.shape[0] < 2:
        raise DataError(f"embedding map: need at least 2 feature rows, got {x.shape[0]}")
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    out = x @ comps.T
    if out.shape[1] < 2:
        out = np.hstack([out, np.zeros((len(out), 2 - out.shape[1]))])
    return out


def plot_embedding_map(
    features: np.ndarray | Any,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    title: str,
    path: str | Path,
    max_points: int = 3000,
    seed: int = 0,
) -> Path:
    """2-D map (PCA) of embeddings, one colour per class: do the classes separate?

    Args:
        features: (N, D) backbone features (array or tensor).
        labels: (N,) class labels in 0..len(class_names)-1.
        class_names: names in label order (legend, without the `<dataset>/` prefix).
        title: figure title.
        path: PNG to write.
        max_points: a seeded random subset of this many points is drawn when N is larger
            (the PCA still uses all points).
        seed: seed of that subset.

    Returns:
        The PNG path.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    if len(y) != len(features):
        raise DataError(f"embedding map: {len(features)} feature rows but {len(y)} labels; pass one label per row")
    bad = np.flatnonzero((y < 0) | (y >= len(class_names)))
    if bad.size:
        raise DataError(f"embedding map: label {int(y[bad[0]])} at index {int(bad[0])} is outside "
                        f"0..{len(class_names) - 1} ({len(class_names)} class names given)")
    xy = pca_2d(features)
    keep = np.arange(len(y))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(y), size=max_points, replace=False))
    fig, ax = plt.subplots(figsize=(6.5, 5.0), dpi=110)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(display_names(class_names)):
        sel = keep[y[keep] == c]
        if sel.size:
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.7, color=cmap(c % cmap.N), label=f"{_short(name)} ({sel.size})")
    return _finish(fig, ax, ("PC 1", "PC 2", title), path, title_kw={"fontsize": 10},
                   legend_kw={"fontsize": 7, "markerscale": 1.5, "loc": "best"})


def _short(name: str, width: int = 18) -> str:
    """Class names such as 'normal, benign' fit under a tick; long ones are cut with an ellipsis."""
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def _as_numpy(a: Any) -> np.ndarray:
    """A numpy view of an array or a (CPU or GPU, grad or not) tensor."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _finish(
    fig: Any, ax: Any, labels: tuple[str, str, str], path: str | Path,
    title_kw: dict[str, Any] | None = None, legend_kw: dict[str, Any] | None = None,
) -> Path:
    """Label (x, y, title), grid, legend, lay out and save: how every line and scatter plot here ends.

    `title_kw` and `legend_kw` are passed only when given, so matplotlib's own
    defaults (rcParams) size the title; the legend defaults to fontsize 8.
    """
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **(title_kw or {}))
    ax.grid(alpha=0.3)
    ax.legend(**(legend_kw or {"fontsize": 8}))
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" (matplotlib version) chunk: a PNG under plots/ is a DVC output
    # and must be the same bytes from the same numbers (PNG carries no date by default).
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
