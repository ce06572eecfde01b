"""`episodes` stage: fixed evaluation episode files, so every method is compared
on identical episodes (`data/episodes/<set>/<k>shot.safetensors`)."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

from metatransfer.config import EpisodesParams
from metatransfer.data.store import load_split
from metatransfer.episodes import build_fixed_episodes, save_fixed_episodes, small_classes
from metatransfer.layout import Layout, episode_path

log = logging.getLogger(__name__)


def build_episode_files(params: EpisodesParams, prepared_dir: Path, out_dir: Path, seed: int) -> list[Path]:
    """Write every configured set x shot to `out_dir` (replaced atomically as a whole).

    Each file's seed is derived from the global seed, the set name and the shot
    count, so adding a set does not change the episodes of the others.

    A set with `min_images_per_class` never draws the split's classes with
    fewer images: one WARNING line lists them (name and images) and each of
    the set's files records them in its metadata (`excluded_classes`).

    Raises:
        EpisodeError: a set's minimum leaves fewer than n_way classes (naming
            `episodes.sets.<set>.min_images_per_class`), or a shape the split
            cannot meet.
    """
    import zlib

    tmp = Path(tempfile.mkdtemp(prefix=".episodes.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the published folder should be readable
    written = []
    try:
        for name, s in params.sets.items():
            split = load_split(prepared_dir, s.dataset, s.split)
            key = f"episodes.sets.{name}.min_images_per_class"
            excluded = small_classes(split, s.min_images_per_class)
            if excluded:
                log.warning("%s: %d of %d classes of %s/%s have fewer than %d images and are excluded: %s",
                            key, len(excluded), len(split.class_names), s.dataset, s.split, s.min_images_per_class,
                            ", ".join(f"{c} ({n})" for c, n in excluded.items()))
            for k in s.shots:
                set_seed = (seed * 1_000_003 + zlib.crc32(f"{name}/{k}".encode())) % (2**31)
                fe = build_fixed_episodes(split, s.n_way, k, s.n_query, s.n_episodes, set_seed,
                                          min_images_per_class=s.min_images_per_class, key=key)
                path = episode_path(tmp, name, k)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_fixed_episodes(fe, path)
                written.append(episode_path(out_dir, name, k))
                log.info("%s: %d episodes %d-way %d-shot %d-query from %s/%s", name, s.n_episodes, s.n_way, k, s.n_query, s.dataset, s.split)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry: `python -m metatransfer.stages.episodes [--params params.yaml]`."""
    from metatransfer.stages.common import run_stage

    def body(params, root: Path) -> None:
        from metatransfer import preflight

        preflight.check(params, root)  # every set's N-way and K+Q against the data, before writing any
        layout = Layout.of(root, params)
        out = layout.episodes_dir
        out.parent.mkdir(parents=True, exist_ok=True)
        files = build_episode_files(params.episodes, layout.prepared_dir, out, params.seed)
        log.info("wrote %d episode files under %s", len(files), out)

    return run_stage("episodes", argv, body)


if __name__ == "__main__":
    sys.exit(main())
