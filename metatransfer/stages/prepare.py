"""`prepare` stage: `data.raw_dir` -> the validated prepared store in `data.prepared_dir`.

Prepares every dataset of `fetch.datasets` plus every `prepare.image_folders`
and `prepare.npz_files` entry (see metatransfer.data.prepare for conversions, splits and duplicate
handling). Paths are relative to the project root, the folder of the params
file (metatransfer.layout), not to the working directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from metatransfer.data.prepare import prepare, prepared_dataset_names
from metatransfer.layout import Layout

log = logging.getLogger(__name__)


def run(params, root: Path):
    """Prepare every dataset; logs counts, the report and the quarantine list to MLflow.

    Args:
        params: validated params.
        root: the project root (the params file's folder): the data folders and
            relative `prepare.image_folders` paths are resolved against it.

    Returns:
        The PrepareReport.
    """
    from metatransfer import tracking
    from metatransfer.config import flatten

    datasets = prepared_dataset_names(tuple(params.fetch.datasets), params.prepare)
    layout = Layout.of(root, params)
    out_dir = layout.prepared_dir
    with tracking.stage_run("prepare", root, flatten(params)):
        tracking.log_dataset("raw", str(layout.raw_dir), tracking.dvc_out_md5(root, layout.raw_key), "prepare")
        report = prepare(params.prepare, datasets, layout.raw_dir, out_dir, params.seed, base_dir=root)
        for name, d in report.datasets.items():
            log.info("%s (%s): %d images, %d classes, splits %s, %d quarantined%s", name, d["role"], d["n_images"],
                     d["n_classes"], {s: v["images"] for s, v in d["splits"].items()}, d["quarantined"],
                     f", empty classes {d['empty_classes']}" if d["empty_classes"] else "")
            tracking.log_metrics({f"prepare/{name}/images": d["n_images"], f"prepare/{name}/classes": d["n_classes"],
                                  f"prepare/{name}/quarantined": d["quarantined"]})
            if "data_version" in d:  # a prepare.npz_files entry: the user's own sha256 is its version
                npz = Path(params.prepare.npz_files[name].path)
                tracking.log_dataset(name, str(npz if npz.is_absolute() else root / npz),
                                     d["data_version"].removeprefix("sha256:"), "prepare")
        tracking.log_metrics({"prepare/images": report.n_images, "prepare/seconds": report.seconds,
                              "prepare/quarantined": report.quarantined})
        for name in ("report.json", "quarantine.csv"):
            if (out_dir / name).is_file():
                tracking.log_artifact(out_dir / name, "prepare")
    log.info("prepare done: %d images in %.1f s (%.0f images/s) -> %s; %d input(s) quarantined",
             report.n_images, report.seconds, report.n_images / max(report.seconds, 1e-9), report.out_dir,
             report.quarantined)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.prepare [--params params.yaml]` (0, or 1 on a data or config error)."""
    from metatransfer.stages.common import run_stage

    return run_stage("prepare", argv, run)


if __name__ == "__main__":
    sys.exit(main())
