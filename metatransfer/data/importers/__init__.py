"""Importers: raw files -> image batches + one metadata row per image.

Each importer returns an `Imported`: the images as a few same-shape batches
(array datasets stay arrays: nothing goes through PIL per image where numpy
can do it) plus a DataFrame with one row per image, in batch order.

Conventions (decided here, relied on by `prepare`):

* Pixels are uint8, layout (n, H, W, C) with C = 1 (grey) or 3 (RGB), or
  bool (Omniglot) with `ImageBatch.background_true` saying which value is
  the background.
* Omniglot polarity: ink is bright (255) on a black (0) background, i.e. the
  official True=white background is inverted, as the standard few-shot
  loaders do (Snell et al.'s `1 - x`) and as MNIST/KMNIST are stored. So the
  Omniglot source and the KMNIST near domain share one polarity.
* Class names are global: ``<dataset>/<alphabet>/<character>`` (Omniglot),
  ``<dataset>/<NN>`` with the official label zero-padded to two digits
  (MedMNIST, KMNIST: sorted name order == official label order; a user's
  npz, `prepare.npz_files`, likewise, or ``<dataset>/<class_names[i]>``),
  ``<dataset>/<class>`` or ``<dataset>/<domain>/<class>`` (ImageFolder).
* ``origin`` is the official split a row comes from ("background" /
  "evaluation" for Omniglot, "train" / "val" / "test" for MedMNIST, "" when
  the source has none); `prepare` turns it into the project's splits.
* ImageFolder: any PIL-readable file; EXIF orientation applied; alpha
  dropped; palette/CMYK/YCbCr -> RGB; 16-bit grey scaled to 8 bits. Files PIL
  cannot identify, corrupt or truncated images, float images and files outside
  the layout are quarantined with a reason, never silently skipped.
* Bounds (image files): an image whose header declares more than
  MAX_IMAGE_PIXELS pixels, or a side below MIN_IMAGE_SIDE, is quarantined
  before any pixel is decoded (a 13000x13000 RGB PNG of 1.6 MB would take
  0.5 GB decoded, 2 GB as float); PIL's DecompressionBombWarning is an error
  while `decode_files` runs.
* Links: a symbolic link (file or folder) whose target lies outside the
  dataset folder, or whose target is missing, is quarantined; a link to a
  folder inside the tree is not followed (quarantined: its files are listed
  where they really are). A csv row naming a file outside the dataset
  folder (``../x.jpg``, an absolute path, a link leading out) is quarantined
  the same way. Hard links are ordinary files (fetch makes them).
* Image files (ImageFolder, the split folders of brain_tumor_mri /
  ham10000_mel_nv, the mini-ImageNet csv layout) are *not* decoded by the
  importer: it returns an `ImageFiles` batch (paths) with ``orig_*`` = 0, and
  `prepare` decodes them in bounded chunks (`decode_image`), quarantining the
  files that fail, so no whole dataset is ever held in memory. `materialise`
  decodes such an Imported eagerly (small trees, tests).
* Layouts of image folders: ``class/img`` and ``domain/class/img`` (origin
  ""), ``split/class/img`` (origin = the split: top-level folders named
  train|training, val|valid|validation, test|testing, any case), and the Ravi
  & Larochelle csv layout (``images/`` + ``train.csv``/``val.csv``/``test.csv``
  with header ``filename,label``; origin = the csv's split, class = the wnid).
"""

from metatransfer.data.importers.arrays import (
    MEDMNIST_LABELS,
    import_kmnist,
    import_medmnist,
    import_npz_file,
    medmnist_class_names,
)
from metatransfer.data.importers.decode import (
    MAX_IMAGE_PIXELS,  # a copy: patch metatransfer.data.importers.decode to change the bound
    MIN_IMAGE_SIDE,
    decode_files,
    decode_image,
    iter_chunks,
    materialise,
)
from metatransfer.data.importers.folders import (
    CSV_SPLITS,
    LAYOUTS,
    MANIFEST_NAME,
    SPLIT_FOLDER_NAMES,
    detect_layout,
    import_csv_split,
    import_image_folder,
    list_tree,
)
from metatransfer.data.importers.omniglot import import_omniglot_npz, import_omniglot_zips
from metatransfer.data.importers.types import META_COLUMNS, ImageBatch, ImageFiles, Imported, QuarantineRow

__all__ = [
    "CSV_SPLITS", "LAYOUTS", "MANIFEST_NAME", "MAX_IMAGE_PIXELS", "MEDMNIST_LABELS", "META_COLUMNS", "MIN_IMAGE_SIDE",
    "SPLIT_FOLDER_NAMES", "ImageBatch", "ImageFiles", "Imported", "QuarantineRow", "decode_files", "decode_image",
    "detect_layout", "import_csv_split", "import_image_folder", "import_kmnist", "import_medmnist", "import_npz_file",
    "import_omniglot_npz", "import_omniglot_zips", "iter_chunks", "list_tree", "materialise", "medmnist_class_names",
]
