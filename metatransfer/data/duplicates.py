"""Exact duplicates (same prepared pixel_hash) in a dataset, decided per kind (prepare calls these).

=================  ==========================================================
kind               action
=================  ==========================================================
omniglot_*         across splits: quarantine the copy in the lower split
                   (meta_train < meta_val < meta_test), keep meta_test intact.
                   None occur in the official files at 28x28 (checked).
medmnist,          across official splits: quarantine the copy on the train
npz_file           (for npz_file: the splits assigned)
                   (then val) side, keep test intact so scores stay comparable
                   with published ones; logged. Real data: breastmnist has one
                   image in both train and test.
kmnist             one split only: nothing to do.
csv_split          within one class: keep the first file (sorted path),
(mini_imagenet)    quarantine later copies (they could land in the support
                   and the query of one episode). Real data: one such pair
                   (n02091831 00000748 / 00001256). Across splits: quarantine
                   the lower-split copy (as omniglot). Across classes within
                   one split: kept (the publishers' labels), like the real
                   pair n02108551 00000121 / n02111277 00000207 (both
                   meta_train).
image_folder,      within one class: keep the copy in the highest given split
split_folder       (test, then val, then train), then the first by sorted
(brain_tumor_mri,  path; quarantine the other copies (an accidental copy;
ham10000_mel_nv)   test stays intact). Real data: ham10000_mel_nv's pair
                   ISIC_0024366 / ISIC_0029861 (test/nv): the second is
                   quarantined. brain_tumor_mri has none (removed upstream).
                   Across classes (any splits): FAIL (the same image under
                   two labels is a labelling error only the user can fix);
                   the DataError lists every file with its class and split.
=================  ==========================================================

Within-split duplicates in different classes of the official array datasets
are kept (they are the publishers' labels). Every quarantined input goes to
quarantine.csv with a reason. Files that cannot be decoded (not an image,
corrupt, truncated, float pixels) are found while decoding and quarantined.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from metatransfer.data import importers as imp
from metatransfer.data.splits import SPLIT_RANK
from metatransfer.errors import DataError

log = logging.getLogger(__name__)

_ORIGIN_RANK = {"train": 0, "val": 1, "test": 2}


def drop_within_class_copies(df: pd.DataFrame) -> tuple[np.ndarray, list[imp.QuarantineRow]]:
    """Keep one image per (class, pixel_hash): the one in the highest given split (test side), then the
    first by sorted path; quarantine the other copies."""
    rank = df["origin"].map(_ORIGIN_RANK).fillna(0).astype(int)
    order = df.assign(_rank=-rank).sort_values(["_rank", "source_path"], kind="stable")
    dup = order.duplicated(["class", "pixel_hash"], keep="first")
    first = {(c, h): s for c, h, s in zip(order["class"][~dup], order["pixel_hash"][~dup], order["source_path"][~dup])}
    rows = [imp.QuarantineRow(d, s, f"exact duplicate of {first[(c, h)]} in the same class")
            for d, s, c, h in zip(order["dataset"][dup], order["source_path"][dup], order["class"][dup],
                                  order["pixel_hash"][dup])]
    keep = np.ones(len(df), dtype=bool)
    keep[order.index[dup.to_numpy()]] = False
    return keep, rows


def fail_cross_class_copies(df: pd.DataFrame, dataset: str) -> None:
    """Image folders: the same pixels under two class names is a labelling error only the user can fix."""
    n_cls = df.groupby("pixel_hash")["class"].transform("nunique")
    bad = df[n_cls > 1]
    if bad.empty:
        return
    lines = [f"  {', '.join(f'{p!r} ({c}, {s})' for p, c, s in zip(g['source_path'], g['class'], g['split']))}"
             for _, g in bad.groupby("pixel_hash", sort=False)]
    raise DataError(f"dataset {dataset}: {len(lines)} image(s) appear under two classes (same pixels; "
                    f"check pixel_hash_in_one_class):\n" + "\n".join(lines[:50])
                    + "\nThe same image under two labels is a labelling error: remove the wrong copy and re-run.")


def drop_cross_split_copies(df: pd.DataFrame) -> tuple[np.ndarray, list[imp.QuarantineRow]]:
    """Keep a duplicated image only in its highest split (test side); quarantine the others."""
    rank = df["split"].map(SPLIT_RANK)
    n_splits = df.groupby("pixel_hash")["split"].transform("nunique")
    keep = np.ones(len(df), dtype=bool)
    rows: list[imp.QuarantineRow] = []
    for h, grp in df[n_splits > 1].groupby("pixel_hash"):
        top = rank[grp.index].max()
        kept = grp[rank[grp.index] == top].iloc[0]
        for i, r in grp[rank[grp.index] < top].iterrows():
            keep[i] = False
            reason = (f"duplicate across splits: same pixels as {kept['source_path']} ({kept['split']}); "
                      f"dropped from {r['split']} to keep {kept['split']} intact")
            rows.append(imp.QuarantineRow(r["dataset"], r["source_path"], reason))
            log.warning("%s: %s", r["source_path"], reason)
    return keep, rows

