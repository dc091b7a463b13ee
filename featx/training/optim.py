"""Optimizer, parameter groups and learning-rate schedule of a training phase, built with timm's factories.

- parameter groups: timm's ``param_groups_weight_decay`` (no decay on biases and norm scales) per layer group, each
  tagged with an ``lr_scale`` (layer-wise decay: the head 1, the top group ``decay``, the next ``decay**2``, ...);
- optimizer: timm's ``create_optimizer_v2`` (``adamw``; ``sgd`` is Nesterov SGD in timm's registry);
- schedule: timm's ``CosineLRScheduler`` stepped per optimizer step: linear warm-up from 0, then cosine down to 1% of
  the peak. timm's scheduler multiplies each group's ``lr_scale`` in, so one schedule drives every group.

Why featx's own layer groups rather than ``create_optimizer_v2(model, layer_decay=...)``: timm's layer decay needs a
timm model with ``group_matcher`` (torchvision backbones have none: timm then puts every parameter in one layer) and
groups each block separately (18 layers on EfficientNet-Lite0 instead of its 9 stages, so ``0.7 ** depth`` would all
but freeze the stem). ``Backbone.layer_groups()`` gives the same stages for every backbone source, and
``--unfreeze N`` counts them.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

OPTIMIZERS = {"adamw": "adamw", "sgd": "sgd"}  # featx name -> timm registry name (timm's "sgd" is Nesterov)


class _Holder(nn.Module):
    """A view of some modules and loose parameters as one module, for timm's group functions (nothing is copied)."""

    def __init__(self, items: Iterable):
        super().__init__()
        items = list(items)
        self.mods = nn.ModuleList([m for m in items if isinstance(m, nn.Module)])
        self.loose = nn.ParameterList([p for p in items if isinstance(p, nn.Parameter)])


def param_groups(parts: Iterable, weight_decay: float, lr_scale: float = 1.0, seen: set | None = None) -> list:
    """Trainable parameters of ``parts`` (modules or parameters) -> timm decay/no-decay groups with ``lr_scale``.

    ``seen`` (ids of parameters already grouped) keeps a parameter shared by two parts in the first group only.
    """
    from timm.optim import param_groups_weight_decay

    seen = set() if seen is None else seen
    out = []
    for g in param_groups_weight_decay(_Holder(parts), weight_decay=weight_decay):
        params = [p for p in g["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append({**g, "params": params, "lr_scale": lr_scale})
    return out


def layer_decay_groups(head: nn.Module, layers: list, unfreeze: int, decay: float, weight_decay: float) -> list:
    """Unfreeze ``head`` and the top ``unfreeze`` of ``layers`` (bottom to top); deeper layers learn slower.

    Every other parameter of the model is expected frozen by the caller.
    """
    seen: set = set()
    for p in head.parameters():
        p.requires_grad_(True)
    groups = param_groups([head], weight_decay, 1.0, seen)
    top = layers[len(layers) - unfreeze:] if unfreeze else []
    for depth, layer in enumerate(reversed(top), start=1):
        for part in layer:
            for p in (part.parameters() if isinstance(part, nn.Module) else [part]):
                if id(p) not in seen:
                    p.requires_grad_(True)
        groups += param_groups(layer, weight_decay, decay ** depth, seen)
    return groups


def make_optimizer(groups: list, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    """timm's optimizer factory over explicit parameter groups (each keeps its own weight decay and lr_scale)."""
    from timm.optim import create_optimizer_v2

    # every group starts at ``lr`` (its ``initial_lr``); the scheduler sets ``lr * schedule * lr_scale`` before each step
    return create_optimizer_v2(groups, opt=OPTIMIZERS[name], lr=lr, weight_decay=weight_decay, momentum=momentum)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float, peak_lr: float):
    """Per-step warm-up + cosine: call ``step_update(k + 1)`` before the k-th optimizer step of the phase (k from 0).

    With warm-up over ``w = round(warmup * total)`` steps (at least 1 when ``warmup > 0``) the factor is ``(k+1)/w``
    during warm-up, then cosine from 1 to 0.01 at the phase's last step.
    """
    import logging

    from timm.scheduler import CosineLRScheduler

    warm = max(1, int(round(warmup * total_steps))) if warmup > 0 else 0
    # timm warns that a one-step cosine "has no effect"; on a tiny folder a one-step phase is expected, not a mistake
    quiet = logging.getLogger("timm.scheduler.cosine_lr")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warm), lr_min=0.01 * peak_lr,
                                 warmup_t=warm, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    finally:
        quiet.setLevel(level)
