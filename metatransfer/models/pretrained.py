"""External pre-trained backbone weights (`model.pretrained: {path, sha256}`).

A user with a connected machine converts published weights (for example
torchvision's ImageNet ResNet-18, docs/models.md) to a safetensors file and
copies it beside the project; nothing is downloaded at run time. Loading
verifies the file's SHA-256 first, reads it with `safetensors.torch.load_file`
(never pickle: a checkpoint from elsewhere must not be able to run code) and
then checks every key and shape against the backbone, reporting all problems
at once so a user fixes the file in one go.

Accepted differences, each logged:
- `fc.*` (an ImageNet classifier head) is ignored: the backbones here end at
  the features.
- BatchNorm running statistics (`running_mean`, `running_var`,
  `num_batches_tracked`) are ignored when the backbone normalises with
  per-batch statistics (`track_running_stats=False`, the MAML family): it has
  nowhere to put them and would not use them.
- A missing `num_batches_tracked` (some exporters drop it) keeps the
  backbone's own counter: it only matters for BatchNorm with momentum=None.
- A 4-D weight stored for 3 input channels where the backbone has 1 (the
  stem convolution of an RGB model loaded into a grey backbone) is summed
  over its input channels: on a grey image x, conv(W, [x, x, x]) =
  conv(W_r + W_g + W_b, x), so the grey backbone computes what the RGB
  weights compute on the image replicated to three channels.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from metatransfer.errors import ConfigError

log = logging.getLogger(__name__)

IGNORED_PREFIXES = ("fc.",)
BN_STATS_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_MAX_LISTED = 20  # keys listed per problem kind; the count says how many more


class PretrainedWeightsError(ConfigError):
    """A `model.pretrained` file is missing, altered, unreadable or does not fit the backbone."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's initial weights come from.

    Attributes:
        path: a safetensors file; relative paths are relative to the project
            root (the folder of params.yaml), passed as `root` when loading.
        sha256: its expected SHA-256 (64 hex digits).
    """

    path: str
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks (weights files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """Return `path` as given when absolute, else joined to `root` (the project root; cwd when None)."""
    p = Path(path).expanduser()
    if p.is_absolute() or root is None:
        return p
    return Path(root) / p


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _fit_state(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], file: Path
) -> dict[str, torch.Tensor]:
    """Match a loaded state dict to the backbone's, applying the accepted differences.

    Raises:
        PretrainedWeightsError: listing every missing, unexpected and mis-shaped key.
    """
    ignored = sorted(k for k in found if k.startswith(IGNORED_PREFIXES))
    if ignored:
        log.debug("%s: ignoring %d classifier tensor(s) %s (the backbone ends at the features)",
                  file, len(ignored), ignored)
    state = {k: v for k, v in found.items() if not k.startswith(IGNORED_PREFIXES)}

    # BatchNorm statistics of layers that normalise per batch have no home here.
    untracked = sorted(
        k for k in state
        if k not in expected and k.endswith(BN_STATS_SUFFIXES)
        and k.rsplit(".", 1)[0] + ".weight" in expected
    )
    if untracked:
        log.debug("%s: ignoring %d BatchNorm running-statistics tensor(s): the backbone uses "
                  "per-batch statistics (track_running_stats=False)", file, len(untracked))
        for k in untracked:
            del state[k]

    missing = sorted(k for k in expected if k not in state)
    counters = [k for k in missing if k.endswith(".num_batches_tracked")]
    for k in counters:
        state[k] = expected[k]
    missing = [k for k in missing if k not in counters]
    unexpected = sorted(k for k in state if k not in expected)

    mismatched = []
    for k in sorted(set(state) & set(expected)):
        want, have = tuple(expected[k].shape), tuple(state[k].shape)
        if want == have:
            continue
        if len(want) == 4 and want[1] == 1 and have[1] == 3 and (want[0], *want[2:]) == (have[0], *have[2:]):
            log.info("%s: %s stored for 3 input channels, backbone has 1: summing over RGB", file, k)
            state[k] = state[k].sum(dim=1, keepdim=True)
            continue
        mismatched.append(f"{k} (expected {list(want)}, found {list(have)})")

    problems = []
    if missing:
        problems.append(f"missing key(s) {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_listed(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listed(mismatched)}")
    if problems:
        raise PretrainedWeightsError(
            f"model.pretrained.path: {file} does not fit the backbone: " + "; ".join(problems)
            + ". Check model.name / model.stem / prepare.channels against the weights, or convert "
            "the right checkpoint (docs/models.md)"
        )
    return state


def load_pretrained(
    backbone: nn.Module, path: str | Path, sha256: str, root: str | Path | None = None
) -> None:
    """Verify a safetensors weights file and load it into `backbone` in place.

    Args:
        backbone: a backbone from `build_backbone` (any module whose
            state-dict keys the file uses).
        path: the safetensors file; relative to `root` unless absolute.
        sha256: its expected SHA-256 (hex, case-insensitive).
        root: the project root (the folder of params.yaml); None: the
            current directory.

    Raises:
        PretrainedWeightsError (a ConfigError): the file is missing, its
            checksum differs (both hashes named), it is not a safetensors
            file, or keys are missing, unexpected or of another shape (each
            key named with the expected and found shape).
    """
    file = resolve_path(path, root)
    if not file.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained.path: {file}: file not found. Nothing is downloaded at run time: "
            "convert the weights on a connected machine (docs/models.md), copy the file here "
            "and set model.pretrained.path (relative to the folder of params.yaml)"
        )
    found_hash = sha256_file(file)
    if found_hash != sha256.strip().lower():
        raise PretrainedWeightsError(
            f"model.pretrained.sha256: {file}: checksum mismatch: expected {sha256}, found {found_hash}. "
            "The file is not the one params.yaml names: copy the right file, or, if this file is "
            f"the one you mean to use, set model.pretrained.sha256 to {found_hash}"
        )
    try:
        weights = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise PretrainedWeightsError(
            f"model.pretrained.path: {file}: not a readable safetensors file ({exc}). Save the "
            "weights with safetensors.torch.save_file (docs/models.md); pickled .pth files are refused"
        ) from None
    state = _fit_state(backbone.state_dict(), weights, file)
    backbone.load_state_dict(state, strict=True)
    log.info("loaded %d pre-trained tensors from %s (sha256 %s)", len(state), file, found_hash)
