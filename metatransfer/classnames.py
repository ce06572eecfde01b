"""Class names as a person reads them.

The prepared store names every class `<dataset>/<class>` (`brain_tumor_mri/glioma`,
`mini_imagenet/n01532829`, `omniglot/Greek/character01`) so that names stay
unique across datasets; that full name is what the data, the model configs and
the `label` field of a served answer carry. Tables, figures and the serving
answer's `class_name` show the name without the dataset prefix.
"""

from __future__ import annotations

from collections.abc import Sequence


def display_name(name: str, dataset: str | None = None) -> str:
    """A class name without its `<dataset>/` prefix ("brain_tumor_mri/glioma" -> "glioma").

    Args:
        name: the full class name from the manifest.
        dataset: the dataset the class belongs to; None strips whatever comes before the first "/".

    Returns:
        The short name; the full name when there is no prefix to strip (or nothing would be left).
    """
    name = str(name)
    if dataset is not None:
        prefix = f"{dataset}/"
        return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else name
    head, sep, rest = name.partition("/")
    return rest if sep and head and rest else name


def display_names(names: Sequence[str], dataset: str | None = None) -> list[str]:
    """`display_name` of every name, in the same order, unless two would then read the same.

    Classes from two datasets can share a short name (e.g. two sources with a
    class "cat"): then the full names are kept for all, so no two labels on a
    figure or keys of a served answer collide.

    Args:
        names: full class names in label order.
        dataset: see `display_name`.

    Returns:
        One display name per class, all distinct when the full names are.
    """
    short = [display_name(n, dataset) for n in names]
    return short if len(set(short)) == len(set(map(str, names))) else [str(n) for n in names]
