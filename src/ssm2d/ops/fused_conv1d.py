"""Causal depthwise conv1d for CPU tensors: numba kernels for the forward and backward pass.

Glossary: B batch, D channels, L sequence length, W kernel width.

The sum of `ssm2d.ops.causal_conv1d` with the bias and SiLU fused in::

    p_t = bias + sum_{k < W} weight[k] x_{t - (W - 1) + k},    y_t = silu(p_t) (or p_t)

Each (batch, channel) row is one loop over t, the rows in parallel. The backward recomputes
p_t (W multiply-adds) rather than storing it, and writes the weight and bias gradients per row,
summed over the batch afterwards.

Why: `F.conv1d` with groups=D is fast forward, but its backward goes through the generic
`convolution_backward`, which in a `vit_mini_28_v2m` training step (batch 64) took 12 % of
the time, twice the selective scan's forward (torch.profiler, after the scan was fused).
Forward + backward with SiLU, this path against `F.conv1d` + `F.silu` with autograd, medians of
15 alternating repetitions on 2 loaded cores: 0.25x the time at (B, D, L) = (448, 32, 7),
0.38x at (1792, 32, 7) (a V2M pass of `v2m_mini_28` at batch 64) and 0.89x at (64, 128, 50)
(a Vim direction of `vim_mini_28`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .fast_exp import fast_exp
from .first_order import first_order_only
from .numba_arrays import as_array, use_torch_threads

__all__ = ["fused_causal_conv1d"]


@numba.njit(inline="always")
def _pre_activation(x, weight, bias, has_bias, b, d, t):
    width = weight.shape[1]
    acc = bias[d] if has_bias else x[b, d, t] * 0
    for k in range(width):
        s = t - (width - 1) + k
        if s >= 0:
            acc += weight[d, k] * x[b, d, s]
    return acc


@numba.njit(parallel=True, cache=True)
def _forward_kernel(x, weight, bias, has_bias, silu, out):
    """out (B, D, L) from x (B, D, L), weight (D, W), bias (D,) (empty when not has_bias)."""
    nb, nd, length = x.shape
    for row in numba.prange(nb * nd):
        b, d = row // nd, row % nd
        for t in range(length):
            p = _pre_activation(x, weight, bias, has_bias, b, d, t)
            out[b, d, t] = p / (1 + fast_exp(-p)) if silu else p


@numba.njit(parallel=True, cache=True)
def _backward_kernel(x, weight, bias, has_bias, silu, gout, gx, gw_rows, gbias_rows):
    """gx (B, D, L), gw_rows (B, D, W), gbias_rows (B, D) from the upstream gradient gout (B, D, L)."""
    nb, nd, length = x.shape
    width = weight.shape[1]
    for row in numba.prange(nb * nd):
        b, d = row // nd, row % nd
        gp = np.empty(length, dtype=x.dtype)  # dL/dp_t
        gbias = 0.0
        for t in range(length):
            g = gout[b, d, t]
            if silu:
                p = _pre_activation(x, weight, bias, has_bias, b, d, t)
                sig = 1 / (1 + fast_exp(-p))
                g = g * sig * (1 + p * (1 - sig))
            gp[t] = g
            gbias += g
        for k in range(width):
            shift = width - 1 - k  # tap k reads x_{t - shift}
            acc = 0.0
            for t in range(shift, length):
                acc += gp[t] * x[b, d, t - shift]
            gw_rows[b, d, k] = acc
        for s in range(length):
            acc = 0.0
            for k in range(width):
                t = s + width - 1 - k
                if t < length:
                    acc += weight[d, k] * gp[t]
            gx[b, d, s] = acc
        gbias_rows[b, d] = gbias


class _FusedCausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        out = torch.empty_like(x)
        use_torch_threads()
        _forward_kernel(as_array(x, x, 3), as_array(weight, x, 2), as_array(bias, x, 1), bias is not None, silu, out.numpy())
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return out

    @staticmethod
    @first_order_only("causal_conv1d (fused CPU kernel)")
    def backward(ctx, gout: Tensor):
        x, weight, bias = ctx.saved_tensors
        gx = torch.empty_like(x)
        gw_rows, gbias_rows = x.new_empty(*x.shape[:2], weight.shape[1]), x.new_empty(x.shape[:2])
        use_torch_threads()
        _backward_kernel(
            as_array(x, x, 3), as_array(weight, x, 2), as_array(bias, x, 1), bias is not None, ctx.silu,
            as_array(gout, x, 3), gx.numpy(), gw_rows.numpy(), gbias_rows.numpy(),
        )  # fmt: skip
        return gx, gw_rows.sum(0), gbias_rows.sum(0) if bias is not None else None, None


def fused_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """The fused causal depthwise conv1d: x (B, D, L), weight (D, W), bias (D,) or None -> (B, D, L).

    CPU tensors of one dtype, float32 or float64, with L >= 1.
    """
    return _FusedCausalConv1d.apply(x, weight, bias, silu)
