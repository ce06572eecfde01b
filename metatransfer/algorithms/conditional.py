"""Conditional: FiLM generated from the support set AND the task description.

The mission's M(x, D; θ) → φ with the task's meta-information: a learner in
the line of CNAPs (Requeima et al. 2019, "Fast and Flexible Multi-Task
Classification Using Conditional Neural Adaptive Processes",
https://arxiv.org/abs/1906.07697: a task encoder generates FiLM parameters
of the feature extractor) and FEAT (Ye et al. 2020, "Few-Shot Learning via
Embedding Adaptation with Set-to-Set Functions", https://arxiv.org/abs/1812.03664:
attention over the set of class prototypes), on TADAM's FiLM machinery
(`metatransfer.algorithms.tadam`).

1. The unconditioned Conv-4 embeds the support set; its class prototypes,
   projected to `dim`, are the set tokens (one per class: permutation
   invariant, any n_way).
2. The description's token ids (`metatransfer.descriptions`: a fixed-size
   vocabulary plus hash buckets for unseen words) are embedded by a learned
   table; an episode without a description gets the learned "no description"
   token.
3. Fusion (`fusion`): "attention", a learned task query attends over the set
   and description tokens with `nn.MultiheadAttention`, plus the mean set
   token (residual); "mean", the mean set token plus the mean description
   token. With `use_description: false` the description is left out of both.
4. The task vector is mapped to a FiLM scale and shift per conv block,
   γ_l = 1 + λ_γ,l G_l(t), β_l = λ_β,l B_l(t), applied after each block's
   BatchNorm (TADAM's `film_batch_norm`); λ starts at 0 (a plain ProtoNet at
   step 0, so a pre-trained backbone is not disturbed) with an L2 penalty.
5. Support and queries are re-embedded with that FiLM; logits are
   -α ||f(x | t) - c_k||² against the conditioned prototypes.

Descriptions reach the learner without changing `Episode` or `adapt`:
- meta-training: `set_source_descriptions(class_ranges, descriptions)` (the
  meta_train stage calls it with the mixed sampler's per-source ranges of
  global class ids); each episode's source is found from `Episode.classes`;
- adaptation (validation, evaluation, serving): `set_description(...)` sets
  the description `adapt` conditions on (None: the "no description" token).
The vocabulary (`set_vocabulary`) is a buffer of word hashes, saved with
the weights, so a loaded learner encodes a new target's words as it was trained.

`adapt` uses the unconditioned backbone for the target model's φ
(`finetune` copies `backbone`), like TADAM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import model_validator
from torch import nn

from metatransfer.algorithms import _adapt, _metric
from metatransfer.algorithms.base import Hparams, Predictor, StepResult
from metatransfer.algorithms.tadam import Film, FilmHeads, FilmLearner, film_meta_learn
from metatransfer.config import Bool, Float, Int, bounded
from metatransfer.descriptions import NO_DESCRIPTION, PAD, Vocabulary, build_vocabulary
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec

FUSIONS = ("attention", "mean")

Description = Mapping[str, str]


class ConditionalHparams(Hparams):
    """Hyper-parameters of the conditional learner.

    Attributes:
        use_description: fuse the task description (False: support set only, the ablation).
        fusion: "attention" (nn.MultiheadAttention over set + description tokens) or "mean".
        heads: attention heads (must divide `dim`).
        dim: width of the set and description tokens and of the task vector.
        vocab_size: known-word slots of the description vocabulary.
        hash_buckets: buckets for words outside the vocabulary (hashing trick).
        max_tokens: description words read (the rest is cut).
        metric_scale_init: initial metric scale α (> 0).
        learn_metric_scale: learn α (True) or keep it fixed.
        film_l2: L2 penalty weight on the FiLM post-multipliers λ (>= 0).
    """

    error_where: ClassVar[str] = "meta_train.hparams.conditional"
    use_description: Bool = True
    fusion: Literal[FUSIONS] = "attention"  # type: ignore[valid-type]
    heads: Int = bounded(2, ge=1)
    dim: Int = bounded(64, ge=1)
    vocab_size: Int = bounded(256, ge=1)
    hash_buckets: Int = bounded(256, ge=1)
    max_tokens: Int = bounded(32, ge=1)
    metric_scale_init: Float = bounded(1.0, gt=0)
    learn_metric_scale: Bool = True
    film_l2: Float = bounded(0.01, ge=0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "ConditionalHparams":
        if self.dim % self.heads:
            raise ValueError(f"heads: must divide dim ({self.dim}), found {self.heads}; e.g. heads: 2 or 4")
        return self


class FilmGenerator(FilmHeads):
    """Set tokens (class prototypes) + description token ids → FiLM (γ, β) per conv block.

    Args:
        feature_dim: width of the backbone features (prototypes).
        channels: channels C_l of each conv block.
        hp: the learner's hyper-parameters (dim, heads, fusion, vocabulary sizes).
    """

    def __init__(self, feature_dim: int, channels: Sequence[int], hp: ConditionalHparams) -> None:
        super().__init__()
        self.fusion = hp.fusion
        self.use_description = hp.use_description
        self.set_proj = nn.Linear(feature_dim, hp.dim)
        n_ids = Vocabulary((), hp.vocab_size, hp.hash_buckets).n_ids
        self.tokens = nn.Embedding(n_ids, hp.dim, padding_idx=PAD)
        if hp.fusion == "attention":
            self.task_query = nn.Parameter(torch.randn(1, 1, hp.dim) * hp.dim**-0.5)
            self.attention = nn.MultiheadAttention(hp.dim, hp.heads, batch_first=True)
        # TADAM's heads, created after the layers above (their initialisation draws come first).
        self.build_heads(hp.dim, channels)

    def task_vector(self, prototypes: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Fuse the set and description tokens into one task vector (1, dim).

        Args:
            prototypes: (N, D) class prototypes of the unconditioned features.
            token_ids: (T,) int64 description ids (ignored with use_description false).
        """
        set_tokens = self.set_proj(prototypes)  # (N, dim)
        parts = [set_tokens]
        if self.use_description:
            parts.append(self.tokens(token_ids.to(prototypes.device)))
        if self.fusion == "mean":
            return sum(p.mean(0, keepdim=True) for p in parts)  # type: ignore[return-value]
        memory = torch.cat(parts).unsqueeze(0)  # (1, N + T, dim)
        fused, _ = self.attention(self.task_query.to(memory.dtype), memory, memory, need_weights=False)
        return fused[0] + set_tokens.mean(0, keepdim=True)

    def forward(self, prototypes: torch.Tensor, token_ids: torch.Tensor) -> Film:
        """[(γ_l, β_l)], each (1, C_l): γ_l = 1 + λ_γ,l G_l(t), β_l = λ_β,l B_l(t)."""
        return self.film(self.task_vector(prototypes, token_ids))


class Conditional(FilmLearner):
    """Description- and support-conditioned prototypical network (Conv-4 backbone).

    Attributes:
        backbone: the Conv-4 feature extractor (φ's backbone for target fine-tuning).
        generator: the `FilmGenerator`.
        metric_scale: α.
        vocab_hashes: int64 (vocab_size,) buffer: the known words' hashes, -1 for empty slots.
    """

    name: ClassVar[str] = "conditional"
    hparams_class: ClassVar[type[Hparams]] = ConditionalHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        assert isinstance(hparams, ConditionalHparams)
        self.generator = FilmGenerator(self.backbone.out_dim, self.block_channels(), hparams)
        self.init_metric_scale(hparams.metric_scale_init, hparams.learn_metric_scale)
        self.register_buffer("vocab_hashes", torch.full((hparams.vocab_size,), -1, dtype=torch.int64))
        self._description: Description | None = None
        self._source_ranges: list[tuple[int, int]] = []
        self._source_descriptions: list[Description | None] = []

    # ------------------------------------------------------------------ descriptions
    def set_vocabulary(self, descriptions: Sequence[Description | None]) -> None:
        """Build the vocabulary from descriptions (the sources') into the `vocab_hashes` buffer."""
        hp = self.hparams
        assert isinstance(hp, ConditionalHparams)
        vocab = build_vocabulary(descriptions, hp.vocab_size, hp.hash_buckets)
        hashes = torch.full((hp.vocab_size,), -1, dtype=torch.int64)
        hashes[: len(vocab.hashes)] = torch.tensor(vocab.hashes, dtype=torch.int64)
        self.vocab_hashes.copy_(hashes)

    def vocabulary(self) -> Vocabulary:
        """The vocabulary held in `vocab_hashes` (empty slots dropped)."""
        hp = self.hparams
        assert isinstance(hp, ConditionalHparams)
        hashes = tuple(int(h) for h in self.vocab_hashes.tolist() if h >= 0)
        return Vocabulary(hashes, hp.vocab_size, hp.hash_buckets)

    def set_description(self, description: Description | None) -> None:
        """The description `adapt` conditions on from now on (None: the "no description" token)."""
        self._description = dict(description) if description is not None else None

    def set_source_descriptions(
        self, class_ranges: Sequence[tuple[int, int]], descriptions: Sequence[Description | None]
    ) -> None:
        """Per meta-training source, its range [start, end) of global class ids and its description.

        Raises:
            ConfigError: the two sequences differ in length.
        """
        if len(class_ranges) != len(descriptions):
            raise ConfigError(f"conditional: {len(class_ranges)} class ranges but {len(descriptions)} descriptions; "
                              "pass one description (or None) per source")
        self._source_ranges = [(int(a), int(b)) for a, b in class_ranges]
        self._source_descriptions = [dict(d) if d is not None else None for d in descriptions]

    def episode_description(self, episode: Episode) -> Description | None:
        """The description of an episode's source (by its first global class id); else the current one."""
        if episode.classes is not None and self._source_ranges:
            first = int(episode.classes[0])
            for (start, end), description in zip(self._source_ranges, self._source_descriptions):
                if start <= first < end:
                    return description
        return self._description

    def token_ids(self, description: Description | None) -> torch.Tensor:
        """(T,) int64 ids of a description under this learner's vocabulary."""
        hp = self.hparams
        assert isinstance(hp, ConditionalHparams)
        ids = self.vocabulary().encode(description, hp.max_tokens) if description is not None else [NO_DESCRIPTION]
        return torch.tensor(ids, dtype=torch.int64, device=self.vocab_hashes.device)

    # ------------------------------------------------------------------ model
    def task_film(
        self, support_emb: torch.Tensor, support_y: torch.Tensor, n_way: int, token_ids: torch.Tensor
    ) -> Film:
        """FiLM of one task from its unconditioned support features and description ids."""
        prototypes = _metric.class_means(support_emb, support_y, n_way)
        return self.generator(prototypes, token_ids)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the mean query cross-entropy (+ the FiLM L2 penalty), TADAM's two passes.

        Each episode is conditioned on its own source's description (see the module docstring).
        """
        hp = self.hparams
        assert isinstance(hp, ConditionalHparams)
        dtype = _metric.module_dtype(self)

        def task_film(support_emb: torch.Tensor, support_y: torch.Tensor, ep: Episode) -> Film:
            ids = self.token_ids(self.episode_description(ep))
            return self.task_film(support_emb.to(dtype), support_y, ep.n_way, ids)

        return film_meta_learn(self, episodes, task_film, lambda: hp.film_l2 * self.generator.penalty())

    def support_scorer(self, support: _adapt.Support) -> Predictor:
        """Condition on the support set and the current description (`set_description`), then score.

        Returns:
            images (B, C, H, W) → logits (B, n_way) = -α ||f(x | t) - c_k||².
        """
        ids = self.token_ids(self._description)
        film = self.task_film(self.features(support.x), support.y, support.n_way, ids)
        prototypes = _metric.class_means(self.features(support.x, film), support.y, support.n_way)
        return lambda images: self.logits(self.features(images, film), prototypes)
