"""The guard stages: `check_params` (validation before DVC removes outputs) and
`image_folders` (a manifest per user folder, so DVC sees folder edits)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from metatransfer.config import params_from_mapping
from metatransfer.errors import ConfigError
from metatransfer.stages import check_params, image_folders

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _with_folders(raw: dict, **paths: str):
    raw = copy.deepcopy(raw)
    raw["prepare"]["image_folders"] = {n: {"path": p, "role": "target", "split_fractions": [0.6, 0.2, 0.2]}
                                       for n, p in paths.items()}
    return params_from_mapping(raw)


def test_check_params_writes_the_same_bytes_for_any_valid_params(tmp_path: Path, raw: dict) -> None:
    (tmp_path / "mine").mkdir()
    check_params.run(params_from_mapping(raw), tmp_path)
    first = (tmp_path / check_params.OUT).read_bytes()
    check_params.run(_with_folders(raw, mine="mine"), tmp_path)
    assert (tmp_path / check_params.OUT).read_bytes() == first
    assert sorted(p.name for p in (tmp_path / check_params.OUT).parent.iterdir()) == ["params.ok"]  # no temp file


def test_missing_or_file_image_folder_named_with_its_key(tmp_path: Path, raw: dict) -> None:
    with pytest.raises(ConfigError, match=r"prepare\.image_folders\.mine\.path: 'no/such' does not exist \(.*no/such; "
                                          r"a relative path is relative to the project root\)"):
        check_params.run(_with_folders(raw, mine="no/such"), tmp_path)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"prepare\.image_folders\.mine\.path: 'f\.png' is not a folder"):
        check_params.run(_with_folders(raw, mine="f.png"), tmp_path)
    assert not (tmp_path / check_params.OUT).exists()


def test_manifests_of_removed_entries_are_deleted(tmp_path: Path, raw: dict) -> None:
    folder = tmp_path / check_params.MANIFEST_DIR
    folder.mkdir(parents=True)
    for name in ("kept", "gone"):
        (folder / f"{name}.json").write_text("{}")
    (tmp_path / "kept").mkdir()
    removed = check_params.remove_stale_manifests(_with_folders(raw, kept="kept"), tmp_path)
    assert removed == [folder / "gone.json"] and sorted(p.name for p in folder.iterdir()) == ["kept.json"]


def test_manifest_lists_path_size_sha256_and_links(tmp_path: Path, raw: dict) -> None:
    root = tmp_path / "mine"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b" / "2.png").write_bytes(b"two")
    (root / "a" / "1.png").write_bytes(b"one")
    (root / "a" / "link.png").symlink_to(root / "b" / "2.png")
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)  # not followed
    (root / "a" / "broken.png").symlink_to(root / "nowhere")
    rows = image_folders.folder_manifest(root)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert rows == [["a/1.png", 3, sha(b"one")], ["a/broken.png", "link", str(root / "nowhere")],
                    ["a/link.png", 3, sha(b"two")], ["b/2.png", 3, sha(b"two")], ["dirlink", "link", str(tmp_path)]]
    out = image_folders.run("mine", _with_folders(raw, mine="mine"), tmp_path)
    doc = json.loads(out.read_text())
    assert doc == {"dataset": "mine", "files": rows}
    before = out.read_bytes()
    os.utime(root / "a" / "1.png", (1, 1))  # a new mtime, same content: the same manifest bytes
    image_folders.run("mine", _with_folders(raw, mine="mine"), tmp_path)
    assert out.read_bytes() == before
    (root / "a" / "1.png").write_bytes(b"ONE")
    image_folders.run("mine", _with_folders(raw, mine="mine"), tmp_path)
    assert out.read_bytes() != before


def test_image_folders_entry_refuses_an_unknown_name(tmp_path: Path, raw: dict) -> None:
    with pytest.raises(ConfigError, match=r"prepare\.image_folders has no entry 'other' \(entries: \[\]\)"):
        image_folders.run("other", params_from_mapping(raw), tmp_path)
