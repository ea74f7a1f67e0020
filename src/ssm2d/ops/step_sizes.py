"""Mamba's input-dependent step sizes (Gu & Dao 2023, section 3.6; docs/math.md §9).

Glossary: R = dt_rank, E channels.

From the low-rank projection x (the first R outputs of x_proj) per token::

    delta = softplus(dt_proj(x)) = softplus(x W^T + bias),      W (E, R), bias (E,)

the step sizes of the selective scan (which then takes them with no bias and no softplus).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_step_sizes import fused_step_sizes

__all__ = ["step_sizes", "step_sizes_ref"]


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {t!r:.80}")
    if x.ndim < 1:
        raise ValueError("x: expected (..., R), got a 0-d tensor")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected (E, R) with R={x.shape[-1]}, got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected ({weight.shape[0]},), got {tuple(bias.shape)}")


def step_sizes_ref(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """softplus(x W^T + bias) in torch: x (..., R), weight (E, R), bias (E,) -> (..., E), in the
    promoted dtype of the three."""
    _check_inputs(x, weight, bias)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    return F.softplus(F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype)))


def step_sizes(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`step_sizes_ref` computed fast (same arguments and result).

    CPU tensors of one dtype, float32 or float64, run the fused numba kernels
    (`ssm2d.ops.fused_step_sizes`: one pass forward, one backward); other inputs the torch ops.
    """
    _check_inputs(x, weight, bias)
    dtype = x.dtype
    fused_ok = x.device.type == "cpu" and dtype in (torch.float32, torch.float64) and x.numel() > 0
    if fused_ok and weight.dtype == dtype and bias.dtype == dtype:
        return fused_step_sizes(x, weight, bias)
    return step_sizes_ref(x, weight, bias)
