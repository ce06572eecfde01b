"""Matplotlib figures saved as PNG (headless: the Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

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
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    ax.set_xlabel("shots (labelled images per class)")
    ax.set_ylabel("accuracy (%) ± 95% CI")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
