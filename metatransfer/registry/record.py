"""What registry actions return and record: their results and reports/promotion.json.

The latest decision per target (promoted, rejected, rolled back) is written to
reports/promotion.json, which the HTML report shows. Promotion and rollback are
registry actions, not DVC outputs: they run after `dvc repro`, from the CLI or
from the Prefect flow.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from metatransfer.config import Params, load_params
from metatransfer.io import write_json_atomic
from metatransfer.layout import PROMOTION_RECORD

DECISIONS_PATH = PROMOTION_RECORD  # latest decision per target (read by metatransfer.report)


@dataclass
class PromotionResult:
    """The outcome of one promotion attempt.

    decision: "promoted", "rejected" or "already_champion" ("no_challenger" from promote_targets;
    "needs_review" for the cluster model of an unlabelled target without hidden labels to score it on:
    only a person's `force_promote` moves it); `forced` marks a promotion by `force_promote` (the reason
    is then the person's).
    """

    target: str
    name: str
    decision: str
    reason: str
    challenger: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    reference: str = ""
    gain_mean: float | None = None
    gain_ci_low: float | None = None
    gain_ci_high: float | None = None
    run_id: str = ""
    evidence: dict[str, Any] = field(default_factory=dict, repr=False)
    forced: bool = False  # moved by `force_promote` (a person's decision, without the gate)

    def to_dict(self, evidence: bool = False) -> dict[str, Any]:
        """JSON-ready dict (the per-fold evidence only when asked)."""
        d = asdict(self)
        if not evidence:
            d.pop("evidence")
        return d


def record_decision(root: str | Path, target: str, summary: dict[str, Any]) -> Path:
    """Store the latest registry decision of `target` in reports/promotion.json (other targets kept).

    Not a DVC output: promotion is a registry action; the HTML report shows this file.
    """
    path = Path(root) / DECISIONS_PATH
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        data = {}  # a damaged record is rewritten, never a reason to fail a promotion
    data[target] = summary
    write_json_atomic(path, data)
    return path


def project_params(root: str | Path) -> Params:
    """The validated params.yaml of the project at `root`."""
    return load_params(Path(root) / "params.yaml")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the `time` of a decision record)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RollbackResult:
    """`champion` moved from `from_version` back to `to_version`."""

    target: str
    name: str
    from_version: str
    to_version: str
    history: list[str]
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)
