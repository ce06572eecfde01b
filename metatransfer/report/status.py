"""Where a target's chosen model stands in the registry, as the badge and sentence of its card."""

from __future__ import annotations

from typing import Any

SHIPPED_DECISIONS = ("promoted", "already_champion")  # the challenger holds the `champion` alias


def target_status(record: dict[str, Any] | None, facts: dict[str, Any]) -> dict[str, str]:
    """What happened to a target's chosen model: the badge follows the registry's decision.

    Args:
        record: the target's latest record in reports/promotion.json (None: no decision yet).
        facts: the target's finetune facts from reports/run_facts.json (registered version, refusal).

    Returns:
        {"state": "shipped" | "selected" | "rejected" | "rolled-back", "badge": its word,
         "text": one sentence saying why}.
    """
    if facts.get("refused"):  # never registered, so never a challenger: the refusal is shown below the title
        return {"state": "rejected", "badge": "refused", "text": ""}
    if record is None:
        return {"state": "selected", "badge": "selected",
                "text": "Selected by fine-tuning; not promoted: no promotion decision yet (metatransfer promote)."}
    decision = str(record.get("decision", ""))
    reason = str(record.get("reason") or "no reason recorded")
    challenger = record.get("challenger")
    registered = ((facts.get("registered") or {}).get("model") or {}).get("version")
    if registered and challenger and str(challenger) != str(registered) and decision != "rolled_back":
        return {"state": "selected", "badge": "selected",
                "text": f"Selected by fine-tuning (v{registered}); not promoted yet: the latest promotion "
                        f"decision ({decision}) concerns v{challenger}."}
    before, after = record.get("champion_before"), record.get("champion_after")
    if decision in SHIPPED_DECISIONS:
        return {"state": "shipped", "badge": "shipped", "text": f"Promoted: champion v{after or challenger}. {reason}"}
    if decision == "rejected":
        stays = (f"The champion stays v{before}." if before
                 else "There is no champion: nothing is served for this target.")
        return {"state": "rejected", "badge": "rejected", "text": f"Promotion rejected: {reason}. {stays}"}
    if decision == "rolled_back":
        return {"state": "rolled-back", "badge": "rolled back",
                "text": f"Champion rolled back from v{before} to v{after}."}
    return {"state": "selected", "badge": "selected", "text": f"Not promoted ({decision}): {reason}"}
