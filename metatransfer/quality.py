"""The quality gate before registration: is a model better than chance at all?

Promotion (metatransfer/registry.py) compares a challenger with the champion;
this gate runs earlier, in the stages, and decides whether a model may become
a challenger in the first place (docs/reproducibility.md):

- a **target model** (finetune): one-sided exact binomial test of its
  validation accuracy against the *majority-class rate* of the validation
  images (on an imbalanced target such as BreastMNIST, 73 % benign, a constant
  classifier would pass a test against 1/n_classes); refused unless
  P(X >= correct | n, chance) < 1 - promote.confidence;
- a **meta-learner** (meta_train): the Student-t interval (promote.confidence)
  of its per-episode meta-val accuracies must lie above 1/n_way (episodes are
  balanced, so 1/n_way is chance there). The episodes also chose the best
  step, which biases the mean upwards a little: the gate is a floor, not an
  estimate.

`promote.quality_gate: false` records the verdict but lets everything through
(smoke profiles whose models are too small to beat chance).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUALITY_TAG = "quality_gate"  # on runs and versions: "passed" or "refused"


@dataclass(frozen=True)
class QualityVerdict:
    """Whether a model is good enough to be registered at all (see `target_quality`, `learner_quality`).

    passed: the evidence shows it above chance at `confidence`.
    test: which test was used (for the record).
    chance: the chance level it was tested against.
    value: the model's accuracy.
    p_value / ci_low: the evidence (binomial p-value, or the lower CI end of episode accuracies).
    reason: one line for logs and the report.
    """

    passed: bool
    test: str
    chance: float
    value: float
    confidence: float
    reason: str
    p_value: float | None = None
    ci_low: float | None = None
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (rounded so that DVC outputs do not depend on float printing)."""
        d = asdict(self)
        for k in ("chance", "value", "p_value", "ci_low"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 6)
        return d


def majority_rate(labels: np.ndarray) -> float:
    """The accuracy of always answering the most frequent class (the honest chance level)."""
    lab = np.asarray(labels).reshape(-1)
    if lab.size == 0:
        return 1.0
    return float(np.bincount(lab.astype(np.int64)).max() / lab.size)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of k successes out of n."""
    from scipy import stats

    if k <= 0:
        return 1.0
    return float(stats.binom.sf(k - 1, n, p))


def target_quality(correct: int, n: int, chance: float, confidence: float) -> QualityVerdict:
    """One-sided exact binomial test: is the validation accuracy above `chance`?

    H0: the model's accuracy is `chance` (the majority-class rate of the
    validation images: on an imbalanced target, 1/n_classes would let a
    constant classifier pass). Passed when P(X >= correct | n, chance) < 1 - confidence.

    Args:
        correct, n: correctly classified and total validation images.
        chance: the chance level (`majority_rate` of the validation labels).
        confidence: e.g. 0.95 (promote.confidence).
    """
    if n <= 0:
        return QualityVerdict(False, "binomial", chance, float("nan"), confidence,
                              "no validation images: nothing shows it is better than chance", n=0)
    acc = correct / n
    pv = binomial_sf(correct, n, chance)
    alpha = 1.0 - confidence
    passed = pv < alpha
    rel = "<" if passed else ">="
    reason = (f"validation accuracy {acc:.4f} ({correct}/{n}) vs chance {chance:.4f} (majority-class rate): "
              f"one-sided binomial p = {pv:.3g} {rel} {alpha:.3g}")
    return QualityVerdict(passed, "binomial", chance, acc, confidence, reason, p_value=pv, n=n)


def learner_quality(episode_accs: Any, n_way: int, confidence: float) -> QualityVerdict:
    """Does the Student-t CI of a learner's meta-val episode accuracies lie above 1/n_way?

    Args:
        episode_accs: per-episode accuracies of the learner's (best) validation.
        n_way: ways of the validation episodes (chance = 1/n_way: the episodes are balanced).
        confidence: interval level (promote.confidence).
    """
    from metatransfer.evaluation.stats import mean_ci

    accs = np.asarray(episode_accs, dtype=np.float64).reshape(-1)
    chance = 1.0 / n_way
    if accs.size < 2:
        return QualityVerdict(False, "episode_ci", chance, float(accs.mean()) if accs.size else float("nan"),
                              confidence, f"{accs.size} validation episode(s): an interval needs two "
                              "(raise meta_train.val_episodes)", n=int(accs.size))
    ci = mean_ci(accs, confidence)
    # Constant accuracies give a zero-width interval: the mean alone decides.
    low = ci.low if np.isfinite(ci.ci) else ci.mean
    passed = low > chance
    rel = ">" if passed else "<="
    reason = (f"meta-val accuracy {ci.mean:.4f}, {100 * confidence:g} % CI low {low:.4f} {rel} chance "
              f"{chance:.4f} (1/{n_way}) over {ci.n} episodes")
    return QualityVerdict(passed, "episode_ci", chance, ci.mean, confidence, reason, ci_low=low, n=ci.n)



def target_gate(val_correct: int, val_n: int, chance: float, params: Any) -> QualityVerdict:
    """The quality gate of one target model under params (`promote.quality_gate`, `promote.confidence`).

    With the gate switched off (promote.quality_gate: false) the verdict passes and says so.
    """
    promote_p = getattr(params, "promote", None)
    confidence = promote_p.confidence if promote_p is not None else 0.95
    verdict = target_quality(val_correct, val_n, chance, confidence)
    if promote_p is not None and not promote_p.quality_gate:
        return QualityVerdict(True, "off", verdict.chance, verdict.value, confidence,
                              f"quality gate off (promote.quality_gate: false); {verdict.reason}", verdict.p_value,
                              None, verdict.n)
    return verdict


def learner_gate(episode_accs: Any, n_way: int, params: Any) -> QualityVerdict:
    """The quality gate of one meta-learner under params (see `target_gate`)."""
    promote_p = getattr(params, "promote", None)
    confidence = promote_p.confidence if promote_p is not None else 0.95
    verdict = learner_quality(episode_accs, n_way, confidence)
    if promote_p is not None and not promote_p.quality_gate:
        return QualityVerdict(True, "off", verdict.chance, verdict.value, confidence,
                              f"quality gate off (promote.quality_gate: false); {verdict.reason}", None,
                              verdict.ci_low, verdict.n)
    return verdict


def learner_passed(root: str | Path, method: str) -> tuple[bool, str]:
    """Whether `method`'s meta-learner passed the learner gate in metrics/meta_train.json.

    Learners the gate never saw (scratch, pretrain, older metrics files) count as passed.
    """
    path = Path(root) / "metrics" / "meta_train.json"
    try:
        rec = (json.loads(path.read_text()) if path.is_file() else {}).get(method) or {}
    except json.JSONDecodeError:
        rec = {}
    gate = rec.get(QUALITY_TAG) if isinstance(rec, dict) else None
    if not gate:
        return True, ""
    return bool(gate.get("passed", True)), str(gate.get("reason", ""))
