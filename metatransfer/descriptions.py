"""Task descriptions as data: a tokenizer, a hashing-trick vocabulary, token ids.

A dataset may carry a description in params.yaml (`prepare.descriptions.<dataset>`:
modality, anatomy, domain, free text). `prepare` stores it, with its tokens,
as `description.json` beside the dataset's prepared images; the conditional
meta-learner (`metatransfer.algorithms.conditional`) embeds its token ids.

No pretrained language model is involved (nothing is downloaded): words are
lower-cased alphanumeric runs; the words of the source descriptions form a
fixed-size vocabulary (built when meta-training starts from the descriptions
written at prepare time, and saved with the learner as word hashes), and any
other word, such as one that only a new target's description uses, falls in
one of `buckets` hash buckets (the hashing trick), so every description has
ids inside the embedding table, seen or not.

Id layout of a vocabulary with `size` known-word slots and `buckets` buckets:
0 is padding, 1 the learned "no description" token, 2..size+1 the known
words in vocabulary order, then the buckets. Everything here is a pure
function of its arguments (a stable BLAKE2b hash, not Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from metatransfer.errors import ConfigError

FIELDS = ("modality", "anatomy", "domain", "text")
"""The keys of a description, in the order their tokens are read."""

DESCRIPTION_FILE = "description.json"
"""Written by prepare into the dataset's prepared folder, only for a described dataset."""

PAD = 0
NO_DESCRIPTION = 1
RESERVED = 2  # ids below this are PAD and NO_DESCRIPTION

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric words of `text` ("Axial T1-weighted" → ["axial", "t1", "weighted"])."""
    return _WORD.findall(text.lower())


def description_tokens(description: Mapping[str, str] | None) -> list[str]:
    """The words of a description, field by field in `FIELDS` order (empty for None).

    Raises:
        ConfigError: a key outside `FIELDS` or a value that is not a string.
    """
    if description is None:
        return []
    check_description(description, "description")
    return [w for key in FIELDS for w in tokenize(description.get(key, ""))]


def check_description(description: Mapping[str, str], where: str) -> None:
    """Refuse unknown keys, non-string values and a description without any word.

    Args:
        description: the mapping (e.g. `{modality: MRI, anatomy: brain}`).
        where: the params key, for messages (e.g. "prepare.descriptions.brain_tumor_mri").

    Raises:
        ConfigError: naming the key, what was expected and what was found.
    """
    unknown = sorted(set(description) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {list(FIELDS)}")
    for key, value in description.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string, found {type(value).__name__} ({value!r})")
    if not any(tokenize(description.get(key, "")) for key in FIELDS):
        raise ConfigError(f"{where}: the description has no word (letters or digits) in any of {list(FIELDS)}; "
                          "give at least one, or remove the entry")


def word_hash(word: str) -> int:
    """A stable non-negative 63-bit hash of a word (same value on every machine and run)."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Vocabulary:
    """Known words (as `word_hash` values) plus hash buckets for every other word.

    Attributes:
        hashes: hash of each known word, in id order (at most `size`).
        size: known-word slots (fixes the embedding table, whatever the number of words).
        buckets: hash buckets for words outside the vocabulary, >= 1.
    """

    hashes: tuple[int, ...]
    size: int
    buckets: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.buckets < 1:
            raise ConfigError(f"vocabulary: size and buckets must be >= 1, found {self.size} and {self.buckets}")
        if len(self.hashes) > self.size:
            raise ConfigError(f"vocabulary: {len(self.hashes)} words do not fit in {self.size} slots")

    @property
    def n_ids(self) -> int:
        """Rows of the embedding table: padding, no-description, the known slots and the buckets."""
        return RESERVED + self.size + self.buckets

    def word_id(self, word: str) -> int:
        """The id of one word: its slot when known, else its hash bucket."""
        h = word_hash(word)
        index = {v: i for i, v in enumerate(self.hashes)}.get(h)
        return RESERVED + index if index is not None else RESERVED + self.size + h % self.buckets

    def encode(self, description: Mapping[str, str] | None, max_tokens: int) -> list[int]:
        """Token ids of a description, at most `max_tokens`; `[NO_DESCRIPTION]` for None or no word."""
        index = {v: i for i, v in enumerate(self.hashes)}
        ids = []
        for word in description_tokens(description)[:max_tokens]:
            h = word_hash(word)
            i = index.get(h)
            ids.append(RESERVED + i if i is not None else RESERVED + self.size + h % self.buckets)
        return ids or [NO_DESCRIPTION]


def build_vocabulary(descriptions: Iterable[Mapping[str, str] | None], size: int, buckets: int) -> Vocabulary:
    """The vocabulary of some descriptions: their most frequent words (ties: alphabetical), at most `size`.

    Args:
        descriptions: e.g. the source datasets' descriptions (None entries are skipped).
        size: known-word slots.
        buckets: hash buckets for the rest.

    Returns:
        The `Vocabulary`; words beyond `size` are left to the buckets.
    """
    counts = Counter(w for d in descriptions for w in description_tokens(d))
    words = sorted(counts, key=lambda w: (-counts[w], w))[:size]
    return Vocabulary(tuple(word_hash(w) for w in words), size, buckets)


def write_description(folder: Path, description: Mapping[str, str]) -> Path:
    """Write `description.json` (the non-empty fields and their tokens) into a prepared dataset folder.

    Byte-for-byte deterministic (sorted keys, fixed indent).
    """
    kept = {k: description[k] for k in FIELDS if description.get(k)}
    doc = {"description": kept, "tokens": description_tokens(kept)}
    path = Path(folder) / DESCRIPTION_FILE
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


def read_description(folder: Path) -> dict[str, str] | None:
    """The description stored in a prepared dataset folder, or None when it has none.

    Raises:
        ConfigError: the file exists but is not a description written by `write_description`.
    """
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        description = doc["description"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a description file ({exc}); re-run prepare") from None
    check_description(description, str(path))
    return dict(description)
