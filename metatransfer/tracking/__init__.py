"""Experiment tracking: every MLflow run of the project, and the store they are kept in.

Defaults: a sqlite store in the project (`sqlite:///<root>/mlflow.db`) and
artifacts under `<root>/mlartifacts`; MLFLOW_TRACKING_URI overrides the
store. Every stage opens one run named after the stage; when the Prefect
`pipeline` flow (or any caller) sets METATRANSFER_PARENT_RUN_ID, stage runs
become its children, so one pipeline run groups its stages in the UI.

Several processes may log to one sqlite store at once (parallel stages,
`dvc exp run` queues, several pipeline runs). Three things keep that safe:

- the store is switched to write-ahead logging (WAL), so readers never block
  the writer and a commit costs one append instead of a journal rewrite;
- every connection waits up to SQLITE_TIMEOUT_S for the write lock
  (`?timeout=` in the URI, read by SQLAlchemy's sqlite driver) instead of
  sqlite's 5 s, after which it would raise "database is locked";
- creating the schema (MLflow's migrations) and the experiment happens under
  an exclusive file lock: without it, processes that start together on a new
  store race through the migrations ("duplicate column name") or create the
  experiment twice.

WAL needs a local file system (not NFS); for many users or machines put a
tracking server (`mlflow server`, see docs/bad_input.md) or PostgreSQL in
front of the store and set MLFLOW_TRACKING_URI.

A process killed with SIGKILL never ends its runs: they would stay RUNNING
forever. So every run carries its owner process (tags `owner.host`,
`owner.pid`, `owner.started`), and `reap_stale_runs` (at every stage and
pipeline start) marks FAILED each RUNNING run whose owner is gone from this
host, after undoing the registry changes it journaled (tag
`registry_changes`, see `record_registry_change` and
`metatransfer.journal`). Registry changes of a stage run
are deferred to its very end (`at_run_end`), and a run that fails undoes
those it made: an alias never points at a version whose run did not finish.

Modules: `store` (the store's URI, WAL and set-up lock), `runs` (stage, child and
pipeline runs, their owners and the reaper), `record` (params, metrics, tags,
artifacts, datasets of the active run; the batching step-metric sink; reports/run_facts.json), `models`
(pyfunc target models and few-shot learners). The names below are the
package's public interface.
"""

from __future__ import annotations

from metatransfer.journal import CHANGES_TAG, record_registry_change, registry_changes, revert_changes
from metatransfer.provenance import dvc_out_md5, git_commit
from metatransfer.tracking.record import (
    RUN_FACTS_PATH,
    MetricBatch,
    log_artifact,
    log_dataset,
    log_dict,
    log_metrics,
    log_params,
    metric_sink,
    read_run_facts,
    record_run_facts,
    set_tags,
)
from metatransfer.tracking.models import log_class_names, log_few_shot_model, log_target_model, target_class_names
from metatransfer.tracking.runs import (
    OWNER_TAGS,
    PARENT_ENV,
    REAPED_TAG,
    at_run_end,
    begin_pipeline_run,
    child_run,
    end_pipeline_run,
    owner_tags,
    parent_run,
    reap_stale_runs,
    run_owner_alive,
    stage_run,
    standard_tags,
)
from metatransfer.tracking.store import EXPERIMENT, SQLITE_TIMEOUT_S, configure, enable_wal, sqlite_path, tracking_uri

__all__ = [
    "CHANGES_TAG", "EXPERIMENT", "MetricBatch", "OWNER_TAGS", "PARENT_ENV", "REAPED_TAG", "RUN_FACTS_PATH", "SQLITE_TIMEOUT_S",
    "at_run_end", "begin_pipeline_run", "child_run", "configure", "dvc_out_md5", "enable_wal", "end_pipeline_run",
    "git_commit", "log_artifact", "log_class_names", "log_dataset", "log_dict", "log_few_shot_model", "log_metrics",
    "log_params", "log_target_model", "metric_sink", "owner_tags", "parent_run", "read_run_facts", "reap_stale_runs",
    "record_registry_change", "record_run_facts", "registry_changes", "revert_changes", "run_owner_alive",
    "set_tags", "sqlite_path", "stage_run", "standard_tags", "target_class_names", "tracking_uri",
]
