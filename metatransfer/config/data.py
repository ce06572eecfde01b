"""The data sections of params.yaml: `data`, `fetch`, `prepare` (with its per-dataset entries) and `episodes`.

Frozen dataclasses that describe shape and types only; defaults live in
params.yaml. Loading and checks: metatransfer/config/build.py, checks.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataParams:
    """Shared data settings.

    mirror: a local folder holding the official files (relative paths are
        relative to the project root). Empty means: download from the
        official URLs. The environment variable METATRANSFER_MIRROR overrides it.
    """

    mirror: str
    raw_dir: str
    prepared_dir: str


@dataclass(frozen=True)
class ImageFolderParams:
    """A user's own ImageFolder tree (`class/img.*` or `domain/class/img.*`)."""

    path: str
    role: str  # "source" (class-disjoint meta splits) or "target" (image splits)
    split_fractions: tuple[float, float, float]  # meta_train/meta_val/meta_test or train/val/test
    # "auto" (train|training|val|valid|validation|test|testing top-level folders
    # mean "split/class", else by file depth), "class", "split/class" or
    # "domain/class". With "split/class" the given split is kept and
    # split_fractions is not used (validation is carved by prepare.val_fraction).
    layout: str = "auto"


IMAGE_FOLDER_LAYOUTS = ("auto", "class", "split/class", "domain/class")


@dataclass(frozen=True)
class NpzFileParams:
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

    path: str
    sha256: str = ""
    role: str = "target"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchParams:
    """Which registered datasets to fetch into data/raw (names from the source table)."""

    datasets: tuple[str, ...]


@dataclass(frozen=True)
class DescriptionParams:
    """A dataset's task description (`prepare.descriptions.<dataset>`; metatransfer/descriptions.py).

    Each key is optional; at least one must hold a word. The conditional
    meta-learner reads its tokens; no other stage uses it.
    """

    modality: str = ""
    anatomy: str = ""
    domain: str = ""
    text: str = ""


@dataclass(frozen=True)
class DatasetShapeParams:
    """One dataset's own stored shape (`prepare.per_dataset.<dataset>`; heterogeneous transfer).

    A key left out (None) takes the `prepare` value. A target stored at its own
    channels or size is fed to the backbone through an input adapter during
    fine-tuning (metatransfer/models/adapter.py); source datasets, which train
    the backbone, keep `prepare.channels` x `prepare.image_size`.
    """

    channels: int | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class PrepareParams:
    """How raw files become the prepared store.

    omniglot_protocol: "background_evaluation" (background alphabets train,
        evaluation alphabets test) or "vinyals" (1200 characters meta-train,
        the remaining 423 meta-test).
    meta_val_classes: classes moved from meta_train to meta_val (source sets).
    """

    image_size: int
    channels: int
    omniglot_protocol: str
    meta_val_classes: int
    image_folders: dict[str, ImageFolderParams] = field(default_factory=dict)
    # The user's own MedMNIST-format npz files, each pinned by its sha256.
    npz_files: dict[str, NpzFileParams] = field(default_factory=dict)
    # Share of each class's training images carved (stratified, seeded) into
    # `val` for datasets that come with a train/test split but no validation
    # split (brain_tumor_mri, ham10000_mel_nv, split/class image folders).
    val_fraction: float = 0.1
    # Optional task descriptions, by prepared dataset name: written beside its
    # images as description.json (only for a described dataset).
    descriptions: dict[str, DescriptionParams] = field(default_factory=dict)
    # Datasets stored at their own channels and/or size instead of channels x
    # image_size (targets only; docs/guide.md, "Different channels or sizes").
    per_dataset: dict[str, DatasetShapeParams] = field(default_factory=dict)

    def shape_of(self, dataset: str) -> tuple[int, int]:
        """(channels, image_size) that `dataset` is stored at: its `per_dataset` entry, else the defaults."""
        own = self.per_dataset.get(dataset) or DatasetShapeParams()
        return (self.channels if own.channels is None else own.channels,
                self.image_size if own.image_size is None else own.image_size)


@dataclass(frozen=True)
class EpisodeSetParams:
    """One fixed evaluation episode set."""

    dataset: str
    split: str
    n_way: int
    shots: tuple[int, ...]
    n_query: int
    n_episodes: int
    # Classes of the split with fewer images are left out of the set's episodes
    # (a WARNING lists them; the episode file records them); 0 keeps every class.
    min_images_per_class: int = 0


@dataclass(frozen=True)
class EpisodesParams:
    """Fixed evaluation episode files, keyed by set name."""

    sets: dict[str, EpisodeSetParams]
