"""Matching Networks.

Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra (2016), "Matching
Networks for One Shot Learning", NeurIPS 2016, https://arxiv.org/abs/1606.04080.

A query x̂ is classified by attention over the support set:
p(y = k | x̂, S) = Σ_i a(x̂, x_i) [y_i = k], with a = softmax over i of the
cosine similarity c(f(x̂), g(x_i)) (paper eq. 1-2). Training minimises the
negative log of that probability on the queries. The predictor's logits are
log p (already normalised: softmax(logits) = p).

Full context embeddings (FCE, paper section 2.1.2, `fce: true`): g is a
bidirectional LSTM over the support embeddings with a skip connection,
g(x_i) = h→_i + h←_i + g'(x_i); f is an attention LSTM run for `fce_steps`
steps, ĥ_k, c_k = LSTM(f'(x̂), [h_{k-1}, r_{k-1}], c_{k-1}),
h_k = ĥ_k + f'(x̂), r_{k-1} = Σ_i softmax_i(h_{k-1}ᵀ g(x_i)) g(x_i), and
f(x̂, S) = h_K (h_0 = 0, c_0 = 0). The LSTM's recurrent input is the
concatenation [h, r] (2D wide) as in the paper, so the cell is written out
rather than taken from `nn.LSTMCell` (which needs input width = hidden width).

BatchNorm keeps running statistics (`track_running_stats = True`): one
training forward holds every support and query image of the meta-batch;
`adapt` runs in eval mode with the running averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult
from metatransfer.config import Bool, Int, bounded
from metatransfer.episodes import Episode
from metatransfer.models import BackboneSpec


class MatchingNetHparams(Hparams):
    """Matching Networks hyper-parameters.

    Attributes:
        fce: use full context embeddings (paper section 2.1.2); off by default
            (plain cosine attention over the backbone embeddings).
        fce_steps: processing steps K of the attention LSTM (used when fce;
            the paper does not fix K, 5 is our choice).
    """

    error_where: ClassVar[str] = "meta_train.hparams.matchingnet"
    fce: Bool = False
    fce_steps: Int = bounded(5, ge=1)


class FullContextEmbedding(nn.Module):
    """The paper's g (bidirectional LSTM) and f (attention LSTM) over backbone embeddings.

    Args:
        dim: embedding width D.
        steps: processing steps K of the attention LSTM.
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.dim = dim
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        # Attention-LSTM gates: W_x f'(x̂) + W_h [h, r] + b, in the (i, f, g, o) order.
        self.query_input = nn.Linear(dim, 4 * dim)
        self.query_hidden = nn.Linear(2 * dim, 4 * dim, bias=False)

    def embed_support(self, support: torch.Tensor) -> torch.Tensor:
        """g(x_i, S) = g'(x_i) + h→_i + h←_i over the support sequence (S, D) → (S, D)."""
        out, _ = self.support_lstm(support.unsqueeze(0))
        forward, backward = out[0, :, : self.dim], out[0, :, self.dim :]
        return support + forward + backward

    def embed_query(self, query: torch.Tensor, support_g: torch.Tensor) -> torch.Tensor:
        """f(x̂, S) = h_K of the attention LSTM: queries (Q, D), g(S) (S, D) → (Q, D)."""
        h = torch.zeros_like(query)
        c = torch.zeros_like(query)
        from_input = self.query_input(query)
        for _ in range(self.steps):
            readout = torch.softmax(h @ support_g.t(), dim=1) @ support_g
            gates = from_input + self.query_hidden(torch.cat([h, readout], dim=1))
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c) + query
        return h


def attention_log_probs(
    query_emb: torch.Tensor, support_emb: torch.Tensor, support_y: torch.Tensor, n_way: int
) -> torch.Tensor:
    """log p(y = k | x̂) with p = Σ_i softmax_i(cos(x̂, x_i)) [y_i = k] (paper eq. 1-2).

    Computed as logsumexp over the class's support items minus logsumexp over
    all of them, which equals log of the summed attention without forming
    (and under-flowing) the probabilities.

    Args:
        query_emb: (Q, D) f(x̂).
        support_emb: (S, D) g(x_i).
        support_y: (S,) labels in 0..n_way-1, every class present.
        n_way: number of classes.

    Returns:
        (Q, n_way) log-probabilities.
    """
    cos = F.normalize(query_emb, dim=1) @ F.normalize(support_emb, dim=1).t()  # (Q, S)
    member = F.one_hot(support_y, n_way).to(cos.dtype)  # (S, N)
    # log of the membership mask: 0 inside the class, -inf outside.
    log_member = torch.log(member)
    per_class = torch.logsumexp(cos.unsqueeze(2) + log_member.unsqueeze(0), dim=1)  # (Q, N)
    return per_class - torch.logsumexp(cos, dim=1, keepdim=True)


class MatchingNet(_adapt.MetricLearner):
    """Matching Network with cosine attention, optional full context embeddings.

    Attributes:
        backbone: the embedding network (g' = f' shared, as in the paper).
        fce: the `FullContextEmbedding`, or None when `hparams.fce` is False.
    """

    name: ClassVar[str] = "matchingnet"
    hparams_class: ClassVar[type[Hparams]] = MatchingNetHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        assert isinstance(hparams, MatchingNetHparams)
        self.fce: FullContextEmbedding | None = (
            FullContextEmbedding(self.backbone.out_dim, hparams.fce_steps) if hparams.fce else None
        )

    def contextual(
        self, support_emb: torch.Tensor, query_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply FCE when enabled: returns (g(S), f(x̂, S)); identity otherwise."""
        if self.fce is None:
            return support_emb, query_emb
        g = self.fce.embed_support(support_emb)
        return g, self.fce.embed_query(query_emb, g)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the mean query negative log-likelihood of the meta-batch.

        Args:
            episodes: the meta-batch (one backbone forward over all images).

        Returns:
            Mean query loss and accuracy over the episodes.
        """
        embedded = self.embed_episodes(episodes)
        logits = []
        for (s, q), ep in zip(embedded, episodes):
            g, f = self.contextual(s, q)
            logits.append(attention_log_probs(f, g, ep.support_y.to(s.device), ep.n_way))
        # cross-entropy of log-probabilities = their negative log-likelihood (log_softmax is a no-op).
        return _metric.cross_entropy_step(logits, episodes)

    def support_scorer(self, support: _adapt.Support) -> Predictor:
        """Embed the support set once; score images by attention over it (inductive).

        Args:
            support: the checked support set (`unlabeled_x` is not used).

        Returns:
            images (B, C, H, W) → log p(y | x, S) (B, n_way). With FCE, each
            query is embedded against the support set independently.
        """
        support_emb = self.backbone(support.x)
        g = self.fce.embed_support(support_emb) if self.fce is not None else support_emb

        def score(images: torch.Tensor) -> torch.Tensor:
            f = self.backbone(images)
            if self.fce is not None:
                f = self.fce.embed_query(f, g)
            return attention_log_probs(f, g, support.y, support.n_way)

        return score
