"""Shared functional inner-loop helpers of the gradient-based meta-learners.

MAML (Finn et al. 2017), first-order MAML, Reptile (Nichol et al. 2018), ANIL
(Raghu et al. 2020) and Meta-SGD (Li et al. 2017) all adapt a copy of the
meta-parameters θ to a support set by a few gradient steps and differ only in
which parameters move, with which step sizes, and how the outer gradient is
formed. The inner loop here is functional: fast weights φ are a
`dict[name, Tensor]` passed to `torch.func.functional_call`, so the module's own
parameters θ are never written during adaptation and, for second-order MAML,
the graph from θ through the inner steps to the query loss stays intact.

BatchNorm: every learner built here uses `track_running_stats=False`, as MAML's
reference code does. BatchNorm then always normalises with the statistics of
the batch it sees, in train and eval mode alike: the support batch during
adaptation and the query batch at query time. Within an episode this is
transductive (a query prediction depends on the other queries in the same
call), which is the standard protocol of these papers; it also means a
predictor should be called on a whole query set at once, not image by image.
There are no running statistics, hence no buffers to save or to leak between
episodes.

Per-task loops rather than `torch.func.vmap`: vmapping the inner loop turns the
fast-weight convolutions into grouped convolutions; on 2 CPU cores a vmapped
second-order meta-batch (32 Conv-4 tasks, 5-way 1-shot) took about ten times
as long as this loop. Note also that `grad(vmap(...))` over BatchNorm gives
wrong gradients (functorch issue #534), while `vmap(grad(...))` is correct. A
plain loop with one backward per task also frees each task's graph before the
next one is built.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metatransfer.algorithms.base import Hparams, MetaLearner, Predictor
from metatransfer.episodes import Episode
from metatransfer.errors import EpisodeError
from metatransfer.models import BackboneSpec, build_backbone

FastWeights = dict[str, torch.Tensor]
# A step size: one float for every parameter, or one tensor per parameter name
# (Meta-SGD's learned, element-wise rates; a tensor broadcasts against its parameter).
StepSize = float | Mapping[str, torch.Tensor]


class Classifier(nn.Module):
    """A backbone followed by a linear head: images (B, C, H, W) → logits (B, n_way).

    Args:
        backbone: a feature extractor exposing `out_dim`.
        n_way: number of output classes.
        zero_head: start the head at zero (weights and bias) instead of
            PyTorch's default initialisation.
    """

    def __init__(self, backbone: nn.Module, n_way: int, zero_head: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(backbone.out_dim)
        self.head = nn.Linear(self.out_dim, n_way)
        if zero_head:
            zero_(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (B, n_way)."""
        return self.head(self.backbone(x))


def zero_(head: nn.Linear) -> nn.Linear:
    """Set a linear layer's weight and bias to zero in place and return it."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head


def build_classifier(spec: BackboneSpec, n_way: int) -> Classifier:
    """Build backbone + linear head with per-batch BatchNorm statistics.

    Args:
        spec: the backbone spec (built with `track_running_stats=False`).
        n_way: head size.

    Returns:
        The classifier, parameters in PyTorch's default initialisation.
    """
    return Classifier(build_backbone(spec, track_running_stats=False), n_way)


def parameters_of(module: nn.Module) -> FastWeights:
    """Return the module's parameters by name (the live tensors, not copies)."""
    return dict(module.named_parameters())


def detached(params: Mapping[str, torch.Tensor]) -> FastWeights:
    """Return leaf copies of `params` that require grad and share no graph with them."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def loss_and_logits(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `model` run with parameters `params` on (x, y).

    Args:
        model: the module whose structure is used (its own parameters are
            replaced by `params` for this call only).
        params: parameters by name; names absent here keep the module's own.
        x, y: inputs and int64 labels.

    Returns:
        (mean cross-entropy, logits).
    """
    logits = functional_call(model, dict(params), (x,))
    return F.cross_entropy(logits, y), logits


def sgd_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    lr: StepSize,
) -> FastWeights:
    """One gradient step φ' = φ − lr·g on the names present in `grads`.

    Args:
        params: current fast weights (all names).
        grads: gradients for the names that move; other names are carried over.
        lr: a float, or per-name tensors multiplied element-wise (Meta-SGD).

    Returns:
        New fast weights (a new dict; out-of-place so the graph is kept).
    """
    out = dict(params)
    for name, g in grads.items():
        step = lr[name] if isinstance(lr, Mapping) else lr
        out[name] = params[name] - step * g
    return out


def sgd_steps(
    params: Mapping[str, torch.Tensor],
    loss_of: Callable[[FastWeights], torch.Tensor],
    steps: int,
    lr: StepSize,
    create_graph: bool,
    names: Collection[str] | None = None,
) -> FastWeights:
    """Run `steps` full-batch gradient steps on `loss_of(φ)`, functionally: the one
    fast-weight loop of every gradient-based learner here.

    With `create_graph=True` (second-order MAML, Meta-SGD) the returned fast
    weights stay differentiable functions of `params` through every step,
    including the Hessian-vector terms. With `create_graph=False` the inner
    gradients are constants (first-order MAML): the result is still connected
    to `params` by the identity, so the outer gradient w.r.t. `params` is the
    query gradient at φ, exactly FOMAML's update direction.

    Args:
        params: starting weights θ by name (leaves that require grad, or
            tensors derived from them).
        loss_of: fast weights (all names) → scalar loss (e.g. the support
            cross-entropy of a model run with them).
        steps: number of steps (0 returns `params` unchanged).
        lr: step size (float or per-name tensors).
        create_graph: keep the graph of the inner gradients (second order).
        names: the parameter names that move (default: all).

    Returns:
        The fast weights φ after `steps` steps (all names).
    """
    fast = dict(params)
    moving = list(fast) if names is None else [n for n in fast if n in names]
    for _ in range(steps):
        grads = torch.autograd.grad(
            loss_of(fast), [fast[n] for n in moving], create_graph=create_graph
        )
        fast = sgd_step(fast, dict(zip(moving, grads, strict=True)), lr)
    return fast


def adapt_sgd(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: StepSize,
    create_graph: bool,
    names: Collection[str] | None = None,
) -> FastWeights:
    """`sgd_steps` on the support cross-entropy of `model` run with the fast weights.

    Args:
        model: module giving the structure.
        params: starting weights θ by name.
        x, y: the support set.
        steps, lr, create_graph, names: as in `sgd_steps`.

    Returns:
        The fast weights φ after `steps` steps (all names).
    """
    return sgd_steps(
        params, lambda fast: loss_and_logits(model, fast, x, y)[0], steps, lr, create_graph, names
    )


def adapt_head(
    features: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sgd_steps` on a linear head over fixed features (ANIL's inner loop).

    The features are computed once by the caller; with `create_graph=True` the
    adapted head stays a differentiable function of the initial head *and* of
    the features (hence of the backbone), which is how ANIL's outer gradient
    reaches the backbone through the support set as well as the query set.

    Args:
        features: support features (B, D).
        y: support labels (B,).
        weight, bias: the starting head (n_way, D) and (n_way,).
        steps: inner steps.
        lr: step size.
        create_graph: keep the graph of the inner gradients (second order).

    Returns:
        The adapted (weight, bias).
    """
    head = sgd_steps(
        {"weight": weight, "bias": bias}, lambda p: head_loss(features, y, p), steps, lr, create_graph
    )
    return head["weight"], head["bias"]


def head_loss(features: torch.Tensor, y: torch.Tensor, head: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the linear head {"weight", "bias"} on fixed features (B, D)."""
    return F.cross_entropy(F.linear(features, head["weight"], head["bias"]), y)


def sgd_detached(
    params: Mapping[str, torch.Tensor],
    loss_of: Callable[[FastWeights], torch.Tensor],
    steps: int,
    lr: StepSize,
    names: Collection[str] | None = None,
) -> FastWeights:
    """Adaptation at evaluation time: `steps` plain SGD steps, no graph kept.

    Each step starts from detached leaves, so memory does not grow with the
    number of steps and nothing connects the result to `params`. Runs under
    `torch.enable_grad()`, since evaluation code usually calls `adapt` inside
    `torch.no_grad()`.

    Args:
        params: starting weights by name (not modified).
        loss_of: fast weights (all names) → scalar loss.
        steps: number of steps.
        lr: step size (float or per-name tensors).
        names: the parameter names that move (default: all).

    Returns:
        The adapted weights (all names; detached leaves).
    """
    with torch.enable_grad():
        fast = detached(params)
        for _ in range(steps):
            fast = detached(sgd_steps(fast, loss_of, 1, lr, create_graph=False, names=names))
    return fast


def freeze_with(model: Classifier, params: Mapping[str, torch.Tensor]) -> Classifier:
    """Load `params` into `model` in place, freeze it and put it in eval mode.

    Called on the working copy made by `working_copy`, never on θ: the result
    is what `adapt` returns as the predictor, so calling it never touches the
    meta-learner, and (BatchNorm having no running statistics) eval mode still
    normalises with the statistics of the batch it is given.

    Args:
        model: the working copy (its head may differ in size from θ's).
        params: the adapted weights by name; must cover every parameter.

    Returns:
        `model`, now the predictor (images → logits).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].detach())
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return model.eval()


def working_copy(model: Classifier, n_way: int) -> Classifier:
    """A deep copy of `model` for adaptation to an `n_way`-class support set.

    If `n_way` equals the head's size, the copy starts from the meta-learned
    head. Otherwise the meta-learned head cannot be used and the copy gets a
    fresh head initialised at zero: a zero head gives equal logits for every
    class, so it favours no class before adaptation, and makes the first
    inner step depend on the features only (the "zero trick" that makes MAML
    work with any number of ways).

    Args:
        model: the meta-learner's classifier (θ); it is not modified.
        n_way: the number of classes of the support set.

    Returns:
        The copy (parameters detached from θ, gradients cleared).
    """
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.grad = None
    if out.head.out_features != n_way:
        ref = out.head.weight
        out.head = zero_(nn.Linear(out.out_dim, n_way, device=ref.device, dtype=ref.dtype))
    return out


def episode_tensors(
    episode: Episode, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (support_x, support_y, query_x, query_y) moved to `device`."""
    return (
        episode.support_x.to(device),
        episode.support_y.to(device),
        episode.query_x.to(device),
        episode.query_y.to(device),
    )


def check_episodes(episodes: Sequence[Episode], n_way: int, algorithm: str) -> None:
    """Refuse an empty meta-batch or episodes whose n_way differs from the head's.

    Raises:
        EpisodeError: naming the algorithm, the episode index, expected and found.
    """
    if len(episodes) == 0:
        raise EpisodeError(f"{algorithm}.meta_learn: got an empty meta-batch; pass >= 1 episode")
    for i, ep in enumerate(episodes):
        if ep.n_way != n_way:
            raise EpisodeError(
                f"{algorithm}.meta_learn: episode {i} is {ep.n_way}-way but the learner was "
                f"built for n_way={n_way}; sample meta-training episodes with "
                f"meta_train.n_way={n_way}"
            )


class GradientLearner(MetaLearner):
    """Common base of the gradient-based learners: a `Classifier` θ in `self.model`.

    Subclasses implement `meta_learn` and `adapted_weights`; this class builds
    the model with per-batch BatchNorm and gives the one `adapt` of the family
    (a working copy of θ, adapted weights, a frozen predictor), `device` and
    `forward`.
    """

    track_running_stats = False

    def __init__(
        self, backbone: BackboneSpec, n_way: int, hparams: Hparams, num_classes: int = 0
    ) -> None:
        super().__init__(backbone, n_way, hparams, num_classes)
        self.model = build_classifier(backbone, n_way)

    @property
    def backbone(self) -> nn.Module:
        """The feature extractor of θ (its φ initialises target models)."""
        return self.model.backbone

    @property
    def device(self) -> torch.device:
        """Where the meta-parameters live (episodes are moved there)."""
        return self.model.head.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the un-adapted θ on a batch (B, n_way)."""
        return self.model(x)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, unlabeled_x: torch.Tensor | None = None
    ) -> Predictor:
        """Adapt a copy of θ to the support set by the learner's `adapted_weights`.

        A support set with a different number of ways than `self.n_way` gets a
        fresh zero-initialised head (see `working_copy`). Runs with gradients
        enabled even inside `torch.no_grad()`; θ is not modified.

        Args:
            support_x, support_y: the labelled support set (labels 0..n_way-1).
            n_way: number of classes.
            unlabeled_x: ignored (not transductive beyond BatchNorm statistics).

        Returns:
            A frozen classifier (images → logits) holding the adapted weights.
        """
        work = working_copy(self.model, n_way)
        fast = self.adapted_weights(work, support_x.to(self.device), support_y.to(self.device))
        return freeze_with(work, fast)

    @abstractmethod
    def adapted_weights(self, work: Classifier, x: torch.Tensor, y: torch.Tensor) -> FastWeights:
        """The weights (all names of `work`) adapted to the support set (x, y).

        Args:
            work: the working copy of θ (its head has the support set's n_way).
            x, y: the support set on `self.device`.
        """
