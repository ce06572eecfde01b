"""`fetch` stage: the raw files of `fetch.datasets` into `data.raw_dir/<dataset>/`.

Copies from the mirror (`data.mirror`, overridden by the environment variable
METATRANSFER_MIRROR) or downloads from the official URLs when it is empty;
every file is checksum-verified and written atomically. Paths are relative to
the working directory (the project root).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from metatransfer.data.sources import fetch, resolve_mirror
from metatransfer.errors import MetatransferError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.fetch [--params params.yaml]`.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 on success, 1 on a data/config error (logged, no traceback).
    """
    from metatransfer.stages.common import setup

    try:
        params, _ = setup("fetch", argv)
        root = Path.cwd()
        mirror = resolve_mirror(params.data.mirror, root)
        raw_dir = root / params.data.raw_dir
        log.info("fetching %s into %s from %s", list(params.fetch.datasets), raw_dir,
                 mirror if mirror else "the official URLs")
        n = 0
        for name in params.fetch.datasets:
            paths = fetch(name, raw_dir, mirror)
            n += len(paths)
            log.info("%s: %d file(s) ready: %s", name, len(paths), ", ".join(p.name for p in paths))
        log.info("fetch done: %d dataset(s), %d file(s)", len(params.fetch.datasets), n)
        return 0
    except MetatransferError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
