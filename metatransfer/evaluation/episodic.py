"""Per-episode evaluation of a learner: adapt on the support, score the queries."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from metatransfer.algorithms.base import MetaLearner
from metatransfer.episodes import Episode


def episode_accuracies(
    learner: MetaLearner,
    episodes: Iterable[Episode],
    on_episode: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """Accuracy on the queries of each episode after adapting on its support.

    Transductive learners also receive the (unlabelled) query images, as in
    their papers; all others see only the support set.

    Args:
        learner: any MetaLearner (left in the mode it was in).
        episodes: fixed episodes, evaluated in order.
        on_episode: optional callback(index, accuracy), e.g. a progress bar.

    Returns:
        float64 array, one accuracy in [0, 1] per episode.
    """
    was_training = learner.training
    learner.eval()
    out: list[float] = []
    try:
        for i, ep in enumerate(episodes):
            unlabeled = ep.query_x if learner.transductive else None
            predictor = learner.adapt(ep.support_x, ep.support_y, ep.n_way, unlabeled_x=unlabeled)
            with torch.no_grad():
                logits = predictor(ep.query_x)
            acc = (logits.argmax(dim=1) == ep.query_y).double().mean().item()
            out.append(acc)
            if on_episode is not None:
                on_episode(i, acc)
    finally:
        learner.train(was_training)
    return np.asarray(out, dtype=np.float64)
