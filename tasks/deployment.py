"""The deployment parameters of the `pipeline` flow: which params file, which targets to promote."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from metatransfer.config import load_params
from metatransfer.errors import ConfigError


@task(name="use_params")
def use_params(root: str, params: str | None = None) -> str:
    """Make `params` the project's params.yaml before any stage runs (the README's scenario switch,
    `cp scenarios/characters.yaml params.yaml`); DVC then re-runs the stages whose params changed.

    Args:
        root: the project root.
        params: a params file, relative to `root` or absolute; None (or root/params.yaml itself)
            keeps params.yaml as it is.

    Returns:
        The absolute path of the params.yaml the stages read.

    Raises:
        ConfigError: `params` is missing or fails validation (params.yaml is then left untouched).
    """
    target = (Path(root) / "params.yaml").resolve()
    if params is None:
        return str(target)
    source = (Path(root) / params).resolve()
    load_params(source)  # names the file and the bad key; nothing is copied
    if source != target and (not target.is_file() or source.read_bytes() != target.read_bytes()):
        shutil.copyfile(source, target)
    return str(target)


@task(name="check_targets")
def check_targets(root: str, targets: list[str] | None = None) -> list[str] | None:
    """The targets to promote: None (every finetune target), or `targets` if each is a finetune target.

    Raises:
        ConfigError: a target is not in params.yaml's finetune.targets (the message lists both).
    """
    if targets is None:
        return None
    finetune = load_params(Path(root) / "params.yaml").finetune
    known = list(finetune.targets) if finetune is not None else []
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ConfigError(f"{Path(root).resolve() / 'params.yaml'}: targets {unknown} are not in finetune.targets "
                          f"{known}; pass targets from that list (or none for all)")
    return list(targets)
