"""Target fine-tuning: the meta-learned φ initialises the model shipped for the target.

For every meta-trained learner the target model is its backbone (φ) plus a
linear head over the target's classes, initialised from the class prototypes
of the labelled target images (the ProtoNet ↔ linear-layer identity of Snell
et al. 2017: w_c = 2μ_c, b_c = −‖μ_c‖², so before any step the model already
is the nearest-prototype classifier), then fine-tuned with Adam on the
labelled target images, with early stopping on target validation data.

Batch norm: learners meta-trained with per-episode batch statistics (MAML
family) have no running statistics; a served model must not depend on the
batch it is given, so the target model always tracks running statistics and
estimates them on the labelled target images before fine-tuning.

Heterogeneous transfer: a target stored at its own channels or size
(`prepare.per_dataset`) gets a learned 1x1 input adapter in front of φ, which
starts as the fixed grey/RGB conversion and trains with the model
(metatransfer/models/adapter.py); the saved model records the input shape and
is served at it (the model and its files: `metatransfer.training.target_model`).

With a `CheckpointConfig` the loop saves its full state (weights, Adam
moments, the mini-batch generator, best weights, curve, global RNG states)
every N steps and a re-run resumes from the newest checkpoint with the same
result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from metatransfer.algorithms.base import MetaLearner
from metatransfer.augment import augment_batch
from metatransfer.config import AugmentParams
from metatransfer.errors import ConfigError
from metatransfer.training.checkpoint import (
    CheckpointConfig,
    load_latest,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# The target model lives in its own module; its names stay importable from here because
# models logged to MLflow load through `metatransfer.training.finetune.load_target_model`.
from metatransfer.training.target_model import TargetModel, load_target_model, save_target_model  # noqa: F401

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    """How the target model is trained (the `finetune` section of params.yaml)."""

    steps: int
    lr: float
    batch_size: int
    train_layers: str  # "all" or "head"
    eval_every: int
    patience: int  # evaluations without improvement before stopping; 0 = never stop early
    # Where the target model trains ("cpu", "cuda", "mps": metatransfer.runtime.device_for) and
    # the autocast of its training step ("fp32", "bf16", "fp16"). Steps are the only budget:
    # fine-tuning has no wall-clock dependence.
    device: str = "cpu"
    precision: str = "fp32"
    # Batch augmentation of the labelled images (off by default); step s draws
    # from a generator seeded by (seed, s), so a resumed run sees the same batches.
    augment: AugmentParams = field(default_factory=AugmentParams)


@dataclass
class FinetuneResult:
    """The fine-tuned model and its evidence."""

    model: TargetModel
    val_acc: float
    best_step: int
    steps_done: int
    curve: list[dict[str, float]] = field(default_factory=list)
    # The quality gate's evidence (metatransfer.registry.target_quality): validation
    # images, how many the returned model gets right, and the majority-class rate.
    val_n: int = 0
    val_correct: int = 0
    val_chance: float = 1.0


def _learner_backbone(learner: MetaLearner) -> nn.Module:
    initial = getattr(learner, "initial_model", None)
    if not hasattr(learner, "backbone") and callable(initial):
        # Training from scratch: its φ is the seeded random initialisation.
        return initial(learner.n_way).backbone
    backbone = getattr(learner, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"algorithm {learner.name!r} exposes no `backbone` module, so its φ cannot "
            "initialise a target model; exclude it from finetune or add the attribute"
        )
    return backbone


@torch.no_grad()
def _estimate_bn_stats(module: nn.Module, x: torch.Tensor, batch_size: int,
                       forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Cumulative running statistics of every BatchNorm of `module` over `x` (momentum=None).

    `forward` (default: `module` itself) is what runs on `x`, e.g. a target
    model's adapter + backbone for images at the target's own shape.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for i in range(0, len(x), batch_size):
        (forward or module)(x[i : i + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(x))


def init_target_model(
    learner: MetaLearner, train_x: torch.Tensor, train_y: torch.Tensor, class_names: list[str], batch_size: int = 256
) -> TargetModel:
    """A target model whose backbone is the learner's φ and whose head is the prototype classifier.

    Images of another shape than the learner's backbone (a target kept at its
    own channels or size: `prepare.per_dataset`) get an input adapter that
    starts as the fixed conversion (metatransfer/models/adapter.py).

    Raises:
        ConfigError: non-square images, or φ's weights do not fit.
    """
    if train_x.ndim != 4 or train_x.shape[2] != train_x.shape[3]:
        raise ConfigError(f"{learner.name}: target images must be (N, C, S, S), found shape {tuple(train_x.shape)}")
    model = TargetModel(learner.backbone_spec, class_names, learner.name,
                        input_shape=(int(train_x.shape[1]), int(train_x.shape[2])))
    source = _learner_backbone(learner).state_dict()
    # strict=False: a MAML-family backbone has no running-stat buffers; they are estimated below.
    missing, unexpected = model.backbone.load_state_dict(source, strict=False)
    bad = [k for k in missing if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if bad or unexpected:
        raise ConfigError(f"{learner.name}: backbone weights do not fit the target model ({bad[:3]}, {unexpected[:3]})")
    _estimate_bn_stats(model.backbone, train_x, batch_size, forward=model.features)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(train_x[i : i + batch_size]) for i in range(0, len(train_x), batch_size)])
        protos = torch.stack([feats[train_y == c].mean(0) for c in range(len(class_names))])
        model.head.weight.copy_(2 * protos)
        model.head.bias.copy_(-(protos**2).sum(1))
        # Rescale so initial logits are O(1): softmax of raw squared distances is
        # near one-hot and its gradients vanish, which stalls fine-tuning.
        scale = feats.pow(2).sum(1).mean().clamp_min(1e-6)
        model.head.weight.div_(scale)
        model.head.bias.div_(scale)
    return model


def finetune(
    learner: MetaLearner,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor | None,
    val_y: torch.Tensor | None,
    class_names: list[str],
    settings: FinetuneSettings,
    seed: int,
    sink: Callable[[str, float, int], None] | None = None,
    checkpoint: CheckpointConfig | None = None,
) -> FinetuneResult:
    """Fine-tune a target model initialised from `learner`'s φ.

    Args:
        learner: a meta-trained learner (unchanged).
        train_x, train_y: the labelled target images (float [0, 1]) and labels. Images at
            another channel count or size than the learner's backbone get an input adapter
            (`TargetModel`, heterogeneous transfer), trained with the model.
        val_x, val_y: target validation data for early stopping (None: none).
        class_names: target class names in label order.
        settings: steps, lr, batch size, which layers train, patience.
        seed: seeds mini-batch order.
        sink: optional metric logger (name, value, step).
        checkpoint: optional; save every `checkpoint.every` steps and resume
            from the newest matching checkpoint in its folder.

    Returns:
        FinetuneResult with the best-validation model (the last one without val data).

    Raises:
        CheckpointError: the checkpoint to resume from is altered or unsafe.
    """
    if settings.train_layers not in ("all", "head"):
        raise ConfigError(f"finetune.train_layers: must be 'all' or 'head', found {settings.train_layers!r}")
    from metatransfer import runtime

    emit = sink or (lambda *a: None)
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same batches on every device
    device = torch.device(settings.device)
    learner_device = next((p.device for p in learner.parameters()), torch.device("cpu"))
    if learner_device.type != "cpu":  # the prototype initialisation below runs on CPU tensors
        learner = copy.deepcopy(learner).cpu()
    model = init_target_model(learner, train_x, train_y, class_names).to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    if val_x is not None and val_y is not None:
        val_x, val_y = val_x.to(device), val_y.to(device)
    # "head" keeps φ fixed; an input adapter (heterogeneous target) is not φ and trains with the head.
    head_params = list(model.head.parameters()) + (list(model.adapter.parameters()) if model.adapter is not None else [])
    params = head_params if settings.train_layers == "head" else list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    has_val = val_x is not None and val_y is not None and len(val_x) > 0
    best_acc = accuracy(model, val_x, val_y) if has_val else -1.0
    best_state, best_step, bad_evals = copy.deepcopy(model.state_dict()), 0, 0
    curve = [{"step": 0, "val_acc": best_acc}] if has_val else []
    step, stopped = 0, False
    resumed = load_latest(checkpoint) if checkpoint is not None else None
    if resumed is not None:
        st = resumed.state
        model.load_state_dict(st["model"])
        load_optimizer_state(optimizer, st["optimizer"])
        best_state, best_acc, best_step, bad_evals = st["best"], float(st["best_acc"]), int(st["best_step"]), int(st["bad_evals"])
        curve, step, stopped = list(st["curve"]), int(st["step"]), bool(st["stopped"])
        gen.set_state(st["generator"])
        set_rng_state(st["rng"])
        log.info("%s: fine-tuning resumed from %s (step %d)", learner.name, resumed.path, step)
    elif has_val:
        emit("finetune/val_acc", best_acc, 0)

    def snapshot() -> None:
        if checkpoint is None:
            return
        save_checkpoint(checkpoint, step, {
            "model": model.state_dict(), "optimizer": optimizer_state(optimizer), "best": best_state,
            "best_acc": best_acc, "best_step": best_step, "bad_evals": bad_evals, "curve": curve,
            "step": step, "stopped": stopped, "generator": gen.get_state(), "rng": rng_state(),
        })

    loss_fn = nn.CrossEntropyLoss()
    while not stopped and step < settings.steps:
        model.train()
        if settings.train_layers == "head":
            model.backbone.eval()  # keep φ's statistics when only the head trains
        idx = torch.randint(len(train_x), (min(settings.batch_size, len(train_x)),), generator=gen).to(device)
        x = train_x[idx]
        if settings.augment.enabled:
            aug_gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            x = augment_batch(x.cpu(), settings.augment, aug_gen).to(device)
        with runtime.autocast(device, settings.precision):
            loss = loss_fn(model(x), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        emit("finetune/loss", loss.item(), step)
        if has_val and (step % settings.eval_every == 0 or step == settings.steps):
            acc = accuracy(model, val_x, val_y)
            curve.append({"step": step, "val_acc": acc})
            emit("finetune/val_acc", acc, step)
            if acc > best_acc:
                best_acc, best_step, bad_evals = acc, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_evals += 1
                if settings.patience and bad_evals >= settings.patience:
                    log.info("%s: early stop at step %d (best %.4f at %d)", learner.name, step, best_acc, best_step)
                    stopped = True
        if checkpoint is not None and checkpoint.every > 0 and step % checkpoint.every == 0 and not stopped:
            snapshot()
    if not (resumed is not None and resumed.state["stopped"]):
        stopped = True
        snapshot()  # the finished state: a re-run after a later kill does no steps again
    if has_val:
        model.load_state_dict(best_state)
    else:
        best_step = step
    model.eval()
    result = FinetuneResult(model, best_acc, best_step, step, curve)
    if has_val:
        from metatransfer.quality import majority_rate

        result.val_n = int(len(val_y))
        result.val_correct = int(round(best_acc * result.val_n))
        result.val_chance = majority_rate(val_y.cpu().numpy())
    return result


def select_method(val_accs: dict[str, float], force: str = "") -> tuple[str, str]:
    """Pick the method with the best target validation accuracy (ties: first listed).

    Returns:
        (method, reason). `force` overrides the choice but is still reported with the evidence.
    """
    if not val_accs:
        raise ConfigError("finetune: no method produced a target model; check meta_train.algorithms")
    if force:
        if force not in val_accs:
            raise ConfigError(f"finetune.force_method: {force!r} is not among the fine-tuned methods {sorted(val_accs)}")
        return force, f"forced by finetune.force_method (val acc {val_accs[force]:.4f}; best was {max(val_accs, key=val_accs.get)})"
    best = max(val_accs, key=lambda k: val_accs[k])
    ranked = ", ".join(f"{k} {v:.4f}" for k, v in sorted(val_accs.items(), key=lambda kv: -kv[1]))
    return best, f"highest target validation accuracy ({ranked})"

