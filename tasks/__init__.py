"""Prefect tasks: thin wrappers (a few lines each) around the library and DVC."""

import os
from pathlib import Path

# Keep Prefect's local state inside the project unless the user chose a home.
os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
import metatransfer  # noqa: E402,F401  (turns telemetry off before prefect is imported)
