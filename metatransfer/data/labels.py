"""How the prepared store marks a dataset without labels (an image folder without class sub-folders).

Every manifest row of such a dataset has the label `UNLABELED` and the class
`unlabeled_class(dataset)`, ``<dataset>/`` (the dataset, no class), in the
split ``train``. Here, apart from store.py and schemas.py, so that both
(and the folder importer) name it without importing each other.
"""

from __future__ import annotations

UNLABELED = -1  # the label of every row of an unlabelled dataset


def unlabeled_class(dataset: str) -> str:
    """The class column of an unlabelled dataset's rows: ``<dataset>/`` (the dataset, no class)."""
    return f"{dataset}/"
