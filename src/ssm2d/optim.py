"""Optimizer parameter groups that honour per-parameter `_optim` tags."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .models.retrofit import spatial_layers

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float, spatial_lr: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim` constructors.

    A parameter tagged with `_optim` (for example the SSM coefficients, tagged
    ``{"weight_decay": 0.0}``) goes to a group with those settings. Untagged parameters with
    at most one dimension (biases, norms), and those the model names in its timm-style
    `no_weight_decay()` (position embeddings, class tokens), get no weight decay, as in timm;
    the rest get `weight_decay`.

    With `spatial_lr`, the parameters of the spatial layers inserted by `add_spatial_layers`
    (the new ones when a pretrained backbone is fine-tuned) go to groups with that "lr"; the
    others keep the optimizer's default learning rate.
    """
    if spatial_lr is not None and not spatial_lr > 0:
        raise ValueError(f"spatial_lr: expected None or a number > 0, got {spatial_lr!r}")
    spatial = set()
    if spatial_lr is not None:
        spatial = {id(p) for layer in spatial_layers(model) for p in layer.parameters()}
    no_decay_fn = getattr(model, "no_weight_decay", None)
    no_decay = set(no_decay_fn()) if callable(no_decay_fn) else set()
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        settings = getattr(p, "_optim", None)
        if settings is None:
            skip = p.ndim <= 1 or name in no_decay
            settings = {"weight_decay": 0.0 if skip else weight_decay}
        if id(p) in spatial:
            settings = {**settings, "lr": spatial_lr}
        key = tuple(sorted(settings.items()))
        groups.setdefault(key, {"params": [], **settings})["params"].append(p)
    return list(groups.values())
