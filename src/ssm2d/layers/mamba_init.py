"""Mamba-style initialisation of the selective-SSM parameters (Gu & Dao 2023, arXiv 2312.00752).

Shared by every layer built on `ssm2d.ops.selective_scan` (Vim, V2M). Spec section 2.1,
"Initialisation (Mamba defaults)".
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .tagged import NO_WEIGHT_DECAY

__all__ = ["init_dt_proj", "s4d_real_a_log"]


@torch.no_grad()
def init_dt_proj(
    dt_proj: nn.Linear,
    dt_rank: int,
    dt_min: float = 1e-3,
    dt_max: float = 0.1,
    dt_init_floor: float = 1e-4,
) -> None:
    """Initialise the step-size projection (dt_rank -> d_inner) in place.

    The weight is uniform in +-dt_rank**-0.5, so the projected low-rank input has unit-order
    variance. The bias is softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at
    `dt_init_floor`, so that softplus(bias) starts at a spread of time scales (Gu & Dao 2023,
    section 3.6). The bias is tagged ``_optim = {"weight_decay": 0.0}``.

    Args:
        dt_proj: the Linear(dt_rank, d_inner) layer, with a bias.
        dt_rank: its input width.
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        dt_init_floor: lower clamp of the sampled step sizes.
    """
    if not isinstance(dt_proj, nn.Linear) or dt_proj.bias is None:
        raise ValueError(f"dt_proj: expected an nn.Linear with a bias, got {dt_proj!r}")
    if dt_proj.in_features != dt_rank:
        raise ValueError(f"dt_rank: expected dt_proj.in_features={dt_proj.in_features}, got {dt_rank}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    if dt_init_floor <= 0:
        raise ValueError(f"dt_init_floor: expected > 0, got {dt_init_floor}")
    bound = dt_rank**-0.5
    dt_proj.weight.uniform_(-bound, bound)
    u = torch.rand(dt_proj.out_features, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    inv_softplus = dt + torch.log(-torch.expm1(-dt))  # softplus(inv_softplus) == dt
    dt_proj.bias.copy_(inv_softplus.to(dt_proj.bias.dtype))
    dt_proj.bias._optim = NO_WEIGHT_DECAY


def s4d_real_a_log(d_inner: int, d_state: int) -> torch.Tensor:
    """log(-A) for the S4D-Real initialisation A_n = -n, n = 1..N (Gu et al. 2022, "S4D").

    Returns:
        A float32 tensor of shape (d_inner, d_state): row d is log(1), ..., log(N). Wrap it in an
        nn.Parameter and use A = -exp(A_log).
    """
    if d_inner < 1 or d_state < 1:
        raise ValueError(f"d_inner, d_state: expected >= 1, got {d_inner}, {d_state}")
    a = torch.arange(1, d_state + 1, dtype=torch.float32)
    return torch.log(a).repeat(d_inner, 1)  # (D, N)
