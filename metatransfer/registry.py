"""Model registry: registration, the statistical promotion gate, rollback.

Every pipeline run registers, per target, the shipped target model as a new
version of `metatransfer-<target>` and its meta-learner (the adapt-on-request
few-shot model) as a new version of `metatransfer-<target>-learner`, both with
the alias `challenger` (see `register_finetune_result`, called by the
`finetune` stage). Promotion moves the alias `champion`; serving loads
`models:/metatransfer-<target>@champion`.

The gate (docs/registry.md): the challenger and the reference (the current
champion, or — while there is none — the target model fine-tuned from the
baseline method) classify the same held-out episodes: the target's *test*
split, shuffled with a fixed seed and cut into `n_episodes` disjoint
episodes. Per-episode accuracy differences give a paired Student-t interval;
promote only if the mean gain is ≥ `margin` and the interval lies above 0.
A challenger that is the baseline method itself (and no champion yet) is
compared with the next-best method instead (`next_best_method`); a person can
promote without the gate, with a logged reason (`force_promote`).
Disjoint episodes keep the per-episode values independent; overlapping
resampled episodes would count each image many times and make the interval
falsely narrow.

Champion history is the registered-model tag `champion_history`
(comma-separated versions, oldest first); `rollback` moves `champion` back to
the previous entry. Promotion and rollback are registry actions, not DVC
outputs: they run after `dvc repro`, from the CLI or from the Prefect flow;
the latest decision per target is also written to reports/promotion.json
(shown by the HTML report).

Every alias move and champion-history edit is journaled on the MLflow run
that makes it, with the value before, just before it is made (`move_alias`,
`set_model_tag`; tag `registry_changes`). `finetune` moves `challenger` only
as the last step of its run, `promote` and `rollback` move `champion` inside
theirs; a run that fails, or is found RUNNING after its process was killed
(`metatransfer.tracking.reap_stale_runs`), has its changes undone
(`revert_changes`). So an alias never rests on a version whose run did not
finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metatransfer.errors import MetatransferError
from metatransfer.evaluation.stats import MeanCI, paired_difference
from metatransfer.quality import (  # noqa: F401  (re-exported: the gate before registration)
    QUALITY_TAG,
    QualityVerdict,
    learner_gate,
    learner_passed,
    learner_quality,
    majority_rate,
    target_gate,
    target_quality,
)

log = logging.getLogger(__name__)

PREFIX = "metatransfer"
CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
LEARNER_TAG = "learner_version"  # on a target-model version: its learner's version
DECISIONS_PATH = Path("reports") / "promotion.json"  # latest decision per target (read by metatransfer.report)


class RegistryError(MetatransferError):
    """A registry action cannot be done as asked (missing model, alias or history)."""


# --------------------------------------------------------------------------- names and provenance
def model_name(target: str) -> str:
    """Registered-model name of a target's shipped model: `metatransfer-<target>`."""
    return f"{PREFIX}-{target}"


def learner_name(target: str) -> str:
    """Registered-model name of a target's few-shot learner: `metatransfer-<target>-learner`."""
    return f"{PREFIX}-{target}-learner"


def params_digest(root: str | Path) -> str:
    """SHA-256 of the project's params.yaml ('' when absent)."""
    path = Path(root) / "params.yaml"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def provenance_tags(root: str | Path) -> dict[str, str]:
    """Tags every registered version carries: data version (DVC md5 of data/prepared), git commit, params digest."""
    from metatransfer import tracking

    return {
        "data_version": tracking.dvc_out_md5(root, "data/prepared"),
        "git_commit": tracking.git_commit(root),
        "params_sha256": params_digest(root),
    }


# --------------------------------------------------------------------------- gate (pure)
@dataclass(frozen=True)
class GateSettings:
    """The promotion gate.

    margin: minimum mean per-episode accuracy gain of the challenger (0.01 = one point).
    confidence: level of the paired interval of the per-episode difference.
    n_episodes: disjoint held-out episodes cut from the target test split.
    baseline: finetune method whose target model a first champion must beat.
    seed: seeds the split of the test images into episodes.
    """

    margin: float = 0.01
    confidence: float = 0.95
    n_episodes: int = 20
    baseline: str = "scratch"
    seed: int = 0

    def check(self) -> None:
        """Raise RegistryError naming the bad setting."""
        if not self.margin >= 0:
            raise RegistryError(f"promote.margin: must be >= 0 (a minimum gain), found {self.margin}")
        if not 0 < self.confidence < 1:
            raise RegistryError(f"promote.confidence: must be in (0, 1), found {self.confidence}")
        if self.n_episodes < 2:
            raise RegistryError(f"promote.n_episodes: must be >= 2 (an interval needs two episodes), found {self.n_episodes}")
        if not self.baseline:
            raise RegistryError("promote.baseline: must name a finetune method (e.g. scratch)")


def gate_settings(params: Any = None, **overrides: Any) -> GateSettings:
    """Gate settings: code defaults, then params.yaml's `promote` section (if any), then `overrides`.

    Args:
        params: the loaded `Params` (its `promote` section and `seed` are used when present).
        overrides: keyword overrides; None values are ignored (unset CLI flags).

    Returns:
        Checked GateSettings.
    """
    values: dict[str, Any] = {}
    if params is not None:
        values["seed"] = params.seed
        section = getattr(params, "promote", None)
        if section is not None:
            values.update({k: getattr(section, k) for k in ("margin", "confidence", "n_episodes", "baseline") if hasattr(section, k)})
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = GateSettings(**values)
    settings.check()
    return settings


def gate_episodes(n_images: int, n_episodes: int, seed: int) -> list[np.ndarray]:
    """Split image indices 0..n_images-1 into `n_episodes` disjoint, seeded episodes.

    The indices are permuted with `numpy.random.default_rng(seed)` and cut
    with `numpy.array_split`, so every image is in exactly one episode and
    episode sizes differ by at most one.

    Returns:
        One sorted int64 index array per episode.
    """
    if n_episodes < 2 or n_episodes > n_images:
        raise RegistryError(f"promote.n_episodes: must be in [2, {n_images}] (test images), found {n_episodes}")
    perm = np.random.default_rng(seed).permutation(n_images)
    return [np.sort(e).astype(np.int64) for e in np.array_split(perm, n_episodes)]


def episodes_digest(episodes: list[np.ndarray]) -> str:
    """SHA-256 over the episode index arrays (identifies the exact held-out episodes)."""
    h = hashlib.sha256()
    for e in episodes:
        h.update(np.asarray(e, dtype="<i8").tobytes())
        h.update(b"|")
    return h.hexdigest()


def episode_accuracies(predictions: np.ndarray, labels: np.ndarray, episodes: list[np.ndarray]) -> np.ndarray:
    """Per-episode accuracy (float64) of per-image predictions."""
    pred, lab = np.asarray(predictions), np.asarray(labels)
    if pred.shape != lab.shape:
        raise RegistryError(f"predictions {pred.shape} and labels {lab.shape} differ in shape")
    correct = (pred == lab).astype(np.float64)
    return np.array([correct[e].mean() for e in episodes], dtype=np.float64)


@dataclass(frozen=True)
class GateDecision:
    """Whether the challenger passes, with the paired difference it was judged on."""

    promote: bool
    gain: MeanCI
    reason: str


def decide(challenger_acc: np.ndarray, reference_acc: np.ndarray, margin: float, confidence: float) -> GateDecision:
    """The gate rule: promote iff mean gain ≥ margin and the paired CI lies above 0.

    Args:
        challenger_acc, reference_acc: per-episode accuracies on the same episodes, same order.
        margin: minimum mean gain.
        confidence: interval level (e.g. 0.95).

    Returns:
        GateDecision with the paired difference challenger − reference.
    """
    gain = paired_difference(challenger_acc, reference_acc, confidence)
    pct = f"{100 * confidence:g} %"
    ci = f"[{gain.low:+.4f}, {gain.high:+.4f}]"
    if not np.isfinite(gain.ci):
        return GateDecision(False, gain, "the interval cannot be computed (fewer than two episodes)")
    if gain.mean < margin:
        return GateDecision(False, gain, f"mean gain {gain.mean:+.4f} is below the margin {margin:.4f} (paired {pct} CI {ci})")
    if not gain.low > 0:
        return GateDecision(False, gain, f"paired {pct} CI {ci} of the gain does not exclude 0 (mean {gain.mean:+.4f})")
    return GateDecision(True, gain, f"mean gain {gain.mean:+.4f} >= margin {margin:.4f} and paired {pct} CI {ci} excludes 0")


# --------------------------------------------------------------------------- registry access
def client_for(root: str | Path):
    """An MlflowClient on the project store (and the global URI set, for pyfunc loading)."""
    from mlflow.tracking import MlflowClient

    from metatransfer import tracking

    tracking.configure(root)
    return MlflowClient(tracking.tracking_uri(root))


def _require_challenger(client: Any, name: str, root: Path) -> Any:
    """The version behind `challenger`, or a RegistryError saying how to get one."""
    from metatransfer import tracking

    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"{name}: no version with alias '{CHALLENGER}' in {tracking.tracking_uri(root)}; "
            "run the pipeline (`dvc repro` or the `pipeline` flow) so `finetune` registers one")
    return challenger


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The ModelVersion behind `name@alias`, or None when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _model_exists(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise


def champion_history(client: Any, name: str) -> list[str]:
    """Versions that were champion, oldest first (the `champion_history` tag)."""
    tags = client.get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def _set_history(client: Any, name: str, history: list[str]) -> None:
    set_model_tag(client, name, HISTORY_TAG, ",".join(history))


# --------------------------------------------------------------------------- journaled changes
def _alias_target(client: Any, name: str, alias: str) -> str | None:
    mv = _alias_version(client, name, alias)
    return str(mv.version) if mv is not None else None


def _model_tag(client: Any, name: str, key: str) -> str | None:
    return (client.get_registered_model(name).tags or {}).get(key) if _model_exists(client, name) else None


def move_alias(client: Any, name: str, alias: str, version: str | None) -> None:
    """Point `name@alias` at `version` (None: remove the alias), journaled on the active run first."""
    from metatransfer import tracking

    before = _alias_target(client, name, alias)
    tracking.record_registry_change({"name": name, "alias": alias, "from": before,
                                     "to": None if version is None else str(version)})
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))


def set_model_tag(client: Any, name: str, key: str, value: str) -> None:
    """Set a registered-model tag, journaled on the active run first."""
    from metatransfer import tracking

    tracking.record_registry_change({"name": name, "tag": key, "from": _model_tag(client, name, key), "to": value})
    client.set_registered_model_tag(name, key, value)


def revert_changes(client: Any, changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Undo journaled registry changes, newest first.

    A change is undone only where the alias or tag still holds the value the run
    set: a later change by someone else is never overwritten.

    Returns:
        The changes undone.
    """
    from mlflow.exceptions import MlflowException

    undone = []
    for change in reversed(changes):
        name, before, after = change.get("name"), change.get("from"), change.get("to")
        try:
            if "alias" in change:
                alias = change["alias"]
                if _alias_target(client, name, alias) != after:
                    continue
                if before is None:
                    client.delete_registered_model_alias(name, alias)
                else:
                    client.set_registered_model_alias(name, alias, before)
            elif "tag" in change:
                if _model_tag(client, name, change["tag"]) != after:
                    continue
                if before is None:
                    client.delete_registered_model_tag(name, change["tag"])
                else:
                    client.set_registered_model_tag(name, change["tag"], before)
            else:
                continue
        except MlflowException as exc:  # e.g. the earlier version was deleted since
            log.warning("%s: could not undo %s: %s", name, change, exc)
            continue
        log.warning("%s: undid %s %s -> %s (its run did not finish)", name,
                    f"alias {change['alias']!r}" if "alias" in change else f"tag {change['tag']!r}", before, after)
        undone.append(change)
    return undone


def register_version(client: Any, model_uri: str, name: str, tags: dict[str, str], description: str,
                     alias: str | None = CHALLENGER) -> str:
    """Register `model_uri` as a new version of `name` with tags, description and an alias.

    Inside a stage run the alias moves only as the run's last step
    (`tracking.at_run_end`): a run killed or failing before that leaves the alias
    where it was.

    Returns:
        The new version number (as a string).
    """
    import mlflow

    from metatransfer import tracking

    if not _model_exists(client, name):
        client.create_registered_model(name, description=f"{name}: see docs/registry.md (aliases champion / challenger)")
    mv = mlflow.register_model(model_uri, name, tags={k: str(v)[:5000] for k, v in tags.items()})
    client.update_model_version(name, mv.version, description=description)
    if alias:
        tracking.at_run_end(lambda: move_alias(client, name, alias, str(mv.version)))
    return str(mv.version)


def validation_table(entry: dict[str, Any]) -> str:
    """Markdown table of the finetune evidence (target validation accuracy per method)."""
    lines = ["| method | val acc | best step | chosen |", "|---|---|---|---|"]
    for method, m in entry.get("methods", {}).items():
        lines.append(f"| {method} | {m.get('val_acc', float('nan')):.4f} | {m.get('best_step', '')} | "
                     f"{'yes' if method == entry.get('chosen') else ''} |")
    return "\n".join(lines)


def register_finetune_result(root: str | Path, target: str, entry: dict[str, Any], model_uri: str,
                             learner_uri: str | None, run_id: str = "",
                             class_names: list[str] | None = None) -> dict[str, Any]:
    """Register a finetune run's shipped model (and its learner) as `challenger` versions.

    Args:
        root: project root (provenance tags are read from it).
        target: the target dataset.
        entry: the selection entry ({"chosen", "reason", "methods": {m: {"val_acc", ...}}}).
        model_uri: the logged target model (models:/<id>).
        learner_uri: the logged few-shot learner of the chosen method, or None.
        run_id: the MLflow run that logged them.
        class_names: the target's classes in label order (default: the chosen model's
            models/target/<target>/<chosen>/config.json); the model version's tags and
            description list them.

    Returns:
        {"model": {"name", "version"}, "learner": {"name", "version"} or None}.
    """
    chosen = entry["chosen"]
    gate = (entry.get("methods", {}).get(chosen) or {}).get(QUALITY_TAG) or {}
    if gate and not gate.get("passed", True):
        # The last line of defence: `publish_finetune_result` does not even log such a model.
        log.warning("%s: %s not registered as %s: quality gate refused it (%s)", target, chosen, CHALLENGER,
                    gate.get("reason", ""))
        return {"model": None, "learner": None, "refused": gate.get("reason", "quality gate")}
    client = client_for(root)
    tags = {
        **provenance_tags(root), "target": target, "method": chosen, "mlflow_run_id": run_id,
        QUALITY_TAG: "passed" if gate else "not_tested", "quality_reason": gate.get("reason", ""),
        "val_acc": f"{entry['methods'][chosen]['val_acc']:.6f}", "selection_reason": entry.get("reason", ""),
        "validation_table": json.dumps(entry.get("methods", {}), sort_keys=True, default=float),
    }
    table = validation_table(entry)
    out: dict[str, Any] = {"learner": None}
    if learner_uri:
        lv = register_version(client, learner_uri, learner_name(target), {**tags, "kind": "few_shot_learner"},
                              f"Few-shot learner `{chosen}` for `{target}` (adapt on request: support + query).\n\n"
                              f"Target validation evidence:\n\n{table}\n")
        out["learner"] = {"name": learner_name(target), "version": lv}
        tags[LEARNER_TAG] = lv
    from metatransfer import tracking
    from metatransfer.classnames import display_names

    names = list(class_names or tracking.target_class_names(Path(root) / "models" / "target" / target / chosen))
    short = display_names(names)
    class_tags = {"class_names": json.dumps(short, ensure_ascii=False),
                  "class_names_full": json.dumps(names, ensure_ascii=False)} if names else {}
    classes = ("Classes (index: name, as served in `class_name`): "
               + ", ".join(f"{i}: {n}" for i, n in enumerate(short)) + ".\n\n") if names else ""
    mv = register_version(client, model_uri, model_name(target), {**tags, **class_tags, "kind": "target_model"},
                          f"Target model for `{target}` fine-tuned from `{chosen}` ({entry.get('reason', '')}).\n\n"
                          f"{classes}Target validation evidence:\n\n{table}\n")
    out["model"] = {"name": model_name(target), "version": mv}
    log.info("%s: registered %s v%s%s as %s", target, model_name(target), mv,
             f" and {learner_name(target)} v{out['learner']['version']}" if out["learner"] else "", CHALLENGER)
    return out


def publish_finetune_result(root: str | Path, params: Any, target: str, entry: dict[str, Any], folder: str | Path,
                            run_id: str = "") -> dict[str, Any]:
    """Log the chosen target model (and its learner) to the active MLflow run and register them as challengers,
    unless the quality gate refused them.

    Args:
        root: project root.
        params: loaded params (image shape, promote settings).
        target: the target dataset.
        entry: the selection entry (with `methods[m].quality_gate` verdicts, see `target_gate`).
        folder: the chosen target model's folder.
        run_id: the active MLflow run.

    Returns:
        The run-specific facts (not a DVC output): {"model_uri", "learner_uri", "registered", "refused"}.
    """
    import mlflow

    from metatransfer import tracking

    chosen = entry["chosen"]
    gate = (entry["methods"][chosen].get(QUALITY_TAG) or {})
    facts: dict[str, Any] = {"chosen": chosen, "model_uri": None, "learner_uri": None,
                             "registered": {"model": None, "learner": None}, "refused": None}
    if gate and not gate.get("passed", True):
        facts["refused"] = gate.get("reason", "")
        mlflow.set_tag(f"{target}/{QUALITY_TAG}", "refused")
        log.warning("%s: quality gate: target model %s NOT registered as %s: %s", target, chosen, CHALLENGER,
                    facts["refused"])
        return facts
    mlflow.set_tag(f"{target}/{QUALITY_TAG}", "passed")
    n_classes = len(json.loads((Path(folder) / "config.json").read_text())["class_names"])
    facts["model_uri"] = tracking.log_target_model(folder, params.prepare.channels, params.prepare.image_size,
                                                   n_classes, name=f"target_{target}")
    ok, why = learner_passed(root, chosen)
    if ok:
        facts["learner_uri"] = log_learner_for(chosen, params, root, target)
    else:
        log.warning("%s: quality gate: learner %s NOT registered as %s: %s", target, chosen, CHALLENGER, why)
        facts["learner_refused"] = why
    facts["registered"] = register_finetune_result(root, target, entry, facts["model_uri"], facts["learner_uri"],
                                                   run_id)
    return facts


def log_learner_for(method: str, params: Any, root: str | Path, target: str) -> str:
    """Log the few-shot learner of `method` (inside the active run) and return its model URI.

    For "scratch" (nothing meta-trained on disk) the seeded fresh learner is saved first.
    """
    from metatransfer import tracking

    channels, size = params.prepare.channels, params.prepare.image_size
    from metatransfer.learners import method_folder

    folder = method_folder(method, Path(root))
    if method != "scratch" and folder.is_dir():
        return tracking.log_few_shot_model(folder, channels, size, name=f"learner_{target}")
    from metatransfer.artifacts import save_learner
    from metatransfer.learners import load_method

    with tempfile.TemporaryDirectory() as tmp:
        save_learner(load_method(method, params, Path(root)), Path(tmp) / method)
        return tracking.log_few_shot_model(Path(tmp) / method, channels, size, name=f"learner_{target}")


# --------------------------------------------------------------------------- predictions
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


def _test_images(params: Any, root: Path, target: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The target test split as float32 [0, 1] images, labels and its fingerprint."""
    from metatransfer.data.store import load_split
    from metatransfer.episodes import split_fingerprint

    split = load_split(root / params.data.prepared_dir, target, "test")
    images = np.ascontiguousarray(split.images, dtype=np.float32) / np.float32(255.0)
    return images, split.labels.astype(np.int64), split_fingerprint(split)


# --------------------------------------------------------------------------- actions
@dataclass
class PromotionResult:
    """The outcome of one promotion attempt.

    decision: "promoted", "rejected" or "already_champion" ("no_challenger" from promote_targets);
    `forced` marks a promotion by `force_promote` (the reason is then the person's).
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
        """JSON-ready dict (the per-episode evidence only when asked)."""
        d = asdict(self)
        if not evidence:
            d.pop("evidence")
        return d


@contextlib.contextmanager
def _parent_run(parent_run_id: str | None) -> Iterator[None]:
    """Make runs opened inside children of `parent_run_id` (the pipeline run), if given."""
    from metatransfer.tracking import PARENT_ENV

    if not parent_run_id:
        yield
        return
    saved = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = parent_run_id
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = saved


def record_decision(root: str | Path, target: str, summary: dict[str, Any]) -> Path:
    """Store the latest registry decision of `target` in reports/promotion.json (other targets kept).

    Not a DVC output: promotion is a registry action; the HTML report shows this file.
    """
    from metatransfer.stages.common import write_json

    path = Path(root) / DECISIONS_PATH
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        data = {}  # a damaged record is rewritten, never a reason to fail a promotion
    data[target] = summary
    write_json(path, data)
    return path


def _load_params(root: Path):
    from metatransfer.config import load_params

    return load_params(root / "params.yaml")


def promote(root: str | Path, target: str, settings: GateSettings | None = None,
            parent_run_id: str | None = None) -> PromotionResult:
    """Run the gate for `target`'s challenger and move `champion` if it passes.

    The decision and its evidence (per-episode accuracies, episodes, interval)
    are logged to MLflow as a run named `promote` (tags: decision, target,
    challenger/champion versions; a JSON artifact `promote/<target>.json`),
    and summarised as tags on the challenger version.

    Args:
        root: project root (params.yaml, prepared data, models/target, mlflow store).
        target: target dataset name.
        settings: gate settings (default: from params.yaml, see `gate_settings`).
        parent_run_id: MLflow run the `promote` run becomes a child of (default:
            $METATRANSFER_PARENT_RUN_ID, else none).

    Returns:
        PromotionResult.

    Raises:
        RegistryError: no challenger registered, or the baseline model is missing.
    """
    import mlflow

    from metatransfer import tracking

    root = Path(root).resolve()
    params = _load_params(root)
    settings = settings or gate_settings(params)
    settings.check()
    client = client_for(root)
    name = model_name(target)
    challenger = _require_challenger(client, name, root)
    champion = _alias_version(client, name, CHAMPION)
    cv = str(challenger.version)
    before = str(champion.version) if champion is not None else None
    if before == cv:
        return PromotionResult(target, name, "already_champion", f"version {cv} is already the champion",
                               cv, before, before, f"champion v{before}")
    if challenger.tags.get(QUALITY_TAG) == "refused":
        # Never registered by the pipeline; a version tagged by hand must not slip through either.
        reason = f"version {cv} failed the quality gate ({challenger.tags.get('quality_reason', '')}); not promotable"
        log.warning("%s: %s", name, reason)
        return PromotionResult(target, name, "rejected", reason, cv, before, before, "quality gate")

    # The baseline a first champion must beat may be the challenger itself (the validation winner is
    # `scratch`): the gate would compare it with itself (gain 0, CI [0, 0]) and could never pass. It is
    # compared with the best other method instead, or, with none, rejected with the way out.
    is_baseline = champion is None and challenger.tags.get("method", "") == settings.baseline
    next_best = next_best_method(root, target, settings.baseline) if is_baseline else None
    if is_baseline and next_best is None:
        reason = (f"version {cv} is the baseline method {settings.baseline!r} itself, so the gate would compare it "
                  "with itself (gain +0.0000) and can never pass, and no other fine-tuned method of "
                  f"models/target/{target}/selection.json is on disk to compare with; promote it deliberately with "
                  f"`metatransfer promote --target {target} --force --reason \"...\"`")
        log.warning("%s: %s", name, reason)
        result = PromotionResult(target, name, "rejected", reason, cv, before, before, f"baseline {settings.baseline}")
        record_decision(root, target, {**result.to_dict(), "confidence": settings.confidence,
                                       "margin": settings.margin, "n_episodes": settings.n_episodes, "time": _now()})
        return result

    images, labels, fingerprint = _test_images(params, root, target)
    episodes = gate_episodes(len(labels), settings.n_episodes, settings.seed)
    chall_pred = predict_uri(f"models:/{name}/{cv}", images)
    if champion is not None:
        reference = f"champion v{before}"
        ref_info: dict[str, Any] = {"kind": "champion", "version": before, "method": champion.tags.get("method", "")}
        ref_pred = predict_uri(f"models:/{name}/{before}", images)
    else:
        from metatransfer.artifacts import sha256_file

        if is_baseline:
            folder = root / "models" / "target" / target / next_best
            reference = f"next-best {next_best}"
            kind = "next_best"
        else:
            folder = root / "models" / "target" / target / settings.baseline
            if not (folder / "config.json").is_file():
                raise RegistryError(
                    f"{folder}: no baseline target model for the first champion of {name}; add "
                    f"{settings.baseline!r} to finetune.methods and run `dvc repro finetune`, or choose "
                    "another baseline (promote.baseline / --baseline)")
            reference = f"baseline {settings.baseline}"
            kind = "baseline"
        ref_info = {"kind": kind, "method": folder.name, "path": str(folder.relative_to(root)),
                    "weights_sha256": sha256_file(folder / "model.safetensors")}
        ref_pred = predict_folder(folder, images)
    chall_acc = episode_accuracies(chall_pred, labels, episodes)
    ref_acc = episode_accuracies(ref_pred, labels, episodes)
    verdict = decide(chall_acc, ref_acc, settings.margin, settings.confidence)
    if is_baseline:
        why = (f"version {cv} is the baseline method {settings.baseline!r} itself, so it is compared with the "
               f"next-best method {next_best!r}: {verdict.reason}")
        if not verdict.promote:
            why += f"; to ship it anyway: `metatransfer promote --target {target} --force --reason \"...\"`"
        verdict = GateDecision(verdict.promote, verdict.gain, why)
    decision = "promoted" if verdict.promote else "rejected"
    after = cv if verdict.promote else before
    evidence = {
        "target": target, "model_name": name, "decision": decision, "reason": verdict.reason,
        "settings": asdict(settings),
        "challenger": {"version": cv, "method": challenger.tags.get("method", ""), "acc": float(chall_acc.mean())},
        "reference": {**ref_info, "acc": float(ref_acc.mean())},
        "episodes": {"split": "test", "n_images": int(len(labels)), "split_fingerprint": fingerprint,
                     "n_episodes": len(episodes), "seed": settings.seed, "sha256": episodes_digest(episodes),
                     "indices": [e.tolist() for e in episodes]},
        "per_episode": {"challenger": chall_acc.tolist(), "reference": ref_acc.tolist(),
                        "difference": (chall_acc - ref_acc).tolist()},
        "gain": {"mean": verdict.gain.mean, "ci_low": verdict.gain.low, "ci_high": verdict.gain.high,
                 "confidence": settings.confidence, "n": verdict.gain.n},
        "champion_before": before, "champion_after": after,
    }
    with _parent_run(parent_run_id), tracking.stage_run("promote", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "decision": decision, "challenger_version": cv,
                         "champion_version": after or "", "previous_champion_version": before or "",
                         "reference": reference})
        tracking.log_params({f"promote.{k}": v for k, v in asdict(settings).items()})
        tracking.log_metrics({"promote/gain_mean": verdict.gain.mean, "promote/gain_ci_low": verdict.gain.low,
                              "promote/gain_ci_high": verdict.gain.high, "promote/challenger_acc": float(chall_acc.mean()),
                              "promote/reference_acc": float(ref_acc.mean())})
        tracking.log_dict(evidence, f"promote/{target}.json")
        run_id = run.info.run_id
        if verdict.promote:  # inside the run, journaled: a kill here is undone by the reaper
            _move_champion(client, target, cv, challenger.tags.get(LEARNER_TAG))
            _set_history(client, name, [*champion_history(client, name), cv])
    for key, value in {"gate_decision": decision, "gate_reference": reference, "gate_gain_mean": f"{verdict.gain.mean:.6f}",
                       "gate_ci_low": f"{verdict.gain.low:.6f}", "gate_ci_high": f"{verdict.gain.high:.6f}",
                       "gate_run_id": run_id}.items():
        client.set_model_version_tag(name, cv, key, value)
    log.info("%s: challenger v%s %s against %s: %s", name, cv, decision, reference, verdict.reason)
    result = PromotionResult(target, name, decision, verdict.reason, cv, before, after, reference,
                             verdict.gain.mean, verdict.gain.low, verdict.gain.high, run_id, evidence)
    record_decision(root, target, {**result.to_dict(), "confidence": settings.confidence, "margin": settings.margin,
                                   "n_episodes": settings.n_episodes, "time": _now()})
    return result


def next_best_method(root: str | Path, target: str, baseline: str) -> str | None:
    """The method with the best target validation accuracy other than `baseline`, or None.

    Read from models/target/<target>/selection.json (the `finetune` stage's record); only
    methods whose target model is on disk (config.json) count. Ties: the first listed.
    """
    folder = Path(root) / "models" / "target" / target
    try:
        methods = json.loads((folder / "selection.json").read_text()).get("methods", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    ranked = [(float(m.get("val_acc", float("-inf"))), -i, name) for i, (name, m) in enumerate(methods.items())
              if name != baseline and isinstance(m, dict) and (folder / name / "config.json").is_file()]
    return max(ranked)[2] if ranked else None


def force_promote(root: str | Path, target: str, reason: str, parent_run_id: str | None = None) -> PromotionResult:
    """Move `champion` of `target` to its `challenger` without the gate: a person's deliberate decision.

    For a challenger the gate cannot judge fairly (e.g. the baseline method itself).
    Logged as a run `promote` with tags decision=promoted, forced=true and
    force_reason, the param `promote.force_reason`, the version tags
    gate_decision=promoted, gate_forced=true, gate_reason; recorded in
    reports/promotion.json with `forced: true` and the reason. The champion
    history grows as after a gated promotion, so `rollback` undoes it.

    Args:
        root: project root.
        target: target dataset name.
        reason: why the gate is overridden (required, kept verbatim).
        parent_run_id: see `promote`.

    Raises:
        RegistryError: empty reason, no challenger, or a challenger the quality gate refused.
    """
    import mlflow

    from metatransfer import tracking

    reason = (reason or "").strip()
    if not reason:
        raise RegistryError("--force needs --reason \"...\": a forced promotion skips the gate and must say why")
    root = Path(root).resolve()
    client = client_for(root)
    name = model_name(target)
    challenger = _require_challenger(client, name, root)
    cv = str(challenger.version)
    champion = _alias_version(client, name, CHAMPION)
    before = str(champion.version) if champion is not None else None
    if before == cv:
        return PromotionResult(target, name, "already_champion", f"version {cv} is already the champion",
                               cv, before, before, f"champion v{before}")
    if challenger.tags.get(QUALITY_TAG) == "refused":
        raise RegistryError(f"{name}: version {cv} failed the quality gate ({challenger.tags.get('quality_reason', '')}); "
                            "not promotable, not even with --force")
    with _parent_run(parent_run_id), tracking.stage_run("promote", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "decision": "promoted", "forced": "true",
                         "force_reason": reason[:5000], "challenger_version": cv, "champion_version": cv,
                         "previous_champion_version": before or "", "reference": "none (forced)"})
        tracking.log_params({"promote.forced": True, "promote.force_reason": reason})
        run_id = run.info.run_id
        _move_champion(client, target, cv, challenger.tags.get(LEARNER_TAG))
        _set_history(client, name, [*champion_history(client, name), cv])
    for key, value in {"gate_decision": "promoted", "gate_forced": "true", "gate_reason": reason[:5000],
                       "gate_run_id": run_id}.items():
        client.set_model_version_tag(name, cv, key, value)
    log.warning("%s: challenger v%s promoted WITHOUT the gate (--force): %s", name, cv, reason)
    result = PromotionResult(target, name, "promoted", reason, cv, before, cv, "none (forced)", run_id=run_id,
                             forced=True)
    record_decision(root, target, {**result.to_dict(), "time": _now()})
    return result


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _move_champion(client: Any, target: str, version: str, learner_version: str | None) -> None:
    """Point `champion` at `version` (and the learner registered with it, if any); journaled."""
    move_alias(client, model_name(target), CHAMPION, version)
    if learner_version and _model_exists(client, learner_name(target)):
        move_alias(client, learner_name(target), CHAMPION, learner_version)


def promote_targets(root: str | Path, targets: list[str] | None = None, settings: GateSettings | None = None,
                    missing_ok: bool = False, parent_run_id: str | None = None) -> list[PromotionResult]:
    """`promote` for several targets (default: finetune.targets from params.yaml).

    Args:
        parent_run_id: see `promote`.
        missing_ok: a target without a challenger yields decision "no_challenger" instead of an error
            (the pipeline flow uses this: a run whose finetune stage was skipped registers nothing).
    """
    root = Path(root).resolve()
    params = _load_params(root)
    if targets is None:
        if params.finetune is None:
            raise RegistryError(f"{root / 'params.yaml'}: no `finetune` section, so no targets; pass --target")
        targets = list(params.finetune.targets)
    settings = settings or gate_settings(params)
    results = []
    for target in targets:
        try:
            results.append(promote(root, target, settings, parent_run_id))
        except RegistryError as exc:
            if not missing_ok or "no version with alias" not in str(exc):
                raise
            log.warning("%s", exc)
            results.append(PromotionResult(target, model_name(target), "no_challenger", str(exc)))
    return results


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


def rollback(root: str | Path, target: str) -> RollbackResult:
    """Move `champion` of `target` back to the previous champion.

    The rolled-back version is tagged `rolled_back=true`; if it still holds
    `challenger`, that alias is removed so the next `promote` does not
    re-promote it. The learner's `champion` follows. Logged as a run `rollback`.

    Raises:
        RegistryError: no champion, no previous champion, or the alias and history disagree.
    """
    import mlflow

    from metatransfer import tracking

    root = Path(root).resolve()
    client = client_for(root)
    name = model_name(target)
    if not _model_exists(client, name):
        raise RegistryError(f"{name}: not registered in {tracking.tracking_uri(root)}; nothing to roll back")
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name}: has no '{CHAMPION}' alias; nothing to roll back")
    current = str(champion.version)
    history = champion_history(client, name)
    if not history or history[-1] != current:
        raise RegistryError(
            f"{name}: '{CHAMPION}' is version {current} but the {HISTORY_TAG} tag is {history or 'empty'}; "
            "the alias was moved outside `metatransfer promote`. Set the alias back or fix the tag "
            f"(MlflowClient().set_registered_model_tag({name!r}, {HISTORY_TAG!r}, '...'))")
    if len(history) < 2:
        raise RegistryError(
            f"{name}: version {current} is the first champion; there is no previous champion to roll back to. "
            f"To withdraw it, delete the alias (MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r}))")
    previous = history[-2]
    prev_mv = client.get_model_version(name, previous)
    # Inside the run, journaled: a rollback killed half-way is undone by the reaper.
    with tracking.stage_run("rollback", root) as run:
        mlflow.set_tags({"target": target, "model_name": name, "from_version": current, "to_version": previous})
        run_id = run.info.run_id
        _move_champion(client, target, previous, prev_mv.tags.get(LEARNER_TAG))
        _set_history(client, name, history[:-1])
        chall = _alias_version(client, name, CHALLENGER)
        if chall is not None and str(chall.version) == current:
            move_alias(client, name, CHALLENGER, None)
    client.set_model_version_tag(name, current, "rolled_back", "true")
    log.info("%s: champion rolled back from v%s to v%s", name, current, previous)
    result = RollbackResult(target, name, current, previous, history[:-1], run_id)
    record_decision(root, target, {"decision": "rolled_back", "name": name, "champion_before": current,
                                   "champion_after": previous, "run_id": run_id, "time": _now()})
    return result


def registry_status(root: str | Path, targets: list[str] | None = None) -> dict[str, Any]:
    """Aliases, champion history and versions of every target's registered models.

    Returns:
        {target: {name: {"aliases": {alias: version}, "history": [...],
                         "versions": [{"version", "method", "aliases", "gate_decision", "rolled_back", "created"}]}}}
    """
    root = Path(root).resolve()
    if targets is None:
        params = _load_params(root)
        targets = list(params.finetune.targets) if params.finetune else []
    client = client_for(root)
    out: dict[str, Any] = {}
    for target in targets:
        out[target] = {}
        for name in (model_name(target), learner_name(target)):
            if not _model_exists(client, name):
                out[target][name] = None
                continue
            rm = client.get_registered_model(name)
            aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
            versions = []
            for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
                versions.append({
                    "version": str(mv.version), "method": mv.tags.get("method", ""),
                    "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                    "gate_decision": mv.tags.get("gate_decision", ""), "rolled_back": mv.tags.get("rolled_back", "") == "true",
                    "created": int(mv.creation_timestamp or 0),
                })
            out[target][name] = {"aliases": aliases, "history": champion_history(client, name), "versions": versions}
    return out
