"""Invariants of seeded episode construction, rotation augmentation, mixed
sampling and fixed evaluation episode files (synthetic splits, no I/O but tmp)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import safe_open

import metatransfer.episodes.sampler as episodes_mod
from metatransfer.data.store import SplitData
from metatransfer.episodes import (
    EpisodeSampler,
    FixedEpisodes,
    MixedSampler,
    build_fixed_episodes,
    load_fixed_episodes,
    save_fixed_episodes,
    split_fingerprint,
)
from metatransfer.episodes.files import _ARRAYS, META_KEY
from metatransfer.errors import ConfigError, DataError, EpisodeError


def make_split(
    counts: list[int],
    side: int = 6,
    channels: int = 1,
    seed: int = 0,
    low: int = 0,
    high: int = 256,
    dataset: str = "toy",
    split: str = "meta_train",
) -> SplitData:
    """Random distinct uint8 images; class c has counts[c] images, classes interleaved."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    # Shuffle so that images of a class are not contiguous in the store.
    labels = labels[rng.permutation(labels.size)]
    images = rng.integers(low, high, size=(labels.size, channels, side, side), dtype=np.uint8)
    names = tuple(f"{dataset}/alpha/char{c:02d}" for c in range(len(counts)))
    return SplitData(dataset, split, images, labels, names)


def lookup(split: SplitData) -> dict[bytes, int]:
    """Map image bytes → index in the split (images are random, hence distinct)."""
    table = {split.images[i].tobytes(): i for i in range(split.images.shape[0])}
    assert len(table) == split.images.shape[0]
    return table


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Undo the /255 scaling exactly."""
    return (x * 255).round().to(torch.uint8).numpy()


def indices_of(x: torch.Tensor, table: dict[bytes, int]) -> list[int]:
    """Split indices of the (unrotated) images in x."""
    return [table[img.tobytes()] for img in to_uint8(x)]


def episodes_equal(a, b) -> bool:
    """Exact equality of two Episodes."""
    return (
        a.n_way == b.n_way
        and torch.equal(a.support_x, b.support_x)
        and torch.equal(a.query_x, b.query_x)
        and torch.equal(a.support_y, b.support_y)
        and torch.equal(a.query_y, b.query_y)
        and torch.equal(a.classes, b.classes)
    )


# ---------------------------------------------------------------- EpisodeSampler


def test_episode_shapes_labels_and_range() -> None:
    split = make_split([12] * 8)
    ep = EpisodeSampler(split, n_way=5, k_shot=3, n_query=4, seed=1).sample()
    assert ep.n_way == 5
    assert ep.support_x.shape == (15, 1, 6, 6) and ep.query_x.shape == (20, 1, 6, 6)
    assert ep.support_x.dtype == torch.float32 and ep.query_x.dtype == torch.float32
    assert ep.support_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert ep.query_y.tolist() == [w for w in range(5) for _ in range(4)]
    assert ep.support_y.dtype == torch.int64 and ep.classes.dtype == torch.int64
    lo = min(ep.support_x.min().item(), ep.query_x.min().item())
    hi = max(ep.support_x.max().item(), ep.query_x.max().item())
    assert 0.0 <= lo and hi <= 1.0


def test_episode_images_belong_to_their_way_and_are_disjoint() -> None:
    split = make_split([10, 7, 9, 12, 8, 10, 11])  # unequal class sizes: padding in use
    table = lookup(split)
    sampler = EpisodeSampler(split, n_way=4, k_shot=2, n_query=5, seed=3)
    for _ in range(50):
        ep = sampler.sample()
        classes = ep.classes.tolist()
        assert len(set(classes)) == 4
        assert all(0 <= c < 7 for c in classes)
        s_idx = indices_of(ep.support_x, table)
        q_idx = indices_of(ep.query_x, table)
        assert not set(s_idx) & set(q_idx)
        assert len(set(s_idx)) == 8 and len(set(q_idx)) == 20
        # Each image's true class is the class of the way its label names.
        assert split.labels[s_idx].tolist() == [classes[y] for y in ep.support_y.tolist()]
        assert split.labels[q_idx].tolist() == [classes[y] for y in ep.query_y.tolist()]


def test_smallest_class_can_be_used_whole_and_every_image_is_reachable() -> None:
    # Class 0 has exactly k+q = 4 images; class 1 has 9 (5 padding slots in class 0's row).
    split = make_split([4, 9])
    table = lookup(split)
    sampler = EpisodeSampler(split, n_way=2, k_shot=1, n_query=3, seed=0)
    seen: set[int] = set()
    for _ in range(200):
        ep = sampler.sample()
        idx = indices_of(ep.support_x, table) + indices_of(ep.query_x, table)
        assert len(set(idx)) == 8
        seen.update(idx)
    assert seen == set(range(13))


def test_same_seed_same_episodes_different_seed_differs() -> None:
    split = make_split([10] * 20)
    a = EpisodeSampler(split, 5, 1, 3, seed=7)
    b = EpisodeSampler(split, 5, 1, 3, seed=7)
    c = EpisodeSampler(split, 5, 1, 3, seed=8)
    eps_a = [a.sample() for _ in range(20)]
    eps_b = [b.sample() for _ in range(20)]
    eps_c = [c.sample() for _ in range(20)]
    assert all(episodes_equal(x, y) for x, y in zip(eps_a, eps_b, strict=True))
    assert sum(episodes_equal(x, y) for x, y in zip(eps_a, eps_c, strict=True)) == 0
    # Successive episodes of one sampler differ too.
    assert not episodes_equal(eps_a[0], eps_a[1])


def test_returned_labels_are_not_shared_between_episodes() -> None:
    sampler = EpisodeSampler(make_split([5] * 4), 2, 1, 1, seed=0)
    first = sampler.sample()
    first.support_y.add_(100)
    assert sampler.sample().support_y.tolist() == [0, 1]


@pytest.mark.parametrize("prerotate", [True, False])
def test_rotation_is_rot90_of_stored_image_and_ids_encode_it(
    prerotate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not prerotate:
        monkeypatch.setattr(episodes_mod, "PREROTATE_MAX_BYTES", 0)
    split = make_split([6] * 3)
    table = lookup(split)
    sampler = EpisodeSampler(split, n_way=12, k_shot=2, n_query=3, seed=5, rotation_augment=True)
    assert (sampler._rot_maps is None) == prerotate
    seen_rotations: set[int] = set()
    for _ in range(10):
        ep = sampler.sample()
        ids = ep.classes.tolist()
        # 3 classes x 4 rotations = 12 distinct ways, all used.
        assert sorted(ids) == list(range(12))
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            for img, way in zip(to_uint8(x), y.tolist(), strict=True):
                cls, rot = divmod(ids[way], 4)
                seen_rotations.add(rot)
                # Undo the rotation, find the stored image, check its class.
                stored = np.rot90(img, -rot, axes=(1, 2))
                i = table[np.ascontiguousarray(stored).tobytes()]
                assert split.labels[i] == cls
                expected = torch.rot90(torch.from_numpy(split.images[i]), rot, dims=(-2, -1))
                assert torch.equal(torch.from_numpy(img), expected)
    assert seen_rotations == {0, 1, 2, 3}


def test_rotation_paths_give_identical_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    split = make_split([8] * 10, channels=3)
    pre = EpisodeSampler(split, 5, 2, 3, seed=11, rotation_augment=True)
    monkeypatch.setattr(episodes_mod, "PREROTATE_MAX_BYTES", 0)
    gathered = EpisodeSampler(split, 5, 2, 3, seed=11, rotation_augment=True)
    for _ in range(10):
        assert episodes_equal(pre.sample(), gathered.sample())


def test_n_way_too_large_names_the_numbers() -> None:
    split = make_split([5] * 5, dataset="omniglot", split="meta_val")
    with pytest.raises(EpisodeError, match=r"omniglot/meta_val: n_way=6 .* only 5 classes"):
        EpisodeSampler(split, n_way=6, k_shot=1, n_query=1, seed=0)
    # With rotation the split offers 4x the classes: 20 works, 21 does not.
    EpisodeSampler(split, n_way=20, k_shot=1, n_query=1, seed=0, rotation_augment=True)
    with pytest.raises(EpisodeError, match=r"n_way=21 .* only 20 classes \(5 classes x 4 rotations\)"):
        EpisodeSampler(split, n_way=21, k_shot=1, n_query=1, seed=0, rotation_augment=True)


def test_too_few_images_names_class_count_and_request() -> None:
    split = make_split([9, 9, 6, 7], dataset="omniglot", split="meta_train")
    with pytest.raises(EpisodeError) as info:
        EpisodeSampler(split, n_way=2, k_shot=3, n_query=5, seed=0)
    msg = str(info.value)
    assert "omniglot/meta_train" in msg
    assert "'omniglot/alpha/char02' (index 2) has 6 images" in msg
    assert "k_shot=3 + n_query=5 = 8" in msg
    assert "2 of 4 classes have fewer than 8" in msg


def test_bad_requests_and_bad_splits() -> None:
    split = make_split([5] * 3)
    with pytest.raises(EpisodeError, match="k_shot must be an integer >= 1; got 0"):
        EpisodeSampler(split, 2, 0, 1, seed=0)
    with pytest.raises(EpisodeError, match="n_query must be an integer >= 0; got -1"):
        EpisodeSampler(split, 2, 1, -1, seed=0)
    with pytest.raises(EpisodeError, match="seed must be an integer >= 0; got -3"):
        EpisodeSampler(split, 2, 1, 1, seed=-3)
    wide = SplitData("toy", "train", np.zeros((15, 1, 4, 6), np.uint8), split.labels, split.class_names)
    with pytest.raises(EpisodeError, match="square images; found 4x6"):
        EpisodeSampler(wide, 2, 1, 1, seed=0, rotation_augment=True)
    bad_labels = split.labels.copy()
    bad_labels[4] = 3
    broken = SplitData("toy", "train", split.images, bad_labels, split.class_names)
    with pytest.raises(DataError, match=r"label of image 4 is 3, outside 0..2"):
        EpisodeSampler(broken, 2, 1, 1, seed=0)
    floats = SplitData("toy", "train", split.images.astype(np.float32), split.labels, split.class_names)
    with pytest.raises(DataError, match="uint8"):
        EpisodeSampler(floats, 2, 1, 1, seed=0)


def test_read_only_images_are_accepted_without_warning() -> None:
    split = make_split([5] * 3)
    images = split.images.copy()
    images.flags.writeable = False
    ro = SplitData("toy", "train", images, split.labels, split.class_names)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ep = EpisodeSampler(ro, 3, 1, 1, seed=0).sample()
    assert ep.support_x.shape == (3, 1, 6, 6)


# ---------------------------------------------------------------- MixedSampler


def two_domains() -> tuple[SplitData, SplitData]:
    """Domain A pixels in 0..99, domain B pixels in 156..255: each episode shows its origin."""
    a = make_split([6] * 6, seed=1, low=0, high=100, dataset="a")
    b = make_split([6] * 6, seed=2, low=156, high=256, dataset="b")
    return a, b


def test_mixed_sampler_respects_weights_and_one_domain_per_episode() -> None:
    a, b = two_domains()
    mixed = MixedSampler(
        [(EpisodeSampler(a, 3, 1, 1, seed=0), 0.999), (EpisodeSampler(b, 3, 1, 1, seed=0), 0.001)],
        seed=4,
    )
    n = 2000
    counts = [0, 0]
    for _ in range(n):
        domain, ep = mixed.sample_with_domain()
        counts[domain] += 1
        pixels = torch.cat([ep.support_x.flatten(), ep.query_x.flatten()]) * 255
        if domain == 0:
            assert pixels.max().item() < 100
        else:
            assert pixels.min().item() >= 156
    # Binomial(2000, 0.001): mean 2; P(X > 12) < 1e-6.
    assert counts[1] <= 12
    assert counts[0] + counts[1] == n

    balanced = MixedSampler(
        [(EpisodeSampler(a, 3, 1, 1, seed=0), 3.0), (EpisodeSampler(b, 3, 1, 1, seed=0), 1.0)],
        seed=9,
    )
    assert balanced.weights == [0.75, 0.25]
    n_b = sum(balanced.sample_with_domain()[0] for _ in range(n))
    sd = math.sqrt(n * 0.25 * 0.75)
    assert abs(n_b - n * 0.25) < 5 * sd


def test_mixed_sampler_zero_weight_never_chosen_and_seeded() -> None:
    a, b = two_domains()

    def build(seed: int) -> MixedSampler:
        return MixedSampler(
            [
                (EpisodeSampler(a, 2, 1, 1, seed=0), 0.0),
                (EpisodeSampler(b, 2, 1, 1, seed=0), 1.0),
                (EpisodeSampler(a, 2, 1, 1, seed=1), 1.0),
            ],
            seed=seed,
        )

    m1, m2 = build(3), build(3)
    d1 = [m1.sample_with_domain() for _ in range(300)]
    d2 = [m2.sample_with_domain() for _ in range(300)]
    assert 0 not in {d for d, _ in d1}
    assert [d for d, _ in d1] == [d for d, _ in d2]
    assert all(episodes_equal(x, y) for (_, x), (_, y) in zip(d1, d2, strict=True))
    assert {d for d, _ in d1} == {1, 2}


def test_mixed_sampler_bad_weights() -> None:
    a, _ = two_domains()
    s = EpisodeSampler(a, 2, 1, 1, seed=0)
    with pytest.raises(ConfigError, match=r"weight of domain 1 \(a/meta_train\) must be finite and >= 0; got -0.5"):
        MixedSampler([(s, 1.0), (s, -0.5)], seed=0)
    with pytest.raises(ConfigError, match="must not all be 0"):
        MixedSampler([(s, 0.0)], seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        MixedSampler([], seed=0)


# ---------------------------------------------------------------- fixed episodes


# sha256 of the file of build_fixed_episodes(make_split([8] * 10), 5, 1, 3, 25, seed=2): a change of the bytes (the
# writer, safetensors' header layout) changes every `dvc repro`'s episode files, so it must be seen here.
GOLDEN_SHA256 = "a05942c57c8d05bcbea68c8179f0f0097da452d8e5f1a8995a23e3d0fc53c957"


def test_fixed_episode_file_is_byte_identical_for_same_seed(tmp_path: Path) -> None:
    split = make_split([8] * 10)
    p1, p2, p3 = tmp_path / "a.safetensors", tmp_path / "sub" / "b.safetensors", tmp_path / "c.safetensors"
    save_fixed_episodes(build_fixed_episodes(split, 5, 1, 3, 25, seed=2), p1)
    save_fixed_episodes(build_fixed_episodes(split, 5, 1, 3, 25, seed=2), p2)
    save_fixed_episodes(build_fixed_episodes(split, 5, 1, 3, 25, seed=3), p3)
    assert p1.read_bytes() == p2.read_bytes()
    assert p1.read_bytes() != p3.read_bytes()
    # Written in an earlier process: safetensors orders a metadata map by hash, differently in every process,
    # so the metadata is one key of canonical JSON.
    assert hashlib.sha256(p1.read_bytes()).hexdigest() == GOLDEN_SHA256
    with safe_open(p1, framework="np") as f:
        assert list(f.metadata()) == [META_KEY] and sorted(f.keys()) == sorted(_ARRAYS)
        assert json.loads(f.metadata()[META_KEY])["seed"] == 2
    # Atomic write leaves no temporary file behind; the file is readable by all, like every other output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "c.safetensors", "sub"]
    assert p1.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("rotation", [True, False])
def test_fixed_episodes_round_trip_and_match_sampler(tmp_path: Path, rotation: bool) -> None:
    split = make_split([7, 8, 7, 9, 7, 7, 10, 7, 7], side=5)
    fe = build_fixed_episodes(split, 4, 2, 3, 12, seed=21, rotation_augment=rotation)
    path = save_fixed_episodes(fe, tmp_path / "eval.safetensors")
    loaded = load_fixed_episodes(path, split)
    assert isinstance(loaded, FixedEpisodes) and len(loaded) == 12
    for name in ("dataset", "split", "n_way", "k_shot", "n_query", "seed", "rotation_augment", "fingerprint"):
        assert getattr(loaded, name) == getattr(fe, name)
    assert (loaded.dataset, loaded.n_way, loaded.seed, loaded.rotation_augment) == ("toy", 4, 21, rotation)
    assert (loaded.rotations.max() > 0) == rotation
    for name in ("classes", "rotations", "support_idx", "query_idx"):
        assert np.array_equal(getattr(loaded, name), getattr(fe, name))
    assert loaded.support_idx.shape == (12, 8) and loaded.query_idx.shape == (12, 12)
    assert loaded.source == str(path)
    # Any safetensors reader reads the arrays too.
    assert np.array_equal(safetensors.numpy.load_file(path)["support_idx"], fe.support_idx)
    # Episode i is the i-th draw of a sampler with the same seed.
    sampler = EpisodeSampler(split, 4, 2, 3, seed=21, rotation_augment=rotation)
    for i, ep in enumerate(loaded.iter_episodes(split)):
        assert episodes_equal(ep, sampler.sample()), i
    assert episodes_equal(loaded.materialise(-1, split), loaded.materialise(11, split))
    with pytest.raises(IndexError, match="episode 12 out of range: the set has 12"):
        loaded.materialise(12, split)


def test_fixed_episodes_reject_changed_or_other_data(tmp_path: Path) -> None:
    split = make_split([6] * 5, dataset="omniglot", split="meta_test")
    path = save_fixed_episodes(build_fixed_episodes(split, 3, 1, 2, 4, seed=0), tmp_path / "e.safetensors")
    changed_images = split.images.copy()
    changed_images[0, 0, 0, 0] ^= 1
    changed = SplitData(split.dataset, split.split, changed_images, split.labels, split.class_names)
    with pytest.raises(EpisodeError) as info:
        load_fixed_episodes(path, changed)
    msg = str(info.value)
    assert str(path) in msg and "data changed" in msg and "`episodes` stage" in msg
    renamed = SplitData(split.dataset, split.split, split.images, split.labels, ("x",) + split.class_names[1:])
    fe = load_fixed_episodes(path)
    with pytest.raises(EpisodeError, match="data changed"):
        fe.materialise(0, renamed)
    other = SplitData("omniglot", "meta_val", split.images, split.labels, split.class_names)
    with pytest.raises(EpisodeError, match="built for omniglot/meta_test, not omniglot/meta_val"):
        fe.materialise(0, other)
    assert split_fingerprint(split) == fe.fingerprint != split_fingerprint(changed)


def test_load_fixed_episodes_missing_or_corrupt(tmp_path: Path) -> None:
    rerun = r"Re-run the `episodes` stage \(`dvc repro episodes`\)\.$"
    with pytest.raises(EpisodeError, match=rf"none.safetensors: no fixed episode file there\. {rerun}"):
        load_fixed_episodes(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(EpisodeError, match=rf"bad.safetensors: not a readable fixed episode file \(.*\)\. {rerun}"):
        load_fixed_episodes(bad)
    fe = build_fixed_episodes(make_split([6] * 4), 3, 1, 2, 4, seed=0)
    arrays = {name: getattr(fe, name) for name in _ARRAYS}
    meta = json.loads(safe_open(save_fixed_episodes(fe, tmp_path / "ok.safetensors"), "np").metadata()[META_KEY])
    cases = [  # (arrays, metadata, message)
        (arrays, {}, r"safetensors file without the 'metatransfer.fixed_episodes' metadata object"),
        ({k: v for k, v in arrays.items() if k != "rotations"}, {META_KEY: json.dumps(meta)},
         r"missing array\(s\) \['rotations'\] \(found \['classes', 'query_idx', 'support_idx'\]\)"),
        ({**arrays, "classes": fe.classes.astype(np.int32)}, {META_KEY: json.dumps(meta)},
         r"classes is int32 \(4, 3\), expected int64 \(4, 3\)"),
        (arrays, {META_KEY: json.dumps({**meta, "n_episodes": 5})},
         r"classes is int64 \(4, 3\), expected int64 \(5, 3\)"),
        (arrays, {META_KEY: json.dumps({k: v for k, v in meta.items() if k != "seed"})},
         r"metadata without \['seed'\]"),
        (arrays, {META_KEY: json.dumps({**meta, "format": "x/9"})},
         r"format 'x/9', expected 'metatransfer.fixed_episodes/1'"),
    ]
    for i, (stored, metadata, message) in enumerate(cases):
        path = tmp_path / f"case{i}.safetensors"
        safetensors.numpy.save_file(stored, path, metadata=metadata)
        with pytest.raises(EpisodeError, match=rf"^{re.escape(str(path))}: {message}\. {rerun}"):
            load_fixed_episodes(path)


def test_old_npz_episode_file_says_to_rerun_the_stage(tmp_path: Path) -> None:
    """Files written before safetensors (a zip of .npy arrays and meta.json) are refused with what to do."""
    old = tmp_path / "1shot.npz"
    with zipfile.ZipFile(old, "w") as zf:
        zf.writestr("meta.json", json.dumps({"format": "metatransfer.fixed_episodes/1"}))
    with pytest.raises(EpisodeError, match=r"1shot.npz: an episode file of the old format \(a zip of .npy arrays, "
                                           r"`<k>shot.npz`\); episode files are safetensors now "
                                           r"\(`<k>shot.safetensors`\)\. Re-run the `episodes` stage "
                                           r"\(`dvc repro episodes`\)\."):
        load_fixed_episodes(old)
    # The layout's new name, where only the old file is (`dvc repro` not yet run after the upgrade).
    with pytest.raises(EpisodeError, match=r"1shot.safetensors: no fixed episode file there \(an old-format 1shot.npz "
                                           r"is there: episode files are safetensors now\)\. Re-run"):
        load_fixed_episodes(tmp_path / "1shot.safetensors")


def test_build_fixed_episodes_rejects_bad_count() -> None:
    with pytest.raises(EpisodeError, match="n_episodes must be an integer >= 1; got 0"):
        build_fixed_episodes(make_split([4] * 3), 2, 1, 1, 0, seed=0)
