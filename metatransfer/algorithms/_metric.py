"""Helpers shared by the metric-based learners (ProtoNet, MatchingNet, RelationNet, TADAM).

They cover what every metric learner repeats: checking episode labels,
embedding a whole meta-batch in one backbone forward, class prototypes,
squared Euclidean distances, and running a module in eval mode without
losing the train/eval flag of any sub-module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms.base import Hparams, StepResult, episode_accuracy
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError, EpisodeError


def check_hparams(hparams: Hparams, expected: type[Hparams], algorithm: str) -> None:
    """Refuse hyper-parameters of the wrong class (e.g. MAML's given to ProtoNet).

    Args:
        hparams: what the caller passed.
        expected: the algorithm's `hparams_class`.
        algorithm: the algorithm's catalog name, for the message.

    Raises:
        ConfigError: `hparams` is not an instance of `expected`.
    """
    if not isinstance(hparams, expected):
        raise ConfigError(
            f"{algorithm}: hparams must be {expected.__name__}, found {type(hparams).__name__}; "
            f"build it with {expected.__name__}.from_mapping(...) or build_algorithm()"
        )


def check_labels(labels: torch.Tensor, n_way: int, where: str) -> None:
    """Check that support labels are 0..n_way-1 with every class present.

    A class without a support example would give a NaN prototype, so this is
    refused up front with a message instead of a NaN loss later.

    Args:
        labels: int64 support labels (S,).
        n_way: the number of classes the episode claims.
        where: what is being checked, for the message (e.g. "episode 2 support_y").

    Raises:
        EpisodeError: wrong dtype, shape, range, or a class with no example.
    """
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise EpisodeError(
            f"{where}: expected int64 labels of shape (S,), found {labels.dtype} {tuple(labels.shape)}"
        )
    if n_way < 1:
        raise EpisodeError(f"{where}: n_way must be >= 1, found {n_way}")
    if labels.numel() == 0:
        raise EpisodeError(
            f"{where}: the support set is empty; each of the {n_way} classes needs >= 1 example"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_way:
        raise EpisodeError(
            f"{where}: labels must lie in 0..{n_way - 1}, found range {low}..{high}; "
            "relabel the episode's classes to 0..n_way-1"
        )
    counts = torch.bincount(labels, minlength=n_way)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise EpisodeError(
            f"{where}: class(es) {missing} have no support example (n_way={n_way}); "
            "every class needs at least one labelled example"
        )


def module_device(module: nn.Module) -> torch.device:
    """Return the device of the module's first parameter (CPU for a module without any)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """Return the floating dtype of the module's first parameter (float32 without any)."""
    for param in module.parameters():
        return param.dtype
    return torch.float32


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put `module` in eval mode and restore every sub-module's own flag afterwards.

    `module.train(was_training)` would not do: a caller may have frozen some
    sub-modules in eval mode on purpose, and that must survive `adapt`.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Sum the embeddings of each class: (S, *F) with labels (S,) → (n_way, *F)."""
    out = embeddings.new_zeros((n_way, *embeddings.shape[1:]))
    return out.index_add(0, labels, embeddings)


def class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class prototypes (Snell et al. 2017, eq. 1): the mean embedding of each class.

    Args:
        embeddings: (S, *F) support embeddings.
        labels: (S,) labels in 0..n_way-1, every class present (see `check_labels`).
        n_way: number of classes.

    Returns:
        (n_way, *F) prototypes, row k the mean of the class-k embeddings.
    """
    counts = torch.bincount(labels, minlength=n_way).to(embeddings.dtype)
    shape = (n_way,) + (1,) * (embeddings.dim() - 1)
    return class_sums(embeddings, labels, n_way) / counts.view(shape)


def squared_distances(queries: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ||q - c||² between every query and prototype.

    Computed from the differences rather than ||q||² - 2q·c + ||c||², which
    cancels catastrophically when a query lies close to a prototype (the
    case that decides the arg-max); the (Q, N, D) difference tensor is small
    for few-shot episodes.

    Args:
        queries: (Q, D).
        prototypes: (N, D).

    Returns:
        (Q, N) distances.
    """
    return (queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


def embed_episodes(
    embed: Callable[[torch.Tensor], torch.Tensor],
    episodes: Sequence[Episode],
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Embed the support and query images of a whole meta-batch in ONE forward.

    One forward over every image keeps the step close to a plain backbone
    forward/backward (no per-episode Python loop over the backbone); with
    BatchNorm in train mode the batch statistics are those of the whole
    meta-batch (support and query together, the usual ProtoNet practice).

    Args:
        embed: images (B, C, H, W) → embeddings (B, ...).
        episodes: the meta-batch; all images must share (C, H, W).
        device, dtype: where and in which precision the model runs.

    Returns:
        One (support_embeddings, query_embeddings) pair per episode.

    Raises:
        EpisodeError: empty meta-batch, bad labels, or images of different shapes.
    """
    if not episodes:
        raise EpisodeError("meta_learn: the meta-batch is empty; pass at least one Episode")
    images: list[torch.Tensor] = []
    sizes: list[int] = []
    for i, ep in enumerate(episodes):
        check_labels(ep.support_y, ep.n_way, f"episode {i} support_y")
        if ep.query_y.numel() == 0:
            raise EpisodeError(f"episode {i}: the query set is empty; meta-training needs query images")
        if (int(ep.query_y.min()) < 0 or int(ep.query_y.max()) >= ep.n_way):
            raise EpisodeError(
                f"episode {i} query_y: labels must lie in 0..{ep.n_way - 1}, found "
                f"{int(ep.query_y.min())}..{int(ep.query_y.max())}"
            )
        if ep.support_x.shape[1:] != episodes[0].support_x.shape[1:] or (
            ep.query_x.shape[1:] != episodes[0].support_x.shape[1:]
        ):
            raise EpisodeError(
                f"episode {i}: image shape {tuple(ep.support_x.shape[1:])}/{tuple(ep.query_x.shape[1:])} "
                f"differs from episode 0's {tuple(episodes[0].support_x.shape[1:])}; "
                "a meta-batch must share one image size"
            )
        images += [ep.support_x, ep.query_x]
        sizes += [ep.support_x.shape[0], ep.query_x.shape[0]]
    batch = torch.cat(images).to(device=device, dtype=dtype)
    # Under bfloat16 autocast the backbone returns bfloat16; distances and
    # prototypes are computed back in the model's precision.
    parts = embed(batch).to(dtype).split(sizes)
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(episodes))]


def query_labels(episode: Episode, device: torch.device) -> torch.Tensor:
    """The episode's query labels on `device`."""
    return episode.query_y.to(device)


def cross_entropy_step(
    logits: Sequence[torch.Tensor], episodes: Sequence[Episode], extra_loss: torch.Tensor | None = None
) -> StepResult:
    """Back-propagate the meta-batch's mean query cross-entropy and report it.

    Args:
        logits: one (Q_i, N_i) query-logit tensor per episode.
        episodes: the episodes (for the query labels).
        extra_loss: a regulariser added to the back-propagated loss only
            (e.g. TADAM's L2 penalty); the reported loss stays the query loss.

    Returns:
        The mean query loss and accuracy over the meta-batch.
    """
    losses, accs = [], []
    for lg, ep in zip(logits, episodes):
        y = query_labels(ep, lg.device)
        losses.append(F.cross_entropy(lg, y))
        accs.append(episode_accuracy(lg.detach(), y))
    loss = torch.stack(losses).mean()
    total = loss if extra_loss is None else loss + extra_loss
    total.backward()
    return StepResult(loss=float(loss.detach()), acc=sum(accs) / len(accs))
