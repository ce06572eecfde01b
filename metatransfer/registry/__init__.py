"""Model registry: registration, the statistical promotion gate, rollback.

Every pipeline run registers, per target, the shipped target model as a new
version of `metatransfer-<target>` and its meta-learner (the adapt-on-request
few-shot model) as a new version of `metatransfer-<target>-learner`, both with
the alias `challenger` (see `register_finetune_result`, called by the
`finetune` stage). Promotion moves the alias `champion`; serving loads
`models:/metatransfer-<target>@champion`.

The gate (docs/registry.md): the challenger and the reference (the current
champion, or — while there is none — the target model fine-tuned from the
baseline method) classify the same held-out test folds: the target's *test*
split, shuffled with a fixed seed and cut into `n_folds` disjoint folds (not
N-way K-shot episodes). Per-fold accuracy differences give a paired Student-t interval;
promote only if the mean gain is ≥ `margin` and the interval lies above 0.
A challenger that is the baseline method itself (and no champion yet) is
compared with the next-best method instead (`next_best_method`); a person can
promote without the gate, with a logged reason (`force_promote`).
Disjoint folds keep the per-fold values independent; overlapping
resampled folds would count each image many times and make the interval
falsely narrow.

Champion history is the registered-model tag `champion_history`
(comma-separated versions, oldest first); `rollback` moves `champion` back to
the previous entry. Promotion and rollback are registry actions, not DVC
outputs: they run after `dvc repro`, from the CLI or from the Prefect flow;
the latest decision per target is also written to reports/promotion.json
(shown by the HTML report).

Every alias move and champion-history edit is journaled on the MLflow run
that makes it, with the value before, just before it is made (`move_alias`,
`set_model_tag`; tag `registry_changes`, see `metatransfer.journal`). `finetune` moves `challenger` only
as the last step of its run, `promote` and `rollback` move `champion` inside
theirs; a run that fails, or is found RUNNING after its process was killed
(`metatransfer.tracking.reap_stale_runs`), has its changes undone
(`revert_changes`). So an alias never rests on a version whose run did not
finish.

An unlabelled target (`finetune.unlabeled`) registers its cluster model the
same way (tag `kind=cluster_model`, no learner); `promote` scores it on
matched accuracy against hidden test labels, or answers `needs_review` when
there are none (`unlabeled`, docs/registry.md "Unlabelled targets").

Modules: `gate` (the pure promotion gate, no MLflow), `client` (names,
aliases, tags, versions, champion history), `publish` (logging and registering
a finetune result), `predict` (the predictions the gate compares), `promotion`
and `rollback` (the actions, run as MLflow runs), `unlabeled` (cluster models), `record` (their results and
reports/promotion.json). The names below are the package's public interface.
"""

from __future__ import annotations

from metatransfer.provenance import params_digest
from metatransfer.quality import (  # re-exported: the gate before registration
    QUALITY_TAG,
    QualityVerdict,
    learner_gate,
    learner_passed,
    learner_quality,
    majority_rate,
    target_gate,
    target_quality,
)
from metatransfer.registry.client import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    LEARNER_TAG,
    PREFIX,
    NoChallengerError,
    alias_version,
    champion_history,
    client_for,
    learner_name,
    model_exists,
    model_name,
    move_alias,
    move_champion,
    provenance_tags,
    register_version,
    require_challenger,
    revert_changes,
    set_history,
    set_model_tag,
)
from metatransfer.registry.gate import (
    GateDecision,
    GateSettings,
    RegistryError,
    decide,
    fold_accuracies,
    folds_digest,
    gate_settings,
    test_folds,
)
from metatransfer.registry.predict import held_out_images, predict_folder, predict_uri
from metatransfer.registry.promotion import force_promote, next_best_method, promote, promote_targets
from metatransfer.registry.publish import (
    class_tags,
    log_learner_for,
    publish_finetune_result,
    register_finetune_result,
    validation_table,
)
from metatransfer.registry.record import DECISIONS_PATH, PromotionResult, RollbackResult, record_decision
from metatransfer.registry.rollback import registry_status, rollback
from metatransfer.registry.unlabeled import (
    CLUSTER_KIND,
    NEEDS_REVIEW,
    cross_fitted_matched_accuracies,
    hidden_label_scores,
    is_cluster_model,
    publish_cluster_result,
)

__all__ = [
    "CHALLENGER", "CHAMPION", "CLUSTER_KIND", "DECISIONS_PATH", "NEEDS_REVIEW", "HISTORY_TAG", "LEARNER_TAG", "PREFIX", "QUALITY_TAG",
    "GateDecision", "GateSettings", "NoChallengerError", "cross_fitted_matched_accuracies", "hidden_label_scores",
    "is_cluster_model", "publish_cluster_result", "PromotionResult", "QualityVerdict", "RegistryError",
    "RollbackResult", "alias_version", "champion_history", "class_tags", "client_for", "decide", "fold_accuracies",
    "folds_digest", "force_promote", "gate_settings", "held_out_images", "learner_gate", "learner_name",
    "learner_passed", "learner_quality", "log_learner_for", "majority_rate", "model_exists", "model_name",
    "move_alias", "move_champion", "next_best_method", "params_digest", "predict_folder", "predict_uri",
    "promote", "promote_targets", "provenance_tags", "publish_finetune_result", "record_decision",
    "register_finetune_result", "register_version", "registry_status", "require_challenger", "revert_changes",
    "rollback", "set_history", "set_model_tag", "target_gate", "target_quality", "test_folds", "validation_table",
]
