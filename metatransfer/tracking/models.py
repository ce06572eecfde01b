"""Models logged to MLflow as pyfunc models: fine-tuned target models and adapt-on-request
few-shot learners, with signatures, pinned requirements and their class names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metatransfer.tracking.record import log_dict, set_tags


def _requirements() -> list[str]:
    """Explicit pip requirements (inferring them reloads the model in a subprocess: 7-9 s)."""
    import numpy
    import pandas
    import safetensors
    import torch

    from metatransfer import __version__

    return [
        f"metatransfer=={__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
    ]


def _quiet_model_logging() -> None:
    """MLflow's advice to models-from-code authors (type hints, input examples) is
    noise here: the signature is given explicitly and inputs are validated by
    metatransfer/serving/inputs.py."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")
    warnings.filterwarnings("ignore", message=r".*An input example was not provided")


def log_target_model(folder: str | Path, channels: int, size: int, n_classes: int, name: str = "target_model",
                     registered_model_name: str | None = None, metadata: dict[str, Any] | None = None) -> str:
    """Log a fine-tuned target model (safetensors folder) as a pyfunc model with a signature.

    The model's class names (from the folder's config.json, label order) go into the
    MLmodel metadata (`class_names`: full names, `class_labels`: as served in `class_name`)
    so that whoever loads the model, or looks at it in the MLflow UI, sees which index
    is which class. A cluster model of an unlabelled target is logged the same way (its
    classes are `cluster_0` ..); `metadata` adds keys such as its kind and k.

    Returns:
        The logged model's URI (models:/<model id>).
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import DataType, Map

    from metatransfer.classnames import display_names
    from metatransfer.serving import target_model

    _quiet_model_logging()

    names = target_class_names(folder)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "images")]),
        outputs=Schema([ColSpec("long", "prediction"), ColSpec("string", "label"), ColSpec("string", "class_name"),
                        ColSpec(Map(DataType.double), "probabilities")]
                       + [ColSpec("double", f"prob_{i}") for i in range(n_classes)]),
    )
    info = mlflow.pyfunc.log_model(
        name=name, loader_module=target_model.__name__, data_path=str(folder),  # data only, no code (artifacts.py)
        signature=signature, pip_requirements=_requirements(), registered_model_name=registered_model_name,
        metadata={**({"class_names": names, "class_labels": display_names(names)} if names else {}),
                  **(metadata or {})} or None,
    )
    return info.model_uri


def target_class_names(folder: str | Path) -> list[str]:
    """The class names (label order) a saved target model's config.json holds; [] when it has none."""
    path = Path(folder) / "config.json"
    try:
        names = json.loads(path.read_text()).get("class_names") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def log_class_names(target: str, class_names: list[str] | tuple[str, ...]) -> None:
    """Record a target's class names on the active run: a tag `<target>/class_names` (the names a
    person reads, a JSON list in label order: a name may hold a comma, e.g. "normal, benign") and an
    artifact `classes/<target>.json` with index, full name and display name of every class."""
    from metatransfer.classnames import display_names

    names = [str(n) for n in class_names]
    short = display_names(names)
    # A tag, not a param: params of a stage run are the flattened params.yaml; the UI lists tags beside them.
    set_tags({f"{target}/class_names": json.dumps(short, ensure_ascii=False)})
    log_dict({"target": target, "classes": [{"index": i, "name": n, "label": d} for i, (n, d) in enumerate(zip(names, short))]},
             f"classes/{target}.json")


def log_few_shot_model(folder: str | Path, channels: int, size: int, name: str = "few_shot_model",
                       registered_model_name: str | None = None) -> str:
    """Log a meta-learner (safetensors folder) as an adapt-on-request pyfunc model.

    Returns:
        The logged model's URI.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from metatransfer.serving import few_shot_model

    _quiet_model_logging()

    signature = ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "support_x"),
            TensorSpec(np.dtype(np.int64), (-1,), "support_y"),
            TensorSpec(np.dtype(np.float32), (-1, channels, size, size), "query_x"),
        ]),
        outputs=Schema([ColSpec("long", "prediction")]),
        # The task's description for the conditional learner ({"params": {"description": "..."}} in a
        # request); other learners ignore it. Without the schema MLflow drops unknown params.
        params=ParamSchema([ParamSpec("description", "string", "")]),
    )
    info = mlflow.pyfunc.log_model(
        name=name, loader_module=few_shot_model.__name__, data_path=str(folder),  # data only, no code (artifacts.py)
        signature=signature, pip_requirements=_requirements(), registered_model_name=registered_model_name,
    )
    return info.model_uri
