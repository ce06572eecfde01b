"""A project folder with tiny registered models, for serving and artifact tests.

params.yaml is the repository's; the store (`mlflow.db`, `mlartifacts/`) holds
a target model and a ProtoNet learner of target `TARGET` (1 x 16 x 16 images,
a 4-channel conv4), logged and registered by the project's own tracking and
registry code, both under the alias `champion`. Seconds to build, no data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "tiny"
CHANNELS, SIZE = 1, 16


def make_tiny_project(dest: Path) -> dict[str, str]:
    """Build the project in `dest`; returns the logged model URIs ({"model": ..., "learner": ...}).

    Runs in the calling process: it sets MLflow's global tracking URI to the
    project's store.
    """
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from metatransfer import registry, tracking
    from metatransfer.algorithms import build_algorithm
    from metatransfer.artifacts import save_learner
    from metatransfer.models import BackboneSpec
    from metatransfer.training.finetune import TargetModel, save_target_model

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", dest / "params.yaml")
    spec = BackboneSpec(name="conv4", in_channels=CHANNELS, image_size=SIZE, hidden=4)
    torch.manual_seed(0)
    save_target_model(TargetModel(spec, [f"{TARGET}/a", f"{TARGET}/b"], "protonet"), dest / "weights" / "pretrain")
    save_learner(build_algorithm("protonet", spec, 2, {}), dest / "weights" / "protonet")
    tracking.configure(dest)
    with mlflow.start_run(run_name="tiny-fixture"):
        model = tracking.log_target_model(dest / "weights" / "pretrain", CHANNELS, SIZE, 2, name="target",
                                          registered_model_name=registry.model_name(TARGET))
        learner = tracking.log_few_shot_model(dest / "weights" / "protonet", CHANNELS, SIZE, name="learner",
                                              registered_model_name=registry.learner_name(TARGET))
    client = MlflowClient(tracking.tracking_uri(dest))
    for name in (registry.model_name(TARGET), registry.learner_name(TARGET)):
        client.set_registered_model_alias(name, "champion", "1")
    return {"model": model, "learner": learner}


def model_folder(project: Path, uri: str) -> Path:
    """The folder in the project's artifact store that holds the logged model `models:/<id>`."""
    model_id = uri.removeprefix("models:/")
    found = [p.parent for p in (project / "mlartifacts").rglob("MLmodel") if model_id in str(p)]
    assert len(found) == 1, found
    return found[0]
