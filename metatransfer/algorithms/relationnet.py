"""Relation Networks.

Sung, Yang, Zhang, Xiang, Torr & Hospedales (2018), "Learning to Compare:
Relation Network for Few-Shot Learning", CVPR 2018,
https://arxiv.org/abs/1711.06025.

An embedding module f maps images to feature maps; for each query x_j and
class i the relation module g scores r_ij = g([Σ_{x∈S_i} f(x), f(x_j)]) in
(0, 1) (channel concatenation; K-shot class maps are the element-wise sum of
the class's support maps, paper section 3.3); training regresses r_ij to the
one-hot match with mean squared error (paper eq. 3).

Embedding. The paper's Omniglot/miniImageNet embedding is four conv blocks
of which only the first two max-pool; the last two keep the spatial size so
the relation module sees a map (64x7x7 at 28x28). With the project's Conv-4
(every block pools: 28→14→7→3→1) this is reproduced by running the same four
blocks and skipping the max-pool of the last `unpooled_blocks`: the
parameters (and their names) are those of the Conv-4 backbone, so weights
transfer both ways. `unpooled_blocks: 2` is the paper's layout (64x7x7 at
28x28); the default is 1 (64x3x3 at 28x28, 64x10x10 at 84x84), because the
paper's 7x7 maps make a 5-way 1-shot 15-query step cost about 1.34x a plain
Conv-4 forward/backward of the same images (the relation module then runs a
3x3 convolution on 375 7x7 pair maps) against about 1.07x at 3x3, which is
inside the project's budget of 1.2x for metric learners. Other backbones
(ResNet-12) use their `feature_map` as is and `unpooled_blocks` does not apply.

Relation module (paper Fig. 2): two blocks [conv3x3 (padding 1), BatchNorm,
ReLU, max-pool 2] with `hidden` channels (the embedding's channels), then
FC (→ `fc_hidden`=8) + ReLU and FC (→ 1) + sigmoid. A max-pool is skipped
when the map is already 1x1. Its first convolution acts on the concatenation
[class map, query map]; being linear, it is computed as W_c * class + W_q *
query + b on the N class maps and Q query maps separately and then
broadcast-added over the N x Q pairs: the same numbers as the paper's
concatenate-then-convolve, at (N + Q) instead of N·Q convolutions.

BatchNorm keeps running statistics (`track_running_stats = True`, embedding
and relation module alike), as in the paper's code; `adapt` runs in eval mode.
The predictor returns the relation scores in (0, 1) as the logits (the
arg-max is the prediction; they are not log-probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.algorithms import _adapt, _metric
from metatransfer.algorithms.base import (
    Hparams,
    Predictor,
    StepResult,
    episode_accuracy,
)
from metatransfer.config import Int, bounded
from metatransfer.episodes import Episode
from metatransfer.errors import ConfigError
from metatransfer.models import BackboneSpec
from metatransfer.models.conv4 import Conv4


class RelationNetHparams(Hparams):
    """Relation Network hyper-parameters (paper defaults but `unpooled_blocks`).

    Attributes:
        unpooled_blocks: Conv-4 only: how many of the last embedding blocks
            skip their max-pool (paper: 2 → 64x7x7 maps at 28x28; default 1 →
            64x3x3, see the module docstring for why).
        fc_hidden: width of the relation module's hidden FC layer (paper: 8).
        class_pool: how K support maps form a class map: "sum" (paper) or
            "mean" (keeps the scale when evaluation K differs from training K).
    """

    error_where: ClassVar[str] = "meta_train.hparams.relationnet"
    unpooled_blocks: Int = 1  # 0..the Conv-4 blocks: checked by RelationNet, which knows the backbone
    fc_hidden: Int = bounded(8, ge=1)
    class_pool: Literal["sum", "mean"] = "sum"


def _relation_block(channels_in: int, channels_out: int, pool: bool) -> nn.Sequential:
    """conv3x3 (padding 1) → BatchNorm (running stats) → ReLU → [max-pool 2]."""
    layers: list[nn.Module] = [
        nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
        nn.BatchNorm2d(channels_out, track_running_stats=True),
        nn.ReLU(inplace=False),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class RelationModule(nn.Module):
    """g: scores pairs [class map, query map] → (Q, N) relations in (0, 1).

    Args:
        channels: channels C of one embedding map (the input has 2C).
        side: spatial side of the embedding map.
        fc_hidden: hidden FC width.
    """

    def __init__(self, channels: int, side: int, fc_hidden: int) -> None:
        super().__init__()
        pool1 = side >= 2
        side = side // 2 if pool1 else side
        pool2 = side >= 2
        side = side // 2 if pool2 else side
        self.channels = channels
        self.block1 = _relation_block(2 * channels, channels, pool1)
        self.block2 = _relation_block(channels, channels, pool2)
        self.fc1 = nn.Linear(channels * side * side, fc_hidden)
        self.fc2 = nn.Linear(fc_hidden, 1)

    def forward(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """Relation scores of every (query, class) pair.

        Args:
            class_maps: (N, C, h, w).
            query_maps: (Q, C, h, w).

        Returns:
            (Q, N) scores in (0, 1).
        """
        conv = self.block1[0]
        c = self.channels
        # conv([a, b]) = conv_a(a) + conv_b(b): convolve the N + Q maps, not the N·Q pairs.
        from_class = F.conv2d(class_maps, conv.weight[:, :c], conv.bias, padding=conv.padding)
        from_query = F.conv2d(query_maps, conv.weight[:, c:], None, padding=conv.padding)
        n, q = class_maps.shape[0], query_maps.shape[0]
        pairs = (from_query.unsqueeze(1) + from_class.unsqueeze(0)).flatten(0, 1)  # (Q*N, C, h', w')
        x = self.block1[1:](pairs)
        x = self.block2(x).flatten(1)
        x = torch.relu(self.fc1(x))
        return torch.sigmoid(self.fc2(x)).view(q, n)

    def forward_concat(self, class_maps: torch.Tensor, query_maps: torch.Tensor) -> torch.Tensor:
        """Reference path: the paper's concatenate-then-convolve (N·Q convolutions).

        Same result as `forward` up to rounding; kept to test that equality.
        """
        n, q = class_maps.shape[0], query_maps.shape[0]
        pairs = torch.cat(
            [
                class_maps.unsqueeze(0).expand(q, *class_maps.shape),
                query_maps.unsqueeze(1).expand(q, n, *query_maps.shape[1:]),
            ],
            dim=2,
        ).flatten(0, 1)
        x = self.block2(self.block1(pairs)).flatten(1)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(x)))).view(q, n)


class RelationNet(_adapt.MetricLearner):
    """Relation Network: embedding (the backbone) + relation module, MSE to one-hot.

    Attributes:
        backbone: the embedding network (its Conv-4 blocks, last ones un-pooled).
        relation: the `RelationModule`.
    """

    name: ClassVar[str] = "relationnet"
    hparams_class: ClassVar[type[Hparams]] = RelationNetHparams

    def __init__(self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        assert isinstance(hparams, RelationNetHparams)
        if isinstance(self.backbone, Conv4):
            blocks = len(self.backbone.encoder)
            if not 0 <= hparams.unpooled_blocks <= blocks:
                raise ConfigError(
                    f"relationnet.unpooled_blocks: expected 0..{blocks}, found {hparams.unpooled_blocks}"
                )
            side = backbone.image_size
            for i in range(blocks):
                if i < blocks - hparams.unpooled_blocks:
                    side //= 2
            channels = self.backbone.feature_shape[0]
        else:
            channels, side, _ = self.backbone.feature_shape
        self.embedding_shape = (channels, side, side)
        self.relation = RelationModule(channels, side, hparams.fc_hidden)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding maps (B, C, h, w): Conv-4 blocks with the last max-pools skipped."""
        if not isinstance(self.backbone, Conv4):
            return self.backbone.feature_map(images)
        hp = self.hparams
        assert isinstance(hp, RelationNetHparams)
        blocks = self.backbone.encoder
        first_unpooled = len(blocks) - hp.unpooled_blocks
        x = images
        for i, block in enumerate(blocks):
            # Conv-4 block = [conv, BN, ReLU, max-pool]; [:3] drops the pool.
            x = block(x) if i < first_unpooled else block[:3](x)
        return x

    def class_maps(self, support_maps: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
        """Combine the K support maps of each class (sum as in the paper, or mean)."""
        hp = self.hparams
        assert isinstance(hp, RelationNetHparams)
        if hp.class_pool == "sum":
            return _metric.class_sums(support_maps, support_y, n_way)
        return _metric.class_means(support_maps, support_y, n_way)

    def scores(
        self,
        support_maps: torch.Tensor,
        support_y: torch.Tensor,
        n_way: int,
        query_maps: torch.Tensor,
    ) -> torch.Tensor:
        """Relation scores (Q, N) of embedded queries against an embedded support set."""
        return self.relation(self.class_maps(support_maps, support_y, n_way), query_maps)

    def meta_learn(self, episodes: Sequence[Episode]) -> StepResult:
        """Back-propagate the mean query MSE between relation scores and one-hot labels.

        Args:
            episodes: the meta-batch (one embedding forward over all images).

        Returns:
            Mean query MSE and accuracy over the episodes.
        """
        embedded = self.embed_episodes(episodes, self.embed)
        losses, accs = [], []
        for (s, q), ep in zip(embedded, episodes):
            scores = self.scores(s, ep.support_y.to(s.device), ep.n_way, q)
            y = ep.query_y.to(s.device)
            losses.append(F.mse_loss(scores, F.one_hot(y, ep.n_way).to(scores.dtype)))
            accs.append(episode_accuracy(scores.detach(), y))
        loss = torch.stack(losses).mean()
        loss.backward()
        return StepResult(loss=float(loss.detach()), acc=sum(accs) / len(accs))

    def support_scorer(self, support: _adapt.Support) -> Predictor:
        """Embed the support set once into class maps; score images by relation (inductive).

        Args:
            support: the checked support set (`unlabeled_x` is not used).

        Returns:
            images (B, C, H, W) → relation scores (B, n_way) in (0, 1).
        """
        class_maps = self.class_maps(self.embed(support.x), support.y, support.n_way)
        return lambda images: self.relation(class_maps, self.embed(images))
