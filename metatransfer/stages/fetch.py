"""`fetch` stage: the raw files of `fetch.datasets` into `data.raw_dir/<dataset>/`.

Copies from the mirror (`data.mirror`, overridden by the environment variable
METATRANSFER_MIRROR) or downloads from the official URLs when it is empty;
every file is checksum-verified and written atomically. Paths are relative to
the project root, the folder of the params file (metatransfer.layout), not to
the working directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from metatransfer.data.fetch import fetch, resolve_mirror
from metatransfer.layout import Layout

log = logging.getLogger(__name__)


def run(params, root: Path) -> dict[str, list[str]]:
    """Fetch every dataset of `fetch.datasets`; logs the files to an MLflow `fetch` run.

    Args:
        params: validated params.
        root: the project root (the params file's folder): the raw folder and a
            relative mirror path are resolved against it.

    Returns:
        {dataset: [file names]}.
    """
    from metatransfer import tracking
    from metatransfer.config import flatten

    mirror = resolve_mirror(params.data.mirror, root)
    raw_dir = Layout.of(root, params).raw_dir
    log.info("fetching %s into %s from %s", list(params.fetch.datasets), raw_dir,
             mirror if mirror else "the official URLs")
    fetched: dict[str, list[str]] = {}
    with tracking.stage_run("fetch", root, flatten(params)):
        for name in params.fetch.datasets:
            paths = fetch(name, raw_dir, mirror)
            if len(paths) == 1 and paths[0].is_dir():  # a folder dataset (tens of thousands of files): count them
                fetched[name] = [paths[0].name + "/"]
                log.info("%s: folder %s ready, %d file(s)", name, paths[0],
                         sum(1 for q in paths[0].rglob("*") if q.is_file()))
            else:
                fetched[name] = [p.name for p in paths]
                log.info("%s: %d file(s) ready: %s", name, len(paths), ", ".join(p.name for p in paths))
        tracking.log_dict({"mirror": str(mirror or ""), "files": fetched}, "fetch/files.json")
        tracking.log_metrics({"fetch/files": sum(len(v) for v in fetched.values())})
    log.info("fetch done: %d dataset(s), %d file(s)", len(fetched), sum(len(v) for v in fetched.values()))
    return fetched


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.fetch [--params params.yaml]` (0, or 1 on a data or config error)."""
    from metatransfer.stages.common import run_stage

    return run_stage("fetch", argv, run)


if __name__ == "__main__":
    sys.exit(main())
