"""The MLflow store: its URI, write-ahead logging and the lock around its set-up.

Defaults: a sqlite store in the project (`sqlite:///<root>/mlflow.db`) and
artifacts under `<root>/mlartifacts`; MLFLOW_TRACKING_URI overrides the store.
See the package doc for why WAL, the lock wait and the set-up lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

EXPERIMENT = "metatransfer"
# How long a connection waits for sqlite's write lock before "database is
# locked". Writes take milliseconds; the wait only grows with many writers on
# a loaded machine, and a slow metric write is better than a lost one.
SQLITE_TIMEOUT_S = 120
_prepared_stores: set[str] = set()


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


def lock_path(database: Path) -> Path:
    """The set-up lock file of a sqlite database: `<database>.lock` beside it."""
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Exclusive inter-process lock around store set-up (a no-op for non-sqlite stores).

    The lock is `<database>.lock` beside the database, held with filelock
    (flock on POSIX): it waits as long as another process holds it and is
    released when the block exits, also on an error.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # A sibling lock file, not the database: sqlite takes its own locks on the
    # database file and a second lock on it would only confuse readers.
    with FileLock(lock_path(path)):
        yield


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
