"""Image bounds and the link policy of the image-folder importers (issue 17, item 4).

Every image here is a real file written by the test: a 1x1 PNG, a thin strip, a
valid 13000x13000 PNG streamed row by row (170 KB on disk, 169 Mpx declared,
never allocated), links leaving the tree. Each must be quarantined with its
reason while the valid images still go in.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from metatransfer.config import ImageFolderParams, PrepareParams
from metatransfer.data import importers as imp
from metatransfer.data import prepare as prep
from metatransfer.data.importers import decode
from metatransfer.data.store import load_manifest


def _png(path: Path, size: tuple[int, int] = (40, 30), value: int = 0) -> Path:
    """A random RGB PNG of `size` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return path


def _huge_png(path: Path, side: int) -> Path:
    """A valid all-black greyscale PNG of side x side, written one row at a time (no side*side buffer)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte 0 + side grey pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _reasons(data: imp.Imported) -> dict[str, str]:
    return {Path(q.source_path).name: q.reason for q in data.quarantine}


def _names(data: imp.Imported) -> list[str]:
    return sorted(Path(s).name for s in data.meta["source_path"])


# --------------------------------------------------------------------------- size bounds
def test_tiny_images_quarantined_as_too_small_and_valid_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _png(root / "cat/ok.png")
    _png(root / "cat/dot.png", size=(1, 1), value=1)
    _png(root / "dog/strip.png", size=(100, imp.MIN_IMAGE_SIDE - 1), value=2)
    _png(root / "dog/edge.png", size=(imp.MIN_IMAGE_SIDE, imp.MIN_IMAGE_SIDE), value=3)  # at the bound: kept
    data = imp.materialise(imp.import_image_folder(root, "t"))
    reasons = _reasons(data)
    assert reasons["dot.png"].startswith("too small: 1x1 pixels, a side below 8 px (MIN_IMAGE_SIDE)")
    assert reasons["strip.png"].startswith("too small: 100x7 pixels")
    assert _names(data) == ["edge.png", "ok.png"]


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    _png(root / "a/big.png", size=(50, 40))  # 2000 px
    _png(root / "a/fits.png", size=(40, 25), value=1)  # 1000 px: at the limit, kept
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):  # records which files get their pixels decoded
        loaded.append(Path(self.filename).name)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = imp.materialise(imp.import_image_folder(root, "t"))
    assert _reasons(data)["big.png"].startswith("too large: 50x40 = 2,000 pixels, over the limit of 1,000 "
                                                "(MAX_IMAGE_PIXELS); not decoded")
    assert _names(data) == ["fits.png"]
    assert "big.png" not in loaded and "fits.png" in loaded


def test_real_13000px_png_is_quarantined_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe's file: PIL only warns below 179 Mpx and the importer decoded it (0.5 GB per image)
    root = tmp_path / "tree"
    bomb = _huge_png(root / "a/bomb.png", 13000)
    assert bomb.stat().st_size < 1_000_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(bomb) as im:  # well-formed: 13000x13000
        assert im.size == (13000, 13000)
    _png(root / "a/ok.png")
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(Path(self.filename).name)
                        or real_load(self))
    data = imp.materialise(imp.import_image_folder(root, "t"))
    # PIL's guard (a warning, an error here) fires in Image.open, before the header check
    assert _reasons(data)["bomb.png"].startswith("too large: Image size (169000000 pixels) exceeds limit")
    limit = f"not decoded (the limit here is {decode.MAX_IMAGE_PIXELS:,} pixels, MAX_IMAGE_PIXELS)"
    assert limit in _reasons(data)["bomb.png"]
    assert _names(data) == ["ok.png"] and "bomb.png" not in loaded


def test_decompression_bomb_warning_is_an_error_while_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # with our own limit out of the way, PIL's warning zone (89..179 Mpx by default) must still refuse the file
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 10**12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # warn above 1500 px, error above 3000
    warn = _png(tmp_path / "warn.png", size=(50, 40))  # 2000 px: PIL would only warn
    error = _png(tmp_path / "error.png", size=(80, 40), value=1)  # 3200 px: PIL's own error
    ok = _png(tmp_path / "ok.png", size=(30, 30), value=2)
    got = imp.decode_files([warn, error, ok], workers=1)
    assert isinstance(got[0], str) and got[0].startswith("too large: ") and "2000 pixels" in got[0]
    assert isinstance(got[1], str) and got[1].startswith("too large: ") and "3200 pixels" in got[1]
    assert not isinstance(got[2], str) and got[2][0].shape == (30, 30, 3)


# --------------------------------------------------------------------------- links
def test_links_leaving_the_folder_are_quarantined(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    secret = _png(outside / "secret.png", value=9)
    _png(outside / "more/x.png", value=8)
    root = tmp_path / "tree"
    _png(root / "cat/ok.png")
    _png(root / "dog/ok2.png", value=1)
    (root / "cat/escape.png").symlink_to(secret)
    (root / "cat/up.png").symlink_to(Path("../../elsewhere/secret.png"))  # relative link leading out
    (root / "cat/inside.png").symlink_to(root / "dog/ok2.png")  # stays in the tree: a file like any other
    (root / "cat/dangling.png").symlink_to(root / "cat/gone.png")
    (root / "more").symlink_to(outside / "more", target_is_directory=True)  # a class folder leading out
    (root / "dog/again").symlink_to(root / "cat", target_is_directory=True)  # a folder link inside the tree
    data = imp.materialise(imp.import_image_folder(root, "t"))
    reasons = _reasons(data)
    assert reasons["escape.png"].startswith(f"link leaves the dataset folder: it points to {secret.resolve()}")
    assert reasons["up.png"].startswith("link leaves the dataset folder")
    assert reasons["more"].startswith("link leaves the dataset folder")
    assert reasons["dangling.png"].startswith("broken link")
    assert reasons["again"].startswith("link to a folder (cat) inside the tree is not followed")
    assert _names(data) == ["inside.png", "ok.png", "ok2.png"]
    assert sorted(data.class_order) == ["t/cat", "t/dog"]  # the linked folder is no class
    assert "x.png" not in reasons and not any("secret" in s for s in data.meta["source_path"])


def test_dataset_root_given_as_a_link_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _png(real / "cat/a.png")
    _png(real / "dog/b.png", value=1)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    data = imp.import_image_folder(tmp_path / "alias", "t")
    assert (len(data.meta), data.quarantine, data.layout) == (2, [], "class")


def test_csv_row_naming_a_file_outside_the_folder_is_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "mini"
    for i, wnid in enumerate(("n01", "n02", "n03")):
        _png(root / "images" / f"{wnid}_0.png", value=i)
    secret = _png(tmp_path / "secret.png", value=7)
    (root / "images/n01_link.png").symlink_to(secret)
    (root / "train.csv").write_text("filename,label\nn01_0.png,n01\n../../secret.png,n01\nn01_link.png,n01\n")
    (root / "val.csv").write_text("filename,label\nn02_0.png,n02\n")
    (root / "test.csv").write_text(f"filename,label\nn03_0.png,n03\n{secret},n03\n")
    data = imp.import_csv_split(root, "mini")
    reasons = {q.source_path: q.reason for q in data.quarantine}
    assert reasons["images/../../secret.png"].startswith("train.csv line 3: the file lies outside the dataset folder")
    assert reasons["images/n01_link.png"].startswith("train.csv line 4: the file lies outside the dataset folder")
    assert reasons[f"images/{secret}"].startswith("test.csv line 3: the file lies outside")
    assert len(reasons) == 3  # the refused link is not quarantined a second time as "not listed"
    assert data.meta["source_path"].tolist() == ["images/n01_0.png", "images/n02_0.png", "images/n03_0.png"]


# --------------------------------------------------------------------------- through prepare
def test_prepare_keeps_bad_images_out_of_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "clinic"
    for cls in ("a", "b"):
        for i in range(4):
            _png(root / cls / f"{i}.png", value=10 * ord(cls) + i)
    _png(root / "a/dot.png", size=(1, 1), value=99)
    _huge_png(root / "b/bomb.png", 13000)
    (root / "b/escape.png").symlink_to(_png(tmp_path / "outside.png", value=98))
    p = PrepareParams(image_size=16, channels=3, omniglot_protocol="background_evaluation", meta_val_classes=0,
                      image_folders={"clinic": ImageFolderParams(str(root), "target", (0.5, 0.25, 0.25))})
    report = prep.prepare(p, ("clinic",), tmp_path / "raw", tmp_path / "out", seed=0)
    m = load_manifest(tmp_path / "out", "clinic")
    assert sorted(Path(s).name for s in m["source_path"]) == sorted(f"{i}.png" for i in range(4) for _ in "ab")
    q = pd.read_csv(tmp_path / "out/quarantine.csv")
    got = {Path(s).name: r.split(":")[0] for s, r in zip(q["source_path"], q["reason"])}
    assert got == {"dot.png": "too small", "bomb.png": "too large", "escape.png": "link leaves the dataset folder"}
    assert report.quarantined == 3 and int(m["orig_height"].min()) == 30
