"""Exceptions raised for people: each message names the file/key, what was
expected, what was found, and what to do."""


class MetatransferError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(MetatransferError, ValueError):
    """params.yaml (or a config mapping) is invalid."""


class DataError(MetatransferError, ValueError):
    """Input data is missing, corrupt or inconsistent."""


class ChecksumError(DataError):
    """A downloaded or mirrored file does not match its published checksum."""


class EpisodeError(MetatransferError, ValueError):
    """An episode request cannot be met by the split it samples from."""


# --------------------------------------------------------------------------- environment failures
# Failures of the machine or its services rather than of the project's inputs:
# a full disk, credentials a tracking server refuses, a server that cannot be
# reached. The stage and CLI entries turn them into one line with what to do
# (`environment_error`), wherever in MLflow, safetensors or torch they surface.

_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "database or disk is full", "storagefull")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes / contexts, outermost first (each once)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a full disk or exhausted quota.

    Recognises OSError ENOSPC / EDQUOT and the texts other layers wrap them in
    (safetensors' `StorageFull`, SQLite's "database or disk is full").
    """
    import errno

    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
    return False


def _raised_in_mlflow(exc: BaseException) -> bool:
    """True when `exc` was raised inside MLflow's code (its traceback passes through the mlflow package)."""
    import os

    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}mlflow{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _tracking_uri() -> str:
    """The tracking URI in use (without credentials), for messages."""
    import os
    import re
    import sys

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in sys.modules:
        try:
            uri = sys.modules["mlflow"].get_tracking_uri()
        except Exception:  # noqa: BLE001 - a message helper must not fail
            pass
    return re.sub(r"//[^/@]*@", "//", uri) or "the MLflow tracking server"


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a refused request to a tracking / artifact server, if `e` is one."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and type(e).__name__ == "HTTPError":
        return status
    if type(e).__name__ in ("MlflowException", "RestException") and hasattr(e, "get_http_status_code"):
        # Only answers of a server (the REST client's messages), not a local store's errors.
        if type(e).__name__ == "RestException" or "API request to" in str(e):
            try:
                return int(e.get_http_status_code())
            except (TypeError, ValueError):
                return None
    return None


def environment_error(exc: BaseException) -> str | None:
    """One line saying what failed in the environment and what to do, or None for other errors.

    Args:
        exc: an exception that reached a stage or CLI entry.

    Returns:
        The line for a full disk (ENOSPC, EDQUOT, SQLite "disk is full"), a
        tracking or artifact server answering 401/403, or a server that cannot
        be reached; None for anything else (the caller re-raises it).
    """
    import os
    import re

    chain = _chain(exc)
    if is_disk_full(exc):
        path = next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), None)
        if path is None and any("database or disk is full" in str(e) for e in chain):
            uri = _tracking_uri()
            path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else None
        if path:
            where = f"writing {path}"
        elif any(_raised_in_mlflow(e) for e in chain):
            where = f"logging to MLflow ({_tracking_uri()} and its artifact store)"
        else:
            where = "writing a file"
        return (f"disk full: no space left on the device while {where}; free some space (old runs in "
                "mlartifacts/, checkpoints/, the DVC cache) or move the output to a larger disk, then re-run "
                "(training resumes from its last checkpoint)")
    for e in chain:
        status = _http_status(e)
        if status in (401, 403):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            server = _tracking_uri()
            if status == 401 and not user and not os.environ.get("MLFLOW_TRACKING_TOKEN"):
                return (f"{server} refused the request: 401 Unauthorized (no credentials given); set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an "
                        "account on that server, then re-run")
            if status == 401:
                who = f"user {user!r}" if user else "the token in MLFLOW_TRACKING_TOKEN"
                return (f"{server} refused the credentials of {who}: 401 Unauthorized; check "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), then re-run")
            who = f"user {user!r}" if user else "anonymous requests"
            return (f"{server} refused the request: 403 Forbidden ({who} may not do this); ask the server's admin "
                    "for permission on the experiment / registered model, or set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD of an account that has it, then re-run")
    for e in chain:
        if type(e).__name__ in ("ConnectionError", "NewConnectionError", "MaxRetryError") and \
                type(e).__module__.split(".")[0] in ("requests", "urllib3"):
            reason = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
            return (f"cannot reach {_tracking_uri()} ({reason.group(0).strip() if reason else type(e).__name__}); "
                    "start the server or fix MLFLOW_TRACKING_URI, then re-run")
    return None
