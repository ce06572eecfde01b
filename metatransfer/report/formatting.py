"""Numbers as the report prints them, and table cells (plain text: the template escapes)."""

from __future__ import annotations

from typing import Any

from metatransfer.evaluation.stats import MeanCI


def fmt_pct(x: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as percent with `digits` decimals ("61.23"); "–" when missing."""
    if x is None:
        return "–"
    return f"{100 * float(x):.{digits}f}"


def fmt_acc_ci(mean: float, ci: float, n: int = 0) -> str:
    """Mean ± 95 % CI half-width in percent, as the report's tables show it: "61.23 ± 2.10".

    Args:
        mean: accuracy in [0, 1].
        ci: the half-width of its 95 % interval.
        n: episodes or images it was measured on (does not change the text).
    """
    return MeanCI(float(mean), float(ci), n, 0.95).fmt()


def fmt_diff(diff: float, ci: float) -> str:
    """A paired difference in points with sign and CI: "Δ +3.20 ± 1.10"."""
    return f"Δ {100 * float(diff):+.2f} ± {100 * float(ci):.2f}"


def majority_reference(counts: list[int]) -> tuple[int, float] | None:
    """The accuracy of always answering the largest class (the best any constant answer scores).

    Args:
        counts: images per class of the split it is scored on, in label order.

    Returns:
        (label of the largest class, the first one on ties; its share of the images), or None
        when there are no images.
    """
    total = sum(counts)
    if not counts or total <= 0:
        return None
    label = max(range(len(counts)), key=lambda i: (counts[i], -i))
    return label, counts[label] / total


def cell(text: Any, cls: str = "", title: Any = None, style: str = "") -> dict[str, Any]:
    """One table cell; empty attributes are left out of the markup."""
    return {"text": text, "cls": cls, "title": title, "style": style}
