"""Seeded N-way K-shot Q-query episode construction.

The `Episode` container is the contract every algorithm uses. Below it:

- `EpisodeSampler`: seeded, vectorised episodes from one preloaded split,
  optionally with the Omniglot rotation augmentation (4x classes).
- `MixedSampler`: episodes from several domains, one domain per episode,
  chosen by weight.
- `build_fixed_episodes` / `save_fixed_episodes` / `load_fixed_episodes`:
  fixed evaluation sets stored as indices plus a fingerprint of the split,
  written byte-for-byte deterministically.
"""

from metatransfer.episodes.episode import N_ROTATIONS, Episode
from metatransfer.episodes.files import FIXED_FORMAT, load_fixed_episodes, save_fixed_episodes
from metatransfer.episodes.fixed import FixedEpisodes, build_fixed_episodes, split_fingerprint
from metatransfer.episodes.mixed import MixedSampler
from metatransfer.episodes.sampler import (
    PREROTATE_MAX_BYTES,  # a copy: patch metatransfer.episodes.sampler to change the budget
    EpisodeSampler,
    kept_classes,
    small_classes,
)

__all__ = [
    "FIXED_FORMAT", "N_ROTATIONS", "PREROTATE_MAX_BYTES", "Episode", "EpisodeSampler", "FixedEpisodes", "MixedSampler",
    "build_fixed_episodes", "kept_classes", "load_fixed_episodes", "save_fixed_episodes", "small_classes",
    "split_fingerprint",
]
