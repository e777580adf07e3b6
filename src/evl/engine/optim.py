"""AdamW parameter groups and the warmup + half-period cosine learning-rate schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Parameters whose name (trailing list indices dropped) ends with one of these are embeddings or queries:
# decaying them pulls learned positions and the query towards zero, which is not regularisation.
NO_DECAY_SUFFIXES = ("query", "embed", "embedding", "token")


def _base_name(name: str) -> str:
    """``decoder.temporal_pos_embed.3`` -> ``temporal_pos_embed``: ParameterList entries end in an index."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def wants_weight_decay(
    name: str,
    param: torch.Tensor,
    no_decay_1d: bool = True,
    no_decay_names: Iterable[str] = (),
) -> bool:
    """Whether ``param`` should be weight-decayed: matrices yes; biases, norm weights (1-D), embeddings and
    queries (by name) and the names in ``no_decay_names`` no."""
    if name in set(no_decay_names):
        return False
    if no_decay_1d and param.ndim <= 1:
        return False
    return not _base_name(name).endswith(NO_DECAY_SUFFIXES)


def _lr_scale_for(name: str, lr_scale: Mapping[str, float]) -> float:
    """Multiplier of the longest prefix of ``name`` in ``lr_scale`` (1.0 when none matches)."""
    matches = [prefix for prefix in lr_scale if name == prefix or name.startswith(prefix.rstrip(".") + ".")]
    return float(lr_scale[max(matches, key=len)]) if matches else 1.0


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_1d: bool = True,
    lr_scale: Mapping[str, float] | None = None,
    decay_all: bool = False,
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable (``requires_grad``) parameters of ``model``.

    Args:
        weight_decay: decay of the decayed group; the others get 0.
        no_decay_1d: exclude 1-D parameters (biases, norm weights) from decay.
        lr_scale: name prefix -> learning-rate multiplier (longest prefix wins), e.g. ``{"mit": 10.0}``;
            each group carries its multiplier as ``lr_scale`` and :func:`build_optimizer` /
            :func:`build_scheduler` apply it.
        decay_all: decay every parameter, as the official EVL does.

    A model may list more exempt names in a ``no_weight_decay()`` method (the timm convention).
    Groups hold ``params``, ``param_names``, ``weight_decay`` and ``lr_scale``, in first-seen order so
    that the layout is the same on every run (an optimizer state dict depends on it).
    """
    # NOTE(ref): the official EVL decays all trainable parameters, LayerNorms, biases and the query
    # included; that is a pitfall, so it is opt-in here (decay_all=True) rather than the default.
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decay_all or wants_weight_decay(name, param, no_decay_1d, exempt)
        scale = _lr_scale_for(name, lr_scale or {})
        group = groups.setdefault(
            (scale, decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_all: bool = False,
    lr_scale: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW (:func:`adamw`) over :func:`param_groups`; each group's ``lr`` is ``lr * lr_scale``."""
    groups = param_groups(model, weight_decay, lr_scale=lr_scale, decay_all=decay_all)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return adamw(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: dense floating tensors on CPU (torch >=
    2.4) or CUDA."""
    params = list(params)
    cpu_ok = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 4)
    return bool(params) and all(
        p.is_floating_point() and not p.is_sparse and (p.is_cuda or (p.device.type == "cpu" and cpu_ok))
        for p in params
    )


def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where available: one pass over each parameter, its gradient
    and both moments instead of a dozen (the EVL decoder's 33 M parameters: 14 ms instead of 43 ms per step
    on 2 CPU cores). Results agree with the default implementation to rounding."""
    params = [p for group in groups for p in group["params"]]
    return torch.optim.AdamW(groups, fused=fused_adamw_supported(params), **kwargs)


def allocate_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an AdamW optimiser's moments now, exactly as its first step would leave a fresh optimiser.

    torch creates them lazily, inside the first step: in CPU memory that the first forward and backward
    have just freed, so the next step's activations have to go above them (about 30 MB more peak memory
    for the frozen ViT-B/16 decoder at batch 2). One step at learning rate 0 on zero gradients creates
    them without changing a parameter (AdamW's moments of zero gradients are zero); its step count is then
    reset, so training goes on exactly as from a fresh optimiser. No-op for an optimiser that has state
    (a resumed one) or is not AdamW.
    """
    if not isinstance(optimizer, torch.optim.AdamW) or optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is None]
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
            group["lr"] = lr
        for param in params:
            param.grad = None
    for state in optimizer.state.values():
        if torch.is_tensor(state["step"]):
            state["step"].zero_()
        else:
            state["step"] = 0


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at ``step``: linear warmup from 0 over ``warmup_steps``, then a half-period cosine from
    ``base_lr`` down to ``min_lr`` at ``total_steps`` (and ``min_lr`` after).

    With no warmup this is ``CosineAnnealingLR(T_max=total_steps, eta_min=min_lr)`` stepped every
    iteration, the official EVL schedule.
    """
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"lr_at: need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and > 0"
        )
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class CosineSchedule:
    """Learning-rate multiplier for :class:`torch.optim.lr_scheduler.LambdaLR` (see :func:`lr_at`).

    A plain object rather than a lambda, so ``LambdaLR.state_dict()`` saves its fields and a resumed run
    continues the schedule it started with.
    """

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, 1.0, self.warmup_steps, self.min_lr_ratio)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warmup + cosine schedule; call ``scheduler.step()`` after every optimizer step.

    The multiplier applies to each group's initial ``lr``, which already includes its ``lr_scale``
    (:func:`build_optimizer`), so scaled groups keep their ratio, and each decays to
    ``min_lr_ratio`` times its own peak.
    """
    schedule = CosineSchedule(total_steps, warmup_steps, min_lr_ratio)
    schedule(0)  # validate the arguments now rather than at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
