"""Dataset source table: official sources, mirror paths and accepted checksums (a data table).

Every raw file the pipeline reads has one entry here: its official URL, its
path inside a local mirror folder (``data.mirror`` in params.yaml, overridden
by the environment variable ``METATRANSFER_MIRROR``) and one or more accepted
checksums. A file is accepted when *any* listed checksum matches; each
checksum carries a provenance note saying where the value comes from.

Checksum decisions (why some files list two values):

======================  ============================================================
file                    accepted checksums
======================  ============================================================
omniglot npz            sha256 of the files at bitsandscraps/omniglot@b0481240 (the
                        repository publishes none; value from the mirror's SHA256SUMS,
                        a pinned commit makes it stable).
character_index.csv     sha256 from the mirror's SHA256SUMS. It is a derived index
                        (npz row -> alphabet/character) with no upstream URL: it
                        can only come from a mirror (fetch says so when downloading).
omniglot official zips  md5 published by torchvision / used across the community.
omniglot small zips     sha256 of the official files (mirror SHA256SUMS).
MedMNIST npz            the official MD5 (medmnist 3.x ``info.py``, Zenodo record
                        10519652) plus, where the shared mirror holds the same file,
                        its sha256. breastmnist: the mirror copy stores labels as
                        ``(N,)`` instead of ``(N, 1)`` (same arrays otherwise), so it
                        has its own sha256, accepted with that provenance note.
KMNIST npz              sha256 of the official files (CODH publishes no checksum;
                        the mirror copies are byte-identical to the official ones).
======================  ============================================================

Folder datasets (many files: ``mini_imagenet``, ``brain_tumor_mri``,
``ham10000_mel_nv``) are registered with a `SourceFolder`: their public
provenance (GitHub repository + commit) and the folder under the mirror;
`metatransfer.data.fetch` links them from the mirror and verifies them.

==================  ===========================================================
folder dataset      checksums
==================  ===========================================================
mini_imagenet       no official checksum exists: the shared mirror's
                    ``SHA256SUMS`` (sha256 pinned below) is the reference;
                    train/val/test.csv pinned too (the Ravi & Larochelle split
                    as held by the mirror: val classes cut to 100 images).
brain_tumor_mri     ``SHA256SUMS`` of the mirror's subset (sha256 pinned).
ham10000_mel_nv     ``SHA256SUMS`` of the mirror's subset (sha256 pinned).
==================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from metatransfer.errors import DataError


# --------------------------------------------------------------------------- types
@dataclass(frozen=True)
class Checksum:
    """One accepted checksum of a file.

    Attributes:
        algo: "md5" or "sha256" (any hashlib name).
        value: lowercase hex digest.
        note: where the value comes from (provenance).
    """

    algo: str
    value: str
    note: str = ""


@dataclass(frozen=True)
class SourceFile:
    """One raw file of a dataset.

    Attributes:
        name: file name under ``<raw_dir>/<dataset>/``.
        url: official download URL ("" when there is none: mirror only).
        mirror_path: path relative to the mirror root.
        checksums: accepted checksums; a file matching any one of them is accepted.
    """

    name: str
    url: str
    mirror_path: str
    checksums: tuple[Checksum, ...]


@dataclass(frozen=True)
class SourceFolder:
    """A dataset that is a folder of many files (fetched as a whole).

    Attributes:
        mirror_path: the folder relative to the mirror root.
        origin: public provenance (repository, commit, paths inside it).
        url: where a person gets the files (the repository tree at the commit).
        layout: what the folder must hold (shown in errors).
        manifest: name of the per-file checksum manifest inside the folder.
        reference: (relative path, sha256) of reference files (the manifest
            itself, split csvs): a copy that differs is accepted with a warning.
    """

    mirror_path: str
    origin: str
    url: str
    layout: str
    manifest: str = "SHA256SUMS"
    reference: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: how to get its raw files and which importer reads them.

    Attributes:
        name: source name (also the raw and prepared folder name).
        kind: importer kind: "omniglot_npz", "omniglot_zip", "medmnist", "kmnist",
            "csv_split" (images/ + train/val/test.csv) or "split_folder"
            (split/class/image folders).
        files: the raw files (empty for folder datasets).
        license: licence of the data.
        n_classes: number of classes for labelled array datasets (0 = from the data).
        folder: set for folder datasets (fetched as a whole, see `fetch_folder`).
        role: "source" or "target" for folder datasets ("" = decided by the kind).
    """

    name: str
    kind: str
    files: tuple[SourceFile, ...]
    license: str
    n_classes: int = 0
    folder: SourceFolder | None = None
    role: str = ""


# --------------------------------------------------------------------------- source table
_BITS = "https://raw.githubusercontent.com/bitsandscraps/omniglot/b0481240b7eb42393285a93ce7d2f266ff10c62b"
_LAKE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
_KMNIST = "http://codh.rois.ac.jp/kmnist/dataset/kmnist"
_MIRROR_NOTE = "sha256 of the file in the shared mirror (SHA256SUMS)"

# MedMNIST 2D, 28x28 files: name -> (official MD5, number of classes, multi-label?).
# MD5s from medmnist 3.x info.py (Zenodo record 10519652); retinamnist and
# breastmnist cross-checked against the mirror's *.INFO.json files.
MEDMNIST_2D: dict[str, tuple[str, int, bool]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", 9, False),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", 14, True),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", 7, False),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", 4, False),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", 2, False),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", 5, False),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", 2, False),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", 8, False),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", 8, False),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", 11, False),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", 11, False),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", 11, False),
}

# Extra accepted checksums for MedMNIST files as held by the shared mirror.
_MEDMNIST_MIRROR_SHA256: dict[str, Checksum] = {
    "retinamnist": Checksum(
        "sha256", "254915f5f0a2074665c4676356824cf4ef4a3bcab233894b4bafcaf48962bd69",
        "sha256 of the official file (mirror copy is byte-identical)"),
    "breastmnist": Checksum(
        "sha256", "5e68d79723fb3a63a399b0a66b66451799fc2eb3651f469cec0b679cfd743b68",
        "mirror copy with (N,) labels instead of the official (N, 1); same arrays otherwise"),
}


def medmnist_source(name: str) -> DatasetSource:
    """The source-table entry of a MedMNIST 2D dataset (28x28 file) by name.

    Args:
        name: lowercase MedMNIST name, e.g. "dermamnist".

    Returns:
        Its DatasetSource (kind "medmnist").

    Raises:
        DataError: the name is not a MedMNIST 2D dataset with a known MD5.
    """
    if name not in MEDMNIST_2D:
        raise DataError(
            f"unknown MedMNIST 2D dataset {name!r}; known: {sorted(MEDMNIST_2D)}. "
            "Add its official MD5 to MEDMNIST_2D in metatransfer/data/sources.py."
        )
    md5, n_classes, _ = MEDMNIST_2D[name]
    sums = [Checksum("md5", md5, "official MD5 (medmnist info.py, Zenodo record 10519652)")]
    if name in _MEDMNIST_MIRROR_SHA256:
        sums.append(_MEDMNIST_MIRROR_SHA256[name])
    f = SourceFile(
        name=f"{name}.npz",
        url=f"https://zenodo.org/records/10519652/files/{name}.npz?download=1",
        mirror_path=f"medmnist/{name}.npz",
        checksums=tuple(sums),
    )
    return DatasetSource(name=name, kind="medmnist", files=(f,), license="CC BY 4.0 (dermamnist: CC BY-NC 4.0)",
                         n_classes=n_classes)


def _sha(value: str, note: str = _MIRROR_NOTE) -> tuple[Checksum, ...]:
    return (Checksum("sha256", value, note),)


DATASETS: dict[str, DatasetSource] = {
    "omniglot": DatasetSource(
        name="omniglot",
        kind="omniglot_npz",
        license="MIT",
        files=(
            SourceFile("images_background.npz", f"{_BITS}/images_background.npz",
                       "omniglot/images_background.npz",
                       _sha("8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199")),
            SourceFile("images_evaluation.npz", f"{_BITS}/images_evaluation.npz",
                       "omniglot/images_evaluation.npz",
                       _sha("0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276")),
            SourceFile("character_index.csv", "", "omniglot/character_index.csv",
                       _sha("a32d00b7d8b49c0b8f1afbf748796f9676a9dd15480dbb1fd30b59a6235d85f4",
                            "derived index with no upstream URL; sha256 from the mirror's SHA256SUMS")),
        ),
    ),
    "omniglot_zip": DatasetSource(
        name="omniglot_zip",
        kind="omniglot_zip",
        license="MIT",
        files=(
            SourceFile("images_background.zip", f"{_LAKE}/images_background.zip",
                       "omniglot/official/images_background.zip",
                       (Checksum("md5", "68d2efa1b9178cc56df9314c21c6e718", "official zip MD5 (as in torchvision)"),)),
            SourceFile("images_evaluation.zip", f"{_LAKE}/images_evaluation.zip",
                       "omniglot/official/images_evaluation.zip",
                       (Checksum("md5", "6b91aef0f799c5bb55b94e3f2daec811", "official zip MD5 (as in torchvision)"),)),
        ),
    ),
    "omniglot_small": DatasetSource(
        name="omniglot_small",
        kind="omniglot_zip",
        license="MIT",
        files=(
            SourceFile("images_background_small1.zip", f"{_LAKE}/images_background_small1.zip",
                       "omniglot/official_small/images_background_small1.zip",
                       _sha("f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
                            "sha256 of the official file (mirror SHA256SUMS)")),
            SourceFile("images_background_small2.zip", f"{_LAKE}/images_background_small2.zip",
                       "omniglot/official_small/images_background_small2.zip",
                       _sha("3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
                            "sha256 of the official file (mirror SHA256SUMS)")),
        ),
    ),
    "retinamnist": medmnist_source("retinamnist"),
    "breastmnist": medmnist_source("breastmnist"),
    "kmnist": DatasetSource(
        name="kmnist",
        kind="kmnist",
        license="CC BY-SA 4.0",
        n_classes=10,
        files=(
            SourceFile("kmnist-test-imgs.npz", f"{_KMNIST}/kmnist-test-imgs.npz", "kmnist/kmnist-test-imgs.npz",
                       _sha("692d824896bec8f3c357ebf7a0fe904ed67ac632ce953d0b58f7fbef7bb27d87",
                            "sha256 of the official file (CODH publishes none; mirror is byte-identical)")),
            SourceFile("kmnist-test-labels.npz", f"{_KMNIST}/kmnist-test-labels.npz", "kmnist/kmnist-test-labels.npz",
                       _sha("660f13a4705431ea2a6391c41ecbe384cd0d932c595a101ec4f3b8989e785046",
                            "sha256 of the official file (CODH publishes none; mirror is byte-identical)")),
        ),
    ),
}


_GH = "https://github.com"
DATASETS["mini_imagenet"] = DatasetSource(
    name="mini_imagenet",
    kind="csv_split",
    role="source",
    license="ImageNet terms of access (non-commercial research and education)",
    files=(),
    folder=SourceFolder(
        mirror_path="mini_imagenet",
        origin=("images: GitHub Deo0330/split_minidataset@557ebcae0db23651f9370f54a5f31b1f0fd4064d "
                "(train/<wnid>/*.jpg, val/<wnid>/*.jpg; mini-ImageNet, Vinyals et al. 2016); class split: "
                "Ravi & Larochelle (2017) train.csv/val.csv/test.csv"),
        url=f"{_GH}/Deo0330/split_minidataset/tree/557ebcae0db23651f9370f54a5f31b1f0fd4064d",
        layout="images/<wnid><8-digit index>.jpg, train.csv, val.csv, test.csv (header filename,label), SHA256SUMS",
        reference=(
            ("SHA256SUMS", "62695bddadddba1002f50cdcdda6c68203475e8637d8c29d62ad6db5b7d30287"),
            ("train.csv", "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f"),
            ("val.csv", "87cfa0034e67f95d29c77685dddf4df18575a95e8daf89928c6f2e49917349a9"),
            ("test.csv", "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa"),
        ),
    ),
)
DATASETS["brain_tumor_mri"] = DatasetSource(
    name="brain_tumor_mri",
    kind="split_folder",
    role="target",
    license="CC BY 4.0 (figshare part, Cheng et al. 2017); Kaggle 'Brain Tumor MRI Dataset' (M. Nickparvar)",
    files=(),
    folder=SourceFolder(
        mirror_path="brain_tumor_mri",
        origin=("GitHub KomalChaudhari8/BRAIN_TUMOR_APP@1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec, "
                "Training/<class>/, Testing/<class>/ (copy of the Kaggle Brain Tumor MRI Dataset; the mirror "
                "holds the first 300/150 files per class after removing exact duplicates)"),
        url=f"{_GH}/KomalChaudhari8/BRAIN_TUMOR_APP/tree/1fac2c320ad3f98cb71ce79d5d1490a953eaa1ec",
        layout="Training/<class>/*.jpg, Testing/<class>/*.jpg, SHA256SUMS",
        reference=(("SHA256SUMS", "68fe684071f03408d4330a9dc67b4169634fd62abcf902b28c32ba8763e41932"),),
    ),
)
DATASETS["ham10000_mel_nv"] = DatasetSource(
    name="ham10000_mel_nv",
    kind="split_folder",
    role="target",
    license="CC BY-NC 4.0 (HAM10000, Tschandl et al. 2018, doi:10.7910/DVN/DBW86T): non-commercial use",
    files=(),
    folder=SourceFolder(
        mirror_path="ham10000_mel_nv",
        origin=("GitHub Criscraft/workshop_ki_hautkrebserkennung@25b3c4a6b36efdc2b1468b78116f1ae2fb9b69b0, "
                "data/{train,test}/{mel,nv}/ (HAM10000 images)"),
        url=f"{_GH}/Criscraft/workshop_ki_hautkrebserkennung/tree/25b3c4a6b36efdc2b1468b78116f1ae2fb9b69b0/data",
        layout="train/{mel,nv}/ISIC_*.jpg, test/{mel,nv}/ISIC_*.jpg, SHA256SUMS",
        reference=(("SHA256SUMS", "7e96c5f1c7739a730140e653f25251d67e85f4368e5c1224bcf07b9c6b13de5f"),),
    ),
)


def get_source(name: str) -> DatasetSource:
    """Look a dataset up in the source table (any MedMNIST 2D name also works).

    Args:
        name: source name.

    Returns:
        The DatasetSource.

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    if name in DATASETS:
        return DATASETS[name]
    if name in MEDMNIST_2D:
        return medmnist_source(name)
    raise DataError(
        f"unknown dataset {name!r}; registered: {sorted(DATASETS)} and MedMNIST 2D: {sorted(MEDMNIST_2D)}. "
        "Fix fetch.datasets in params.yaml."
    )

