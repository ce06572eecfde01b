"""The data sections of params.yaml: `data`, `fetch`, `prepare` (with its per-dataset entries) and `episodes`.

Frozen pydantic models (metatransfer/config/build.py) that describe shape, types, ranges and
choices; defaults live in params.yaml. Checks across keys: metatransfer/config/checks.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metatransfer.config.build import ConfigModel, Float, Int, Str, bounded


class DataParams(ConfigModel):
    """Shared data settings.

    mirror: a local folder holding the official files (relative paths are
        relative to the project root). Empty means: download from the
        official URLs. The environment variable METATRANSFER_MIRROR overrides it.
    """

    mirror: Str
    raw_dir: Str
    prepared_dir: Str


IMAGE_FOLDER_LAYOUTS = ("auto", "class", "split/class", "domain/class", "flat")


class ImageFolderParams(ConfigModel):
    """A user's own ImageFolder tree (`class/img.*` or `domain/class/img.*`)."""

    path: Str
    role: Literal["source", "target"]  # "source" (class-disjoint meta splits) or "target" (image splits)
    split_fractions: tuple[Float, Float, Float]  # meta_train/meta_val/meta_test or train/val/test
    # "auto" (train|training|val|valid|validation|test|testing top-level folders
    # mean "split/class", else by file depth), "class", "split/class" or
    # "domain/class". With "split/class" the given split is kept and
    # split_fractions is not used (validation is carved by prepare.val_fraction).
    layout: Literal[IMAGE_FOLDER_LAYOUTS] = "auto"  # type: ignore[valid-type]


class NpzFileParams(ConfigModel):
    """A user's own MedMNIST-format .npz file, pinned by its SHA-256 (docs/guide.md, "Your own npz file").

    path: the file; relative paths are relative to the project root.
    sha256: the file's SHA-256 (64 hex digits, `sha256sum FILE`); prepare
        refuses a file with another checksum, and without it prints the digest
        to paste. It is the dataset's data version.
    role: "target" (the file's train/test (and val) splits are kept; without
        val arrays, prepare.val_fraction of each class's train images becomes
        val) or "source" (all images pooled; classes cut into
        meta_train/meta_val/meta_test by split_fractions).
    split_fractions: role source only: shares of the classes, in the order
        meta_train, meta_val, meta_test.
    class_names: names of labels 0, 1, ... (empty: "00", "01", ... like MedMNIST).
    """

    path: Str
    sha256: Str = ""
    role: Literal["source", "target"] = "target"
    split_fractions: tuple[Float, Float, Float] = (0.7, 0.15, 0.15)
    class_names: tuple[Str, ...] = ()


class FetchParams(ConfigModel):
    """Which registered datasets to fetch into data/raw (names from the source table)."""

    datasets: tuple[Str, ...]


class DescriptionParams(ConfigModel):
    """A dataset's task description (`prepare.descriptions.<dataset>`; metatransfer/descriptions.py).

    Each key is optional; at least one must hold a word. The conditional
    meta-learner reads its tokens; no other stage uses it.
    """

    modality: Str = ""
    anatomy: Str = ""
    domain: Str = ""
    text: Str = ""


class DatasetShapeParams(ConfigModel):
    """One dataset's own stored shape (`prepare.per_dataset.<dataset>`; heterogeneous transfer).

    A key left out (None) takes the `prepare` value. A target stored at its own
    channels or size is fed to the backbone through an input adapter during
    fine-tuning (metatransfer/models/adapter.py); source datasets, which train
    the backbone, keep `prepare.channels` x `prepare.image_size`.
    """

    channels: Int | None = None  # 1 or 3 (checks.py)
    image_size: Int | None = bounded(None, ge=16)


class PrepareParams(ConfigModel):
    """How raw files become the prepared store.

    omniglot_protocol: "background_evaluation" (background alphabets train,
        evaluation alphabets test) or "vinyals" (1200 characters meta-train,
        the remaining 423 meta-test).
    meta_val_classes: classes moved from meta_train to meta_val (source sets).
    """

    image_size: Int = bounded(ge=16)
    channels: Int  # 1 or 3 (checks.py)
    omniglot_protocol: Literal["background_evaluation", "vinyals"]
    meta_val_classes: Int = bounded(ge=0)
    image_folders: dict[Str, ImageFolderParams] = Field(default_factory=dict)
    # The user's own MedMNIST-format npz files, each pinned by its sha256.
    npz_files: dict[Str, NpzFileParams] = Field(default_factory=dict)
    # Share of each class's training images carved (stratified, seeded) into
    # `val` for datasets that come with a train/test split but no validation
    # split (brain_tumor_mri, ham10000_mel_nv, split/class image folders).
    val_fraction: Float = bounded(0.1, ge=0, lt=1, hint="share of training images per class moved to val")
    # Optional task descriptions, by prepared dataset name: written beside its
    # images as description.json (only for a described dataset).
    descriptions: dict[Str, DescriptionParams] = Field(default_factory=dict)
    # Datasets stored at their own channels and/or size instead of channels x
    # image_size (targets only; docs/guide.md, "Different channels or sizes").
    per_dataset: dict[Str, DatasetShapeParams] = Field(default_factory=dict)

    def shape_of(self, dataset: str) -> tuple[int, int]:
        """(channels, image_size) that `dataset` is stored at: its `per_dataset` entry, else the defaults."""
        own = self.per_dataset.get(dataset) or DatasetShapeParams()
        return (self.channels if own.channels is None else own.channels,
                self.image_size if own.image_size is None else own.image_size)


class EpisodeSetParams(ConfigModel):
    """One fixed evaluation episode set."""

    dataset: Str
    split: Str
    n_way: Int = bounded(ge=2)
    shots: tuple[Int, ...]  # a non-empty list of integers >= 1 (checks.py)
    n_query: Int = bounded(ge=1)
    n_episodes: Int = bounded(ge=2, hint="a confidence interval needs two")
    # Classes of the split with fewer images are left out of the set's episodes
    # (a WARNING lists them; the episode file records them); 0 keeps every class.
    min_images_per_class: Int = bounded(0, ge=0, hint="0: keep every class")


class EpisodesParams(ConfigModel):
    """Fixed evaluation episode files, keyed by set name."""

    sets: dict[Str, EpisodeSetParams]
