"""The one module that talks to MLflow.

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
`metatransfer.registry.revert_changes`). Registry changes of a stage run
are deferred to its very end (`at_run_end`), and a run that fails undoes
those it made: an alias never points at a version whose run did not finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "metatransfer"
# Run-specific facts of the latest stage runs (MLflow run ids, model URIs,
# registered versions, wall seconds): they change on every run, so they live
# here and in MLflow, never in a DVC output (whose bytes must not churn).
RUN_FACTS_PATH = Path("reports") / "run_facts.json"
PARENT_ENV = "METATRANSFER_PARENT_RUN_ID"
# How long a connection waits for sqlite's write lock before "database is
# locked". Writes take milliseconds; the wait only grows with many writers on
# a loaded machine, and a slow metric write is better than a lost one.
SQLITE_TIMEOUT_S = 120
_prepared_stores: set[str] = set()
OWNER_TAGS = ("owner.host", "owner.pid", "owner.started")  # the process that runs (ran) a run
CHANGES_TAG = "registry_changes"  # JSON list of the registry changes a run made, oldest first
REAPED_TAG = "reaped"
# Actions deferred to the end of each open stage run (innermost last): see `at_run_end`.
_run_end_actions: list[list[Callable[[], None]]] = []

log = logging.getLogger(__name__)


def tracking_uri(root: str | Path = ".") -> str:
    """The tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///<abs root>/mlflow.db?timeout=<s>."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}?timeout={SQLITE_TIMEOUT_S}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (query string dropped); None for other stores."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///:memory:"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive inter-process lock around store set-up (a no-op for non-sqlite stores)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # A sibling lock file, not the database: sqlite takes its own locks on the
    # database file and flock on it would interfere with nothing but confuse readers.
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def enable_wal(path: str | Path) -> str:
    """Switch a sqlite database to write-ahead logging (persistent in the file).

    Args:
        path: the database file (created empty if missing; MLflow adds its tables later).

    Returns:
        The journal mode sqlite reports afterwards ("wal" on local file systems).
    """
    con = sqlite3.connect(str(path), timeout=SQLITE_TIMEOUT_S)
    try:
        return str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    finally:
        con.close()


def configure(root: str | Path = ".", experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project store and experiment; return the experiment id.

    For a sqlite store the first call in a process also switches it to WAL and
    creates schema and experiment under an inter-process lock (see the module doc).
    """
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):
        path = sqlite_path(uri)
        if path is not None and uri not in _prepared_stores:
            enable_wal(path)
            _prepared_stores.add(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
            if uri.startswith(("http://", "https://")):  # the server decides where artifacts go
                exp_id = mlflow.create_experiment(experiment)
            else:
                exp_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: str | Path = ".") -> str:
    """HEAD's commit hash, with '+dirty' when tracked files changed; '' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def dvc_out_md5(root: str | Path, out_path: str) -> str:
    """The md5 DVC recorded in dvc.lock for an output path ('' when not recorded)."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return ""
    data = yaml.safe_load(lock.read_text()) or {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == out_path:
                return str(out.get("md5", ""))
    return ""


def standard_tags(root: str | Path = ".") -> dict[str, str]:
    """Tags every run carries: git commit, dvc.lock digest, prepared-data version."""
    from metatransfer.dvc_stages import lock_digest

    return {
        "git_commit": git_commit(root),
        "dvc_lock_sha256": lock_digest(root),
        "data_version": dvc_out_md5(root, "data/prepared"),
    }


@contextlib.contextmanager
def stage_run(stage: str, root: str | Path = ".", params: dict[str, Any] | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage (a child of $METATRANSFER_PARENT_RUN_ID if set).

    Logs the flattened params, the standard tags, the runtime tags (device,
    torch version, threads, CPU model, load average at start: see
    `metatransfer.runtime.run_tags`) and the owner tags; yields the active run.
    Runs left RUNNING by killed processes are reaped first (`reap_stale_runs`);
    actions deferred with `at_run_end` run after the body succeeded; if the body
    or one of them fails, the registry changes the run journaled are undone.
    """
    import mlflow

    from metatransfer import runtime

    configure(root)
    reap_stale_runs(root, quiet=True)
    parent = os.environ.get(PARENT_ENV) or None
    tags = {"stage": stage, **standard_tags(root), **runtime.run_tags(), **owner_tags()}
    with mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None, tags=tags) as run:
        if params:
            log_params(params)
        _run_end_actions.append([])
        try:
            yield run
            for action in _run_end_actions[-1]:  # e.g. moving `challenger`: only once everything else is done
                action()
        except BaseException:
            _undo_registry_changes(run.info.run_id)
            raise
        finally:
            _run_end_actions.pop()


def at_run_end(action: Callable[[], None]) -> None:
    """Run `action` as the last step of the innermost open `stage_run`, only if its body succeeded.

    For registry changes (moving an alias): the run then ends FINISHED right after,
    so an alias never points at a version whose run is still going or failed. Outside
    a stage run the action runs at once.
    """
    if _run_end_actions:
        _run_end_actions[-1].append(action)
    else:
        action()


@contextlib.contextmanager
def child_run(name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A nested run under the active one (e.g. one per algorithm)."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags={**(tags or {}), **owner_tags()}) as run:
        yield run


def owner_tags() -> dict[str, str]:
    """The tags naming this process as a run's owner: host, pid, process start time."""
    from metatransfer.ownership import identity

    host, pid, started = identity()
    return dict(zip(OWNER_TAGS, (host, str(pid), f"{started:.3f}")))


def run_owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the owner process named by a run's tags still runs (None: another host's, or untagged)."""
    from metatransfer.ownership import alive

    try:
        host, pid, started = (tags[k] for k in OWNER_TAGS)
        return alive(host, int(pid), float(started))
    except (KeyError, ValueError):
        return None


def record_registry_change(change: dict[str, Any]) -> None:
    """Journal a registry change on the active run (tag `registry_changes`) before it is made.

    Args:
        change: {"name": registered model, "alias" or "tag": what changes, "from": the value
            before (None: unset), "to": the new value (None: removed)}.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    changes = registry_changes(client.get_run(run.info.run_id).data.tags)
    client.set_tag(run.info.run_id, CHANGES_TAG, json.dumps([*changes, change], sort_keys=True))


def registry_changes(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The registry changes journaled in a run's tags, oldest first ([] when none)."""
    try:
        changes = json.loads(tags.get(CHANGES_TAG) or "[]")
    except json.JSONDecodeError:
        return []
    return changes if isinstance(changes, list) else []


def _undo_registry_changes(run_id: str) -> list[dict[str, Any]]:
    """Undo what a failing run changed in the registry (best effort: the reaper retries nothing here)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        changes = registry_changes(client.get_run(run_id).data.tags)
        if not changes:
            return []
        from metatransfer.registry import revert_changes

        return revert_changes(client, changes)
    except Exception as exc:  # noqa: BLE001  (the run's own failure is the error to report)
        log.warning("run %s failed and its registry changes could not be undone: %s", run_id, exc)
        return []


def reap_stale_runs(root: str | Path = ".", quiet: bool = False) -> list[str]:
    """Mark FAILED every RUNNING run whose owner process is gone from this host.

    First undoes the registry changes each such run journaled (an alias it moved
    goes back where it was, unless someone moved it since). Runs of live
    processes, of other hosts and runs without owner tags are left alone.

    Args:
        root: project root (the store).
        quiet: log a store failure as a warning and return [] instead of raising
            (at stage start: housekeeping must not stop a stage).

    Returns:
        The ids of the runs marked FAILED.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    try:
        exp_id = configure(root)
        client = MlflowClient(tracking_uri(root))
        stale, token = [], None
        while True:
            page = client.search_runs([exp_id], "attributes.status = 'RUNNING'", ViewType.ACTIVE_ONLY,
                                      max_results=1000, page_token=token)
            stale += [r for r in page if run_owner_alive(r.data.tags) is False]
            token = page.token
            if not token:
                break
        reaped = []
        for run in stale:
            tags = run.data.tags
            changes = registry_changes(tags)
            if changes:
                from metatransfer.registry import revert_changes

                revert_changes(client, changes)
            client.set_tag(run.info.run_id, REAPED_TAG,
                           f"owner pid {tags['owner.pid']} on {tags['owner.host']} is gone (killed or lost); "
                           f"marked FAILED by pid {os.getpid()}")
            client.set_terminated(run.info.run_id, status="FAILED")
            log.warning("MLflow run %s (%s) was left RUNNING by pid %s, which is gone: marked FAILED%s",
                        run.info.run_name, run.info.run_id, tags["owner.pid"],
                        f", {len(changes)} registry change(s) undone" if changes else "")
            reaped.append(run.info.run_id)
        return reaped
    except Exception as exc:  # noqa: BLE001
        if not quiet:
            raise
        log.warning("could not check %s for runs left RUNNING by killed processes: %s", tracking_uri(root), exc)
        return []


def log_params(params: dict[str, Any]) -> None:
    """Log flattened params (values stringified, MLflow's 6000-char limit respected)."""
    import mlflow

    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def metric_sink():
    """A (name, value, step) callback that logs to the active run, batching nothing."""
    import mlflow

    def sink(name: str, value: float, step: int) -> None:
        mlflow.log_metric(name, float(value), step=int(step))

    return sink


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log several metrics at once to the active run."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Set tags on the active run (values stringified; MLflow's 5000-char limit respected)."""
    import mlflow

    mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file or folder to the active run."""
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dataset(name: str, path: str, digest: str, context: str) -> None:
    """Log a DVC-tracked input as an MLflow dataset whose digest is its DVC md5."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(path).resolve()))
    mlflow.log_input(MetaDataset(source=source, name=name, digest=(digest or "unknown")[:36]), context=context)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """Attach a JSON document to the active run."""
    import mlflow

    mlflow.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


def record_run_facts(root: str | Path, stage: str, facts: dict[str, Any]) -> Path:
    """Merge `facts` into the `stage` entry of reports/run_facts.json (not a DVC output).

    Args:
        root: project root.
        stage: the stage name (top-level key).
        facts: JSON-able run-specific facts; keys replace the stage's old ones.

    Returns:
        The file's path.
    """
    from metatransfer.stages.common import write_json

    path = Path(root) / RUN_FACTS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:  # stages of parallel runs may write at once
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            data = read_run_facts(root)
            data[stage] = {**(data.get(stage) or {}), **facts}
            write_json(path, data)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return path


def read_run_facts(root: str | Path) -> dict[str, Any]:
    """reports/run_facts.json as a dict ({} when missing or damaged: it is informative only)."""
    path = Path(root) / RUN_FACTS_PATH
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def begin_pipeline_run(root: str | Path = ".", name: str = "pipeline", tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run and return its id.

    The run stays RUNNING until `end_pipeline_run`; stage processes attach their
    runs to it through $METATRANSFER_PARENT_RUN_ID.
    """
    from mlflow.tracking import MlflowClient

    exp_id = configure(root)
    client = MlflowClient(tracking_uri(root))
    all_tags = {"mlflow.runName": name, "stage": "pipeline", **standard_tags(root), **owner_tags(), **(tags or {})}
    return client.create_run(exp_id, tags=all_tags, run_name=name).info.run_id


def end_pipeline_run(run_id: str, root: str | Path = ".", status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED or FAILED (tags refreshed: dvc.lock changed during the run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    for key, value in standard_tags(root).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def _requirements() -> list[str]:
    """Explicit pip requirements (inferring them reloads the model in a subprocess: 7-9 s)."""
    import numpy
    import pandas
    import safetensors
    import torch

    from metatransfer import __version__

    return [
        f"metatransfer=={__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
    ]


def _quiet_model_logging() -> None:
    """MLflow's advice to models-from-code authors (type hints, input examples) is
    noise here: the signature is given explicitly and inputs are validated by
    metatransfer/serving/inputs.py."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")
    warnings.filterwarnings("ignore", message=r".*An input example was not provided")


def log_target_model(folder: str | Path, channels: int, size: int, n_classes: int, name: str = "target_model",
                     registered_model_name: str | None = None) -> str:
    """Log a fine-tuned target model (safetensors folder) as a pyfunc model with a signature.

    The model's class names (from the folder's config.json, label order) go into the
    MLmodel metadata (`class_names`: full names, `class_labels`: as served in `class_name`)
    so that whoever loads the model, or looks at it in the MLflow UI, sees which index
    is which class.

    Returns:
        The logged model's URI (models:/<model id>).
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import DataType, Map

    from metatransfer.classnames import display_names
    from metatransfer.serving import target_model

    _quiet_model_logging()

    names = target_class_names(folder)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "images")]),
        outputs=Schema([ColSpec("long", "prediction"), ColSpec("string", "label"), ColSpec("string", "class_name"),
                        ColSpec(Map(DataType.double), "probabilities")]
                       + [ColSpec("double", f"prob_{i}") for i in range(n_classes)]),
    )
    info = mlflow.pyfunc.log_model(
        name=name, loader_module=target_model.__name__, data_path=str(folder),  # data only, no code (artifacts.py)
        signature=signature, pip_requirements=_requirements(), registered_model_name=registered_model_name,
        metadata={"class_names": names, "class_labels": display_names(names)} if names else None,
    )
    return info.model_uri


def target_class_names(folder: str | Path) -> list[str]:
    """The class names (label order) a saved target model's config.json holds; [] when it has none."""
    path = Path(folder) / "config.json"
    try:
        names = json.loads(path.read_text()).get("class_names") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def log_class_names(target: str, class_names: list[str] | tuple[str, ...]) -> None:
    """Record a target's class names on the active run: a tag `<target>/class_names` (the names a
    person reads, a JSON list in label order: a name may hold a comma, e.g. "normal, benign") and an
    artifact `classes/<target>.json` with index, full name and display name of every class."""
    from metatransfer.classnames import display_names

    names = [str(n) for n in class_names]
    short = display_names(names)
    # A tag, not a param: params of a stage run are the flattened params.yaml; the UI lists tags beside them.
    set_tags({f"{target}/class_names": json.dumps(short, ensure_ascii=False)})
    log_dict({"target": target, "classes": [{"index": i, "name": n, "label": d} for i, (n, d) in enumerate(zip(names, short))]},
             f"classes/{target}.json")


def log_few_shot_model(folder: str | Path, channels: int, size: int, name: str = "few_shot_model",
                       registered_model_name: str | None = None) -> str:
    """Log a meta-learner (safetensors folder) as an adapt-on-request pyfunc model.

    Returns:
        The logged model's URI.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from metatransfer.serving import few_shot_model

    _quiet_model_logging()

    signature = ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "support_x"),
            TensorSpec(np.dtype(np.int64), (-1,), "support_y"),
            TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "query_x"),
        ]),
        outputs=Schema([ColSpec("long", "prediction")]),
    )
    info = mlflow.pyfunc.log_model(
        name=name, loader_module=few_shot_model.__name__, data_path=str(folder),  # data only, no code (artifacts.py)
        signature=signature, pip_requirements=_requirements(), registered_model_name=registered_model_name,
    )
    return info.model_uri
