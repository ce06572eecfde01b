"""Scores of a clustering against hidden labels, and the silhouette that needs none.

NumPy only (scikit-learn is not a dependency); the definitions are
scikit-learn's, so the numbers agree with `sklearn.metrics`:

- NMI: mutual information over the arithmetic mean of the two entropies
  (`normalized_mutual_info_score`, average_method="arithmetic").
- ARI: the Hubert & Arabie (1985) adjusted Rand index (`adjusted_rand_score`).
- Matched accuracy: the share of images whose cluster, mapped one-to-one to a
  class by the Hungarian algorithm (scipy's `linear_sum_assignment`) on the
  contingency table, is their class. With more clusters than classes the
  unmatched clusters count as wrong.
- Silhouette: mean over images of (b - a) / max(a, b) with Euclidean
  distances; an image alone in its cluster scores 0 (`silhouette_score`).

A target prepared without labels has nothing to score against: its outputs
carry `NO_LABELS_TO_SCORE` instead, and only the silhouette.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from metatransfer.errors import ConfigError

# What the outputs of a target prepared without any label (an image folder without class sub-folders)
# say in place of NMI / ARI / matched accuracy: there are no hidden labels to score its clusters against.
NO_LABELS_TO_SCORE = "no labels available to score the clusters"


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts (classes x clusters) of images per (class, cluster), over the values present in each.

    Args:
        labels: true class per image (any integers).
        clusters: assigned cluster per image (any integers), same length.

    Raises:
        ConfigError: the two arrays differ in length or are empty.
    """
    labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
    if len(labels) != len(clusters) or len(labels) == 0:
        raise ConfigError(f"clustering scores: labels and clusters must be non-empty and of one length, "
                          f"found {len(labels)} and {len(clusters)}")
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max() + 1, ci.max() + 1), dtype=np.int64)
    np.add.at(table, (li, ci), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information in [0, 1] (1: the same partition, up to renaming)."""
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    h_true, h_pred = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_true == 0.0 and h_pred == 0.0:
        return 1.0  # both one block: identical partitions
    pij = table / n
    outer = np.outer(table.sum(1), table.sum(0)) / n**2
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / outer[nz])).sum())
    return float(max(0.0, mi) / ((h_true + h_pred) / 2))


def ari(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Adjusted Rand index: 1 for the same partition, about 0 for a random one, down to -0.5."""
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()

    def pairs(x: np.ndarray | float) -> np.ndarray | float:
        return x * (x - 1) / 2

    index = float(pairs(table).sum())
    rows, cols = float(pairs(table.sum(1)).sum()), float(pairs(table.sum(0)).sum())
    expected = rows * cols / pairs(n) if n > 1 else 0.0
    top = (rows + cols) / 2
    if top == expected:
        return 1.0  # both partitions trivial (one block, or all singletons): sklearn's convention
    return float((index - expected) / (top - expected))


def matched_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy after the one-to-one cluster -> class mapping that maximises it (Hungarian algorithm)."""
    table = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, Any]:
    """NMI, ARI, matched accuracy and the majority-class rate (what one cluster for all scores).

    Returns:
        {"nmi", "ari", "matched_acc", "majority_rate", "images", "clusters_used"}.
    """
    table = contingency(labels, clusters)
    return {"nmi": nmi(labels, clusters), "ari": ari(labels, clusters),
            "matched_acc": matched_accuracy(labels, clusters),
            "majority_rate": float(table.sum(1).max() / table.sum()),
            "images": int(table.sum()), "clusters_used": int(table.shape[1])}


def silhouette(features: np.ndarray, clusters: np.ndarray) -> float:
    """Mean silhouette of `clusters` on `features` (N, D), Euclidean; in [-1, 1], higher is better.

    Raises:
        ConfigError: fewer than 2 or more than N - 1 distinct clusters (the score is undefined).
    """
    x = np.asarray(features, dtype=np.float64)
    _, c = np.unique(np.asarray(clusters).ravel(), return_inverse=True)
    k, n = int(c.max()) + 1 if len(c) else 0, len(c)
    if not 2 <= k <= n - 1:
        raise ConfigError(f"silhouette: needs 2..{n - 1} distinct clusters for {n} images, found {k}")
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    np.fill_diagonal(dist, 0.0)
    onehot = np.eye(k)[c]  # (n, k)
    sums = dist @ onehot  # (n, k): summed distance of each image to each cluster
    sizes = onehot.sum(0)
    own = sizes[c]
    a = np.where(own > 1, sums[np.arange(n), c] / np.maximum(own - 1, 1), 0.0)
    mean_other = sums / sizes
    mean_other[np.arange(n), c] = np.inf
    b = mean_other.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())
