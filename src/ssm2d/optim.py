"""Optimizer parameter groups that honour per-parameter `_optim` tags."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups for `torch.optim` constructors.

    A parameter tagged with `_optim` (for example the SSM coefficients, tagged
    ``{"weight_decay": 0.0}``) goes to a group with those settings. Untagged parameters with
    at most one dimension (biases, norms) get no weight decay, as in timm; the rest get
    `weight_decay`.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        settings = getattr(p, "_optim", None)
        if settings is None:
            settings = {"weight_decay": 0.0 if p.ndim <= 1 else weight_decay}
        key = tuple(sorted(settings.items()))
        groups.setdefault(key, {"params": [], **settings})["params"].append(p)
    return list(groups.values())
