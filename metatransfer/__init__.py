"""metatransfer: meta-learning-based transfer learning as a reproducible pipeline.

The library is plain, typed Python with no Prefect import; ``tasks/`` and
``flows/`` wire it into Prefect, ``dvc.yaml`` into DVC.
"""

import os

__version__ = "0.1.0"

# Telemetry off before any tool is imported: without these, MLflow, Prefect
# and DVC try the network (closed here) and log errors. MLflow ignores "1".
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Per-file download bars of local artifacts flood stage logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_key, _value)
