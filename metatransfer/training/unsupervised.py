"""A target without labels: batch-norm re-estimation, soft k-means in the embedding, optional self-training.

The model shipped for an unlabelled target is a `TargetModel` like every
other, whose classes are the clusters `cluster_0` .. `cluster_<k-1>`, so the
registry, serving and `load_target_model` take it unchanged. It is fitted from
the target's images alone; no label is ever an input here (the stage passes
images only):

1. The learner's backbone (φ) starts the model; its BatchNorm running
   statistics are re-estimated on the target images (AdaBN, as `bn_adapt`
   does for episodes: metatransfer/algorithms/_support_fit.py).
2. The images are embedded and clustered by soft k-means (seeded k-means++
   starts, several restarts, the lowest free energy kept). k comes from the
   params or, with `select_k`, is the k in 2..k_max with the highest
   silhouette of the hard assignment (ties: the smaller k).
3. The head is the soft k-means assignment itself: with centres μ_c and
   temperature T, softmax(-‖f - μ_c‖² / T) = softmax((2μ_c·f - ‖μ_c‖²) / T),
   a linear layer (the ‖f‖² term cancels). Before any self-training the
   model's softmax output is the soft assignment.
4. Optionally, a fixed number of Adam steps of cross-entropy on the images
   whose assignment probability reaches `confidence` (their cluster as the
   pseudo-label), drawn by a seeded generator, augmented by finetune.augment
   (a confident image's own loss is near zero; its augmented views are not).

Heterogeneous target (stored at its own channels or size, `prepare.per_dataset`):
the model gets the input adapter of labelled fine-tuning
(metatransfer/models/adapter.py), a 1x1 convolution that starts as the fixed
grey/RGB conversion prepare applies (grey -> RGB copies the value, RGB -> grey
takes the ITU-R 601 luma), and another size goes through the backbone's
adaptive pooling. Without labels nothing can fit that convolution, so steps
1-3 run through the fixed conversion (the embedding is exactly φ's on the
converted images) and only self-training (step 4, all weights) trains it;
with `self_training_steps: 0` the adapter stays the fixed conversion.

Everything is seeded and runs in float64 NumPy (clustering) or deterministic
torch (embedding, self-training): the same images and settings give the same
bytes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from metatransfer.algorithms._support_fit import reestimate_batchnorm
from metatransfer.algorithms.base import MetaLearner
from metatransfer.augment import augment_batch
from metatransfer.config import AugmentParams
from metatransfer.errors import ConfigError
from metatransfer.evaluation.clustering import silhouette
from metatransfer.training.finetune import TargetModel, _learner_backbone

log = logging.getLogger(__name__)

RESTARTS = 5  # soft k-means starts per k; the lowest free energy is kept
ITERATIONS = 100  # at most, per start (stops earlier when the centres stop moving)
SILHOUETTE_MAX_IMAGES = 1000  # a seeded subset above this: the score is O(N²) in memory
CHUNK = 256  # images per forward pass


def cluster_names(k: int) -> list[str]:
    """The class names of a cluster model: `cluster_0` .. `cluster_<k-1>`."""
    return [f"cluster_{i}" for i in range(k)]


@dataclass(frozen=True)
class ClusterSettings:
    """How an unlabelled target is fitted (finetune.unlabeled.<target>, plus finetune.lr / batch_size).

    k, select_k, k_max, temperature, self_training_steps, confidence: see
    `metatransfer.config.UnlabeledParams`. lr, batch_size: self-training's
    Adam rate and mini-batch. augment: the batch augmentation of self-training
    (finetune.augment): confident images already have a near-zero loss, so the
    augmented views are what it learns from. device: where the model runs.
    """

    k: int = 2
    select_k: bool = False
    k_max: int = 8
    temperature: float = 0.1
    self_training_steps: int = 0
    confidence: float = 0.9
    lr: float = 1e-3
    batch_size: int = 32
    augment: AugmentParams = field(default_factory=AugmentParams)
    device: str = "cpu"


@dataclass
class SoftKMeans:
    """A soft k-means fit: centres (k, D), responsibilities (N, k), its free energy and the scale of T."""

    centres: np.ndarray
    resp: np.ndarray
    energy: float
    scale: float  # the temperature's unit: the features' total variance


@dataclass
class ClusterResult:
    """The cluster model of an unlabelled target and its label-free evidence."""

    model: TargetModel
    k: int
    silhouette: float  # of the hard assignment at the chosen k (train embedding)
    silhouettes: dict[int, float] = field(default_factory=dict)  # every k tried
    cluster_sizes: list[int] = field(default_factory=list)  # train images per cluster, by the returned model
    confident: int = 0  # images whose soft assignment reached `confidence`
    steps: int = 0  # self-training steps done


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = _sq_dist(x, np.stack(centres)).min(1)
        total = d.sum()
        idx = rng.choice(len(x), p=d / total) if total > 0 else rng.integers(len(x))
        centres.append(x[idx])
    return np.stack(centres)


def soft_kmeans(features: np.ndarray, k: int, temperature: float, seed: int) -> SoftKMeans:
    """Soft k-means of `features` (N, D) into `k` clusters, seeded and deterministic.

    Responsibilities r_ic ∝ exp(-‖x_i - μ_c‖² / T) with T = temperature × the
    features' total variance (mean squared distance to their mean), so the
    temperature does not depend on the embedding's scale. Centres are the
    responsibility-weighted means. RESTARTS k-means++ starts; the fit with the
    lowest free energy -T Σ_i log Σ_c exp(-‖x_i - μ_c‖² / T) is returned.

    Raises:
        ConfigError: k < 2 or fewer images than clusters.
    """
    x = np.asarray(features, dtype=np.float64)
    if k < 2 or len(x) < k:
        raise ConfigError(f"soft k-means: needs k >= 2 and at least k images, found k={k} for {len(x)} images")
    scale = float(((x - x.mean(0)) ** 2).sum(1).mean()) or 1.0
    t = temperature * scale
    rng = np.random.default_rng(seed)
    best: SoftKMeans | None = None
    for _ in range(RESTARTS):
        centres = _kmeanspp(x, k, rng)
        for _ in range(ITERATIONS):
            resp = _softmax_rows(-_sq_dist(x, centres) / t)
            mass = resp.sum(0)
            new = np.where(mass[:, None] > 1e-12, resp.T @ x / np.maximum(mass, 1e-12)[:, None], centres)
            moved = float(np.abs(new - centres).max())
            centres = new
            if moved <= 1e-10 * (1.0 + float(np.abs(centres).max())):
                break
        d = -_sq_dist(x, centres) / t
        top = d.max(1, keepdims=True)
        energy = float(-t * (top[:, 0] + np.log(np.exp(d - top).sum(1))).sum())
        if best is None or energy < best.energy - 1e-9 * abs(best.energy):
            best = SoftKMeans(centres, _softmax_rows(d), energy, scale)
    assert best is not None
    return best


def _silhouette_of(x: np.ndarray, hard: np.ndarray, seed: int) -> float:
    if len(x) > SILHOUETTE_MAX_IMAGES:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), SILHOUETTE_MAX_IMAGES, replace=False))
        x, hard = x[idx], hard[idx]
    if not 2 <= len(np.unique(hard)) <= len(hard) - 1:
        return -1.0  # collapsed to one cluster: the worst score, never chosen over a real split
    return silhouette(x, hard)


def choose_k(features: np.ndarray, settings: ClusterSettings, seed: int) -> tuple[int, dict[int, float], dict[int, SoftKMeans]]:
    """The k to use: `settings.k`, or with `select_k` the best silhouette over 2..k_max (ties: smaller k).

    Returns:
        (k, silhouette per k tried, fit per k tried).
    """
    x = np.asarray(features, dtype=np.float64)
    ks = list(range(2, min(settings.k_max, len(x) - 1) + 1)) if settings.select_k else [settings.k]
    if not ks:
        raise ConfigError(f"unlabelled target: {len(x)} images are too few to choose k over 2..{settings.k_max}")
    fits = {k: soft_kmeans(x, k, settings.temperature, seed) for k in ks}
    scores = {k: _silhouette_of(x, fits[k].resp.argmax(1), seed) for k in ks}
    best = max(ks, key=lambda k: (scores[k], -k))
    return best, scores, fits


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor,
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Features of `images` in eval mode (mode restored), in chunks.

    Args:
        backbone: the module put in eval mode (a backbone, or a `TargetModel`).
        images: float images (N, C, H, W).
        forward: what maps a chunk to features (default: `backbone` itself; a target model's
            `features`, which runs its input adapter first).
    """
    was = backbone.training
    backbone.eval()
    out = torch.cat([(forward or backbone)(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)])
    backbone.train(was)
    return out


def adapter_note(model: TargetModel, steps: int) -> str:
    """How a cluster model takes images of another shape than its backbone's ("" when it does not)."""
    if model.input_shape is None:
        return ""
    spec = model.backbone_spec
    name = {1: "grey", 3: "RGB"}
    parts = []
    if model.adapter is not None:
        how = (f"trained by the {steps} self-training steps" if steps else
               "kept fixed (no self-training step: without labels nothing else can train it)")
        parts.append(f"{name[model.input_channels]} -> {name[spec.in_channels]} by a 1x1 input adapter that starts "
                     f"as the fixed conversion, {how}")
    if model.input_size != spec.image_size:
        parts.append(f"{model.input_size} px images pooled adaptively to the map of the backbone's "
                     f"{spec.image_size} px")
    return "; ".join(parts)


def _start_model(learner: MetaLearner, k: int, images: torch.Tensor) -> TargetModel:
    """A cluster model whose backbone is `learner`'s φ with BatchNorm statistics of `images`.

    Images of another shape than φ's (a heterogeneous target) get the input adapter, at the fixed conversion.
    """
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ConfigError(f"{learner.name}: target images must be (N, C, S, S), found shape {tuple(images.shape)}")
    model = TargetModel(learner.backbone_spec, cluster_names(k), learner.name,
                        input_shape=(int(images.shape[1]), int(images.shape[2])))
    # strict=False: a MAML-family backbone has no running-stat buffers; they are estimated below.
    missing, unexpected = model.backbone.load_state_dict(_learner_backbone(learner).state_dict(), strict=False)
    bad = [k_ for k_ in missing if not k_.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if bad or unexpected:
        raise ConfigError(f"{learner.name}: backbone weights do not fit the target model ({bad[:3]}, {unexpected[:3]})")
    # Another input shape: the statistics are taken through the adapter and pooling, of what the backbone
    # is fed (the whole model runs; its head's output is discarded).
    reestimate_batchnorm(model if model.input_shape is not None else model.backbone, images)
    model.eval()
    return model


def _self_train(model: TargetModel, images: torch.Tensor, pseudo: torch.Tensor, settings: ClusterSettings,
                seed: int) -> int:
    """`settings.self_training_steps` Adam steps of cross-entropy on (images, pseudo); returns steps done."""
    if settings.self_training_steps == 0 or len(images) == 0:
        return 0
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same batches on every device
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in range(settings.self_training_steps):
        idx = torch.randint(len(images), (min(settings.batch_size, len(images)),), generator=gen).to(images.device)
        x = images[idx]
        if settings.augment.enabled:  # per-step generator, as fine-tuning does
            x = augment_batch(x.cpu(), settings.augment, torch.Generator().manual_seed(seed * 1_000_003 + step))
            x = x.to(images.device)
        loss = loss_fn(model(x), pseudo[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return settings.self_training_steps


def fit_unlabeled(learner: MetaLearner, images: torch.Tensor, settings: ClusterSettings, seed: int) -> ClusterResult:
    """Fit the cluster model of an unlabelled target from its images alone.

    Args:
        learner: the learner whose φ embeds the images (unchanged).
        images: the target's train images, float in [0, 1] (N, C, H, W); no labels.
        settings: k (or its selection), temperature, self-training.
        seed: seeds the k-means++ starts, the silhouette subset and the self-training batches.

    Returns:
        ClusterResult: the model (eval mode, on `settings.device`), k, silhouettes, cluster sizes.

    Raises:
        ConfigError: too few images for k, or a backbone that does not fit.
    """
    device = torch.device(settings.device)
    learner_device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    if learner_device.type != "cpu":
        learner = copy.deepcopy(learner).cpu()
    images = images.cpu()
    model = _start_model(learner, settings.k, images)  # k is fixed below; the backbone does not depend on it
    feats = embed(model, images, model.features).double().numpy()
    k, scores, fits = choose_k(feats, settings, seed)
    fit = fits[k]
    if model.head.out_features != k:  # a new head; the adapter (if any) is kept
        model.head = nn.Linear(model.backbone.out_dim, k)
        model.class_names = cluster_names(k)
    t = settings.temperature * fit.scale
    with torch.no_grad():
        centres = torch.from_numpy(fit.centres)
        model.head.weight.copy_((2 * centres / t).float())
        model.head.bias.copy_((-(centres**2).sum(1) / t).float())
    confidence = fit.resp.max(1)
    keep = np.flatnonzero(confidence >= settings.confidence)
    model = model.to(device)
    steps = 0
    if settings.self_training_steps:
        if len(keep) == 0:
            log.warning("self-training skipped: no image's soft assignment reaches confidence %.2f (highest %.3f)",
                        settings.confidence, float(confidence.max()))
        else:
            pseudo = torch.from_numpy(fit.resp.argmax(1)[keep].astype(np.int64)).to(device)
            steps = _self_train(model, images[torch.from_numpy(keep)].to(device), pseudo, settings, seed)
    with torch.no_grad():
        assigned = torch.cat([model(images[i : i + CHUNK].to(device)).argmax(1).cpu()
                              for i in range(0, len(images), CHUNK)]).numpy()
    sizes = np.bincount(assigned, minlength=k).tolist()
    return ClusterResult(model, k, scores[k], scores, [int(s) for s in sizes], int(len(keep)), steps)
