"""The manifest schema (pandera) and its validation into one readable DataError.

One manifest per prepared dataset; row i describes images.npy[i]. Columns:

=============  ==========================================================
id             int64, the row in images.npy; contiguous 0..N-1
dataset        the dataset name (one value per manifest)
domain         visual domain (the dataset, or the ImageFolder domain folder)
class          global class name, ``<dataset>/...``
label          int64 index of `class` in the dataset's sorted class names; -1
               (`store.UNLABELED`) on every row of an unlabelled dataset
split          meta_train/meta_val/meta_test (source) or train/val/test (target)
source_path    raw file (or ``npz:key[index]``) the image came from; unique
pixel_hash     blake2b-128 hex of the prepared uint8 pixels
orig_height    height before resizing
orig_width     width before resizing
orig_channels  colour channels before conversion (1 or 3)
=============  ==========================================================

Rules enforced (each a named check; validation is lazy so every failure is
reported at once): meta splits are class-disjoint; no pixel_hash lies in two
splits of a dataset; labels are in range and agree with the sorted class
names; ids are contiguous; a manifest uses either meta splits or target splits;
an unlabelled manifest (an image folder without class sub-folders) has label
-1, the class ``<dataset>/`` and the split train on every row, and no other
manifest has either.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pandera.pandas as pa

from metatransfer.data.labels import UNLABELED, unlabeled_class
from metatransfer.errors import DataError

META_SPLITS = ("meta_train", "meta_val", "meta_test")
TARGET_SPLITS = ("train", "val", "test")
COLUMNS = ("id", "dataset", "domain", "class", "label", "split", "source_path", "pixel_hash",
           "orig_height", "orig_width", "orig_channels")
MAX_LISTED = 200


# --------------------------------------------------------------------------- row-wise checks
def _ids_contiguous(df: pd.DataFrame) -> pd.Series:
    return pd.Series(df["id"].to_numpy() == np.arange(len(df)), index=df.index)


def _one_dataset(df: pd.DataFrame) -> pd.Series:
    return df["dataset"] == df["dataset"].iloc[0] if len(df) else pd.Series([], dtype=bool)


def _class_prefixed(df: pd.DataFrame) -> pd.Series:
    return pd.Series([c.startswith(f"{d}/") for c, d in zip(df["class"], df["dataset"])], index=df.index)


def _meta_class_disjoint(df: pd.DataFrame) -> pd.Series:
    ok = pd.Series(True, index=df.index)
    meta = df["split"].isin(META_SPLITS)
    if meta.any():
        n = df.loc[meta].groupby("class")["split"].transform("nunique")
        ok.loc[meta] = (n <= 1).to_numpy()
    return ok


def _hash_in_one_split(df: pd.DataFrame) -> pd.Series:
    return df.groupby("pixel_hash")["split"].transform("nunique") <= 1


def _labelled(df: pd.DataFrame) -> pd.Series:
    """Rows with a label (the label checks below judge these; `_unlabeled_consistent` the others)."""
    return df["label"] != UNLABELED


def _labels_match_classes(df: pd.DataFrame) -> pd.Series:
    known = _labelled(df)
    index = {c: i for i, c in enumerate(sorted(df.loc[known, "class"].unique()))}
    return ~known | (df["label"] == df["class"].map(index))


def _labels_in_range(df: pd.DataFrame) -> pd.Series:
    known = _labelled(df)
    n = df.loc[known, "class"].nunique()
    return ~known | ((df["label"] >= 0) & (df["label"] < n))


def _unlabeled_consistent(df: pd.DataFrame) -> pd.Series:
    """Label -1 exactly on the no-class rows, those in split train, and a manifest all labelled or all not."""
    unlabeled = ~_labelled(df)
    no_class = pd.Series([c == unlabeled_class(d) for c, d in zip(df["class"], df["dataset"])], index=df.index,
                         dtype=bool)
    ok = (unlabeled == no_class) & (~unlabeled | (df["split"] == "train"))
    if unlabeled.any() and not unlabeled.all():  # the minority family is what is wrong
        ok &= unlabeled if bool(unlabeled.mean() >= 0.5) else ~unlabeled
    return ok


def _one_split_family(df: pd.DataFrame) -> pd.Series:
    meta = df["split"].isin(META_SPLITS)
    family_is_meta = bool(meta.mean() >= 0.5) if len(df) else True
    return meta if family_is_meta else ~meta


def _str() -> pa.Column:
    return pa.Column(str, pa.Check.str_length(min_value=1), nullable=False)


def _positive_int() -> pa.Column:
    return pa.Column("int64", pa.Check.ge(1), nullable=False)


MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column("int64", pa.Check.ge(0), nullable=False),
        "dataset": _str(),
        "domain": _str(),
        "class": _str(),
        "label": pa.Column("int64", pa.Check.ge(UNLABELED), nullable=False),
        "split": pa.Column(str, pa.Check.isin(META_SPLITS + TARGET_SPLITS), nullable=False),
        "source_path": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False, unique=True),
        "pixel_hash": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{32}$"), nullable=False),
        "orig_height": _positive_int(),
        "orig_width": _positive_int(),
        "orig_channels": pa.Column("int64", pa.Check.isin([1, 3]), nullable=False),
    },
    checks=[
        pa.Check(_ids_contiguous, name="ids_contiguous", error="ids_contiguous: id must equal the row number 0..N-1"),
        pa.Check(_one_dataset, name="one_dataset", error="one_dataset: every row must name the same dataset"),
        pa.Check(_class_prefixed, name="class_prefixed", error="class_prefixed: class must start with '<dataset>/'"),
        pa.Check(_meta_class_disjoint, name="meta_splits_class_disjoint",
                 error="meta_splits_class_disjoint: a class appears in more than one meta split"),
        pa.Check(_hash_in_one_split, name="pixel_hash_in_one_split",
                 error="pixel_hash_in_one_split: the same pixels appear in more than one split (duplicate across splits)"),
        pa.Check(_labels_in_range, name="labels_in_range", error="labels_in_range: label must lie in [0, number of classes)"),
        pa.Check(_labels_match_classes, name="labels_match_sorted_classes",
                 error="labels_match_sorted_classes: label must be the index of class in the sorted class names"),
        pa.Check(_unlabeled_consistent, name="unlabeled_rows_consistent",
                 error="unlabeled_rows_consistent: label -1 (no label) goes with class '<dataset>/' and split train, "
                       "on every row of the manifest or on none"),
        pa.Check(_one_split_family, name="one_split_family",
                 error="one_split_family: a manifest uses either meta_* splits (source) or train/val/test (target), not both"),
    ],
    strict=True,
    ordered=True,
    name="manifest",
)


def validate_manifest(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate a manifest lazily; turn every failure into one DataError.

    Args:
        df: the manifest.
        where: what to call it in the message (dataset name or file path).

    Returns:
        The validated manifest.

    Raises:
        DataError: lists each failure (check, column, row, source file, value
            found), up to MAX_LISTED lines plus a count; `.failure_cases` holds all.
    """
    try:
        return MANIFEST_SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        fc = err.failure_cases
        lines = []
        seen: set[tuple[str, object]] = set()
        for r in fc.itertuples(index=False):
            idx = r.index
            known = idx is not None and not (isinstance(idx, float) and np.isnan(idx)) and idx in df.index
            wide = r.schema_context == "DataFrameSchema"  # a row-wise check: pandera repeats it per column
            key = (str(r.check), idx if known else r.failure_case)
            if wide and key in seen:
                continue
            seen.add(key)
            if known:
                row = df.loc[idx]
                at = f"row {idx} file {row['source_path']!r} (split {row['split']}, class {row['class']})"
            else:
                at = "manifest"
            what = "" if wide else f" on column {r.column!r}, found {r.failure_case!r}"
            extra = ""
            if known and str(r.check).startswith("pixel_hash_in_one_split"):
                same = df[(df["pixel_hash"] == df.loc[idx, "pixel_hash"]) & (df.index != idx)]
                extra = "; same pixels as " + ", ".join(f"{p!r} ({s})" for p, s in zip(same["source_path"], same["split"]))
            lines.append(f"  {at}: {r.check}{what}{extra}")
        shown = "\n".join(lines[:MAX_LISTED])
        more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
        exc = DataError(
            f"{where}: manifest validation failed with {len(lines)} failure(s):\n{shown}{more}\n"
            "Fix or remove the listed input files (or their labels) and re-run prepare."
        )
        exc.failure_cases = fc  # type: ignore[attr-defined]
        raise exc from None
