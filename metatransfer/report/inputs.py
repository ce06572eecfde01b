"""What the report shows, read from the project folder (no HTML here).

The page gathers what the pipeline wrote: metrics/evaluate.json,
metrics/meta_train.json, models/target/<target>/selection.json, every PNG
under plots/, the promotion decisions reports/promotion.json, the run-specific
facts reports/run_facts.json (wall seconds, MLflow model URIs, registered
versions: kept out of the DVC outputs so that those stay byte-identical), the
per-class image counts of each target from the prepared store's manifest, and
the run's identity (git commit, dvc.lock digest, prepared-data version).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from metatransfer import layout
from metatransfer.config import Params
from metatransfer.data.store import MANIFEST_FILE
from metatransfer.errors import DataError
from metatransfer.provenance import identify
from metatransfer.tracking import read_run_facts

log = logging.getLogger(__name__)

PROMOTION_PATH = layout.PROMOTION_RECORD
TARGET_SPLITS = ("train", "val", "test")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_json(path: Path) -> Any | None:
    """Parse a JSON file; None when it does not exist.

    Raises:
        DataError: the file exists but is not valid JSON (names the file, line and what to do).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run the stage that writes it "
                        f"(`dvc repro`) or delete the file") from None


@dataclass(frozen=True)
class RunFacts:
    """Who/what produced the numbers on the page."""

    git_commit: str
    dvc_lock_sha256: str
    data_version: str
    generated_utc: str
    project: str
    seed: int | None = None


def run_facts(root: Path, params: Params | None) -> RunFacts:
    """The run's identity: git commit, dvc.lock digest, data version (DVC md5 of the prepared store).

    Args:
        root: the project root.
        params: the loaded params (for the prepared-data path and the seed); None reads the path from
            root/params.yaml (`provenance.prepared_key`).

    Returns:
        The facts; empty strings where git/DVC have nothing recorded.
    """
    identity = identify(root, params.data.prepared_dir if params is not None else None)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return RunFacts(
        git_commit=identity.git_commit,
        dvc_lock_sha256=identity.dvc_lock_sha256,
        data_version=identity.data_version,
        generated_utc=now,
        project=Path(root).resolve().name,
        seed=params.seed if params is not None else None,
    )


@dataclass(frozen=True)
class ClassCounts:
    """Images per class and split of one target, from the prepared store's manifest.

    Attributes:
        class_names: full class names in label order.
        splits: split name -> images per class, in `class_names` order (train/val/test present in the store).
    """

    class_names: list[str]
    splits: dict[str, list[int]]


@dataclass
class ReportInputs:
    """Everything the page shows, already read from disk (render_report is pure)."""

    facts: RunFacts
    evaluate: dict[str, Any] | None = None
    meta_train: dict[str, Any] | None = None
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    promotion: Any | None = None
    run_facts: dict[str, Any] = field(default_factory=dict)  # reports/run_facts.json (not a DVC output)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (path under plots/, PNG bytes)
    episode_sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> params for captions
    reference: str | None = None
    methods: tuple[str, ...] = ()  # params.yaml's order of methods (JSON files sort their keys)
    class_names: dict[str, list[str]] = field(default_factory=dict)  # target -> full class names, label order
    class_counts: dict[str, ClassCounts] = field(default_factory=dict)  # target -> images per class and split
    finetune_caps: dict[str, int] = field(default_factory=dict)  # {"train": shots_per_class, "val": val_per_class}
    input_shapes: dict[str, dict[str, int]] = field(default_factory=dict)  # heterogeneous target -> `input_shape`


def collect_inputs(root: Path, params: Params | None) -> ReportInputs:
    """Read every input of the page from the project folder (missing ones stay empty).

    Raises:
        DataError: an input JSON file exists but cannot be parsed.
    """
    root = Path(root)
    if params is not None and params.finetune is not None:
        targets = list(params.finetune.targets)
    else:
        targets = sorted(p.parent.name for p in (root / "models" / "target").glob("*/selection.json"))
    selections = {}
    for target in targets:
        sel = read_json(root / "models" / "target" / target / "selection.json")
        if sel is not None:
            selections[target] = sel
    evaluate = read_json(root / "metrics" / "evaluate.json")
    configs = {t: _chosen_config(root, t, sel) for t, sel in selections.items()}
    class_names = {t: names for t in selections if (names := _class_names(t, configs[t], evaluate))}
    prepared = root / (params.data.prepared_dir if params is not None else "data/prepared")
    counts = {t: c for t in targets if (c := class_counts(prepared, t)) is not None}
    sets: dict[str, dict[str, Any]] = {}
    if params is not None and params.episodes is not None:
        for name, s in params.episodes.sets.items():
            sets[name] = {"dataset": s.dataset, "split": s.split, "n_way": s.n_way,
                          "n_query": s.n_query, "n_episodes": s.n_episodes}
    ev = params.evaluate if params is not None else None
    ft = params.finetune if params is not None else None
    return ReportInputs(
        facts=run_facts(root, params),
        evaluate=evaluate,
        meta_train=read_json(root / "metrics" / "meta_train.json"),
        selections=selections,
        promotion=read_json(root / PROMOTION_PATH),
        run_facts=read_run_facts(root),
        figures=_figures(root / "plots"),
        episode_sets=sets,
        reference=ev.reference if ev is not None else None,
        methods=tuple(ev.methods) if ev is not None else (),
        class_names=class_names,
        class_counts=counts,
        finetune_caps={"train": ft.shots_per_class, "val": ft.val_per_class} if ft is not None else {},
        input_shapes={t: shape for t, config in configs.items() if (shape := input_shape(config))},
    )


def _figures(plots: Path) -> list[tuple[str, bytes]]:
    """Every PNG under plots/ as (relative path, bytes), sorted; files without the PNG signature left out."""
    figures = []
    for png in sorted(plots.rglob("*.png")) if plots.is_dir() else []:
        data = png.read_bytes()
        if data.startswith(_PNG_MAGIC):  # a truncated/foreign file would show as a broken image
            figures.append((png.relative_to(plots).as_posix(), data))
        else:
            log.warning("%s: not a PNG file (wrong signature); left out of the report", png)
    return figures


def _chosen_config(root: Path, target: str, selection: dict[str, Any]) -> dict[str, Any]:
    """The config.json of a target's chosen model ({} when missing or unreadable: the page then shows less)."""
    chosen = selection.get("chosen")
    config = root / "models" / "target" / target / str(chosen) / "config.json"
    if not chosen or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: not readable JSON; the report shows no class names or input shape for %s", config, target)
        return {}
    return data if isinstance(data, dict) else {}


def _class_names(target: str, config: dict[str, Any], evaluate: dict[str, Any] | None) -> list[str]:
    """A target's class names in label order: from metrics/evaluate.json, else from the chosen
    model's config.json (so the card names the classes before `evaluate` has run); [] when neither has them."""
    names = (((evaluate or {}).get("target_models") or {}).get(target) or {}).get("class_names")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    names = config.get("class_names")
    return [str(n) for n in names] if isinstance(names, list) else []


def input_shape(config: dict[str, Any]) -> dict[str, int] | None:
    """Where a heterogeneous target model records its input adapter: config.json's `input` (the target's
    channels and size, written by `TargetModel.config` only when they differ from the backbone's) beside
    `backbone` (its in_channels and image_size).

    Returns:
        {"channels", "image_size", "backbone_channels", "backbone_size"}, or None for a model at the
        backbone's own shape (no `input` key) or a config without these keys.
    """
    given, backbone = config.get("input"), config.get("backbone")
    if not isinstance(given, dict) or not isinstance(backbone, dict):
        return None
    try:
        return {"channels": int(given["channels"]), "image_size": int(given["image_size"]),
                "backbone_channels": int(backbone["in_channels"]), "backbone_size": int(backbone["image_size"])}
    except (KeyError, TypeError, ValueError):
        return None


def class_counts(prepared_dir: Path, target: str) -> ClassCounts | None:
    """Images per class in the train/val/test splits of a prepared target (the manifest's rows).

    Args:
        prepared_dir: the prepared store (params.data.prepared_dir under the root).
        target: the target dataset.

    Returns:
        The counts (classes in label order; a class absent from a split counts 0), or None when the
        target is not prepared here or its manifest cannot be read (the page then shows what
        metrics/evaluate.json has: the test split only).
    """
    path = Path(prepared_dir) / target / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path, columns=["class", "label", "split"])
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors derive from these
        log.warning("%s: not readable (%s); the report shows no per-split class counts for %s", path, exc, target)
        return None
    df = df[df["split"].isin(TARGET_SPLITS)]
    if df.empty:
        return None
    names = df.drop_duplicates("label").sort_values("label")["class"].astype(str).tolist()
    by_split = df.groupby(["split", "class"]).size()
    splits = {s: [int(by_split.get((s, n), 0)) for n in names] for s in TARGET_SPLITS if s in set(df["split"])}
    return ClassCounts(names, splits)


def promotion_records(promotion: Any) -> dict[str, dict[str, Any]]:
    """reports/promotion.json as {target: latest decision record}.

    The registry writes one record per target ({target: {"decision", "reason", ...}}); a single
    record (a dict with a "decision" key) is keyed by its "target" field. Anything else gives {}.
    """
    if not isinstance(promotion, dict):
        return {}
    if "decision" in promotion:
        return {str(promotion.get("target") or "?"): promotion}
    return {str(t): r for t, r in promotion.items() if isinstance(r, dict)}
