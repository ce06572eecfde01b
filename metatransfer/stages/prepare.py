"""`prepare` stage: `data.raw_dir` -> the validated prepared store in `data.prepared_dir`.

Prepares every dataset of `fetch.datasets` plus every `prepare.image_folders`
entry (see metatransfer.data.prepare for conversions, splits and duplicate
handling). Paths are relative to the working directory (the project root).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from metatransfer.data.prepare import prepare
from metatransfer.errors import MetatransferError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.prepare [--params params.yaml]`.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 on success, 1 on a data/config error (logged, no traceback).
    """
    from metatransfer.stages.common import setup

    try:
        params, _ = setup("prepare", argv)
        root = Path.cwd()
        datasets = tuple(params.fetch.datasets) + tuple(n for n in params.prepare.image_folders
                                                        if n not in params.fetch.datasets)
        report = prepare(params.prepare, datasets, root / params.data.raw_dir, root / params.data.prepared_dir,
                         params.seed, base_dir=root)
        for name, d in report.datasets.items():
            log.info("%s (%s): %d images, %d classes, splits %s, %d quarantined%s", name, d["role"], d["n_images"],
                     d["n_classes"], {s: v["images"] for s, v in d["splits"].items()}, d["quarantined"],
                     f", empty classes {d['empty_classes']}" if d["empty_classes"] else "")
        log.info("prepare done: %d images in %.1f s (%.0f images/s) -> %s; %d input(s) quarantined",
                 report.n_images, report.seconds, report.n_images / max(report.seconds, 1e-9), report.out_dir,
                 report.quarantined)
        return 0
    except MetatransferError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
