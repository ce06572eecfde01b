"""Where the stages read and write: every project path in one place.

A leaf module (standard library only). Paths are relative to the project
root, the folder of the params file (`--params other/params.yaml` puts every
output under `other/`). The raw and prepared data folders come from
`params.data.raw_dir` and `params.data.prepared_dir`; every other path is
fixed. dvc.yaml names the same paths (the data folders through
`${data.raw_dir}` and `${data.prepared_dir}`); tests/unit/test_layout.py
checks that the two agree.

    data/raw_dir/<dataset>/            fetch
    data/checks/params.ok              check_params
    data/checks/image_folders/<name>.json  image_folders@<name>
    data/prepared_dir/<dataset>/       prepare
    data/episodes/<set>/<k>shot.safetensors  episodes
    models/pretrain/                   pretrain
    models/meta/<algorithm>/           meta_train
    models/target/<target>/<method>/   finetune (+ <target>/selection.json)
    metrics/<stage>.json, plots/<stage>/, checkpoints/<stage>/
    reports/evaluate.md, reports/index.html, reports/promotion.json, reports/run_facts.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fixed paths, relative to the project root (the same strings as in dvc.yaml).
CHECKS_DIR = Path("data") / "checks"
PARAMS_OK = CHECKS_DIR / "params.ok"
MANIFEST_DIR = CHECKS_DIR / "image_folders"
EPISODES_DIR = Path("data") / "episodes"
MODELS_DIR = Path("models")
PRETRAIN_DIR = MODELS_DIR / "pretrain"
META_DIR = MODELS_DIR / "meta"
TARGET_DIR = MODELS_DIR / "target"
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
CHECKPOINTS_DIR = Path("checkpoints")
REPORTS_DIR = Path("reports")
EVALUATE_REPORT = REPORTS_DIR / "evaluate.md"
REPORT_PAGE = REPORTS_DIR / "index.html"
PROMOTION_RECORD = REPORTS_DIR / "promotion.json"
RUN_FACTS = REPORTS_DIR / "run_facts.json"
SELECTION_FILE = "selection.json"


def episode_path(episodes_dir: str | Path, set_name: str, k_shot: int) -> Path:
    """Where the fixed episodes of one set and shot count live under `episodes_dir`.

    Args:
        episodes_dir: the episodes folder (the project's, or a temporary one being filled).
        set_name: a key of `episodes.sets`.
        k_shot: one of that set's `shots`.

    Returns:
        `episodes_dir/<set_name>/<k_shot>shot.safetensors`.
    """
    return Path(episodes_dir) / set_name / f"{k_shot}shot.safetensors"


@dataclass(frozen=True)
class Layout:
    """The paths of one project: its root and the data folders of its params.

    Build it with `Layout.of(root, params)`; every method returns a path under
    `root` (absolute when `root` is) except the `*_key` properties, the
    dvc.lock keys of the data folders.

    Attributes:
        root: the project root.
        raw: `params.data.raw_dir` as written (relative to `root`).
        prepared: `params.data.prepared_dir` as written (relative to `root`).
    """

    root: Path
    raw: str
    prepared: str

    @classmethod
    def of(cls, root: str | Path, params: Any) -> "Layout":
        """The layout of the project at `root` with `params` (anything with `.data.raw_dir` and `.data.prepared_dir`).

        Args:
            root: the project root, the folder of the params file.
            params: validated params (`metatransfer.config.Params`).
        """
        return cls(Path(root), str(params.data.raw_dir), str(params.data.prepared_dir))

    # data
    @property
    def raw_dir(self) -> Path:
        """`data.raw_dir`: the fetched files, one folder per dataset."""
        return self.root / self.raw

    @property
    def prepared_dir(self) -> Path:
        """`data.prepared_dir`: the prepared store, one folder per dataset."""
        return self.root / self.prepared

    # dvc.yaml names the data folders `${data.raw_dir}` and `${data.prepared_dir}`, and DVC
    # records an interpolated path exactly as written ("./data/raw/" stays so): the keys are
    # the params' strings unchanged, not normalised.
    @property
    def raw_key(self) -> str:
        """The raw folder's path as dvc.lock records it (the `fetch` stage's output)."""
        return self.raw

    @property
    def prepared_key(self) -> str:
        """The prepared folder's path as dvc.lock records it (its md5 is the runs' data version)."""
        return self.prepared

    def prepared_dataset(self, dataset: str) -> Path:
        """One dataset's folder in the prepared store."""
        return self.prepared_dir / dataset

    @property
    def checks_dir(self) -> Path:
        """`data/checks`: the params marker and the image folder manifests (a dependency of `prepare`)."""
        return self.root / CHECKS_DIR

    @property
    def params_ok(self) -> Path:
        """`data/checks/params.ok`: the `check_params` stage's output."""
        return self.root / PARAMS_OK

    @property
    def manifest_dir(self) -> Path:
        """`data/checks/image_folders`: one manifest per `prepare.image_folders` entry."""
        return self.root / MANIFEST_DIR

    def manifest(self, name: str) -> Path:
        """The manifest of the image folder `name` (the `image_folders@<name>` stage's output)."""
        return self.manifest_dir / f"{name}.json"

    @property
    def episodes_dir(self) -> Path:
        """`data/episodes`: the fixed evaluation episodes."""
        return self.root / EPISODES_DIR

    def episode_file(self, set_name: str, k_shot: int) -> Path:
        """The fixed episodes of one set and shot count."""
        return episode_path(self.episodes_dir, set_name, k_shot)

    # models
    @property
    def pretrain_dir(self) -> Path:
        """`models/pretrain`: the `pretrain` stage's learner."""
        return self.root / PRETRAIN_DIR

    @property
    def meta_dir(self) -> Path:
        """`models/meta`: one folder per meta-trained algorithm."""
        return self.root / META_DIR

    def meta_learner(self, algorithm: str) -> Path:
        """The learner `meta_train` saved for `algorithm`."""
        return self.meta_dir / algorithm

    @property
    def target_dir(self) -> Path:
        """`models/target`: the `finetune` stage's models, one folder per target dataset."""
        return self.root / TARGET_DIR

    def target_model(self, target: str, method: str) -> Path:
        """The model fine-tuned on `target` from `method`."""
        return self.target_dir / target / method

    def selection(self, target: str) -> Path:
        """`models/target/<target>/selection.json`: the method chosen for `target` and why."""
        return self.target_dir / target / SELECTION_FILE

    # metrics, plots, checkpoints, reports
    def metrics(self, stage: str) -> Path:
        """`metrics/<stage>.json`: the stage's DVC metrics."""
        return self.root / METRICS_DIR / f"{stage}.json"

    def plots(self, stage: str) -> Path:
        """`plots/<stage>`: the stage's DVC plots."""
        return self.root / PLOTS_DIR / stage

    def checkpoints(self, stage: str) -> Path:
        """`checkpoints/<stage>`: resumable training state (outside DVC's outputs, deleted after success)."""
        return self.root / CHECKPOINTS_DIR / stage

    @property
    def reports_dir(self) -> Path:
        """`reports`."""
        return self.root / REPORTS_DIR

    @property
    def evaluate_report(self) -> Path:
        """`reports/evaluate.md`: the `evaluate` stage's report (a DVC output)."""
        return self.root / EVALUATE_REPORT

    @property
    def report_page(self) -> Path:
        """`reports/index.html`: the HTML report."""
        return self.root / REPORT_PAGE

    @property
    def promotion_record(self) -> Path:
        """`reports/promotion.json`: the latest promotion decision per target."""
        return self.root / PROMOTION_RECORD

    @property
    def run_facts(self) -> Path:
        """`reports/run_facts.json`: run-specific facts (MLflow URIs, timings), not a DVC output."""
        return self.root / RUN_FACTS
