"""Causal depthwise conv1d for CPU tensors: numba kernels for the forward and backward pass.

Glossary: B batch, D channels, L sequence length, W kernel width, TC steps per backward chunk.

The sum of `ssm2d.ops.causal_conv1d` with the bias and SiLU fused in::

    p_t = bias + sum_{k < W} weight[k] x_{t - (W - 1) + k},    y_t = silu(p_t) (or p_t)

Channels last: the kernels work on (B, L, D), where a step is one contiguous row of D channels
and every inner loop runs over the channels (vectorised). That is the layout Mamba's in_proj
produces and the fused selective scan reads, so a mixer passes it through without a copy. The
forward runs the B x L steps in parallel. The backward runs blocks of TC steps in parallel: it
recomputes p_t (W multiply-adds) rather than storing it, and writes the weight and bias
gradients per block, summed afterwards.

Why: `F.conv1d` with groups=D is fast forward, but its backward goes through the generic
`convolution_backward`, which in a `vit_mini_28_v2m` training step (batch 64) took 12 % of
the time, twice the selective scan's forward (torch.profiler, after the scan was fused).
Forward + backward with SiLU against `F.conv1d` + `F.silu` with autograd, on contiguous
(B, D, L) inputs (so this path pays a transposing copy), medians of 15 repetitions on 2 quiet
cores, float32: 0.41x the time at (B, D, L) = (64, 128, 49) (a Vim direction at batch 64),
0.36x at (448, 32, 7), 0.20x at (1792, 32, 7) (a V2M pass of `v2m_mini_28`) and 0.59x at
(2, 192, 3136). The first kernel, one scalar loop over t per (batch, channel) row, took 1.44x
and 1.98x of `F.conv1d` at the first and last shapes.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .fast_exp import fast_exp
from .first_order import first_order_only
from .numba_arrays import FASTMATH, as_array, position, use_torch_threads

__all__ = ["fused_causal_conv1d"]


# TC: steps per parallel block of the backward; each block recomputes W - 1 steps of the next.
_BACKWARD_STEPS = 64


@numba.njit(inline="always", fastmath=FASTMATH)
def _pre_activation(x, weight, bias, has_bias, reverse, b, t, p):
    """p (D,) = bias + the causal sum at step t of batch row b."""
    width, length = weight.shape[0], x.shape[1]
    if has_bias:
        p[:] = bias
    else:
        p[:] = 0
    for k in range(width):
        s = t - (width - 1) + k
        if s >= 0:
            xs, wk = x[b, position(s, length, reverse)], weight[k]
            for j in range(p.shape[0]):
                p[j] += wk[j] * xs[j]


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_kernel(x, weight, bias, has_bias, silu, reverse, out):
    """out (B, L, D) from x (B, L, D), weight (W, D), bias (D,) (empty when not has_bias);
    `reverse`: step t is position L - 1 - t (the anti-causal convolution)."""
    nb, length, nd = x.shape
    for item in numba.prange(nb * length):
        b, t = item // length, item % length
        p = out[b, position(t, length, reverse)]
        _pre_activation(x, weight, bias, has_bias, reverse, b, t, p)
        if silu:
            for j in range(nd):
                p[j] = p[j] / (1 + fast_exp(-p[j]))


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backward_kernel(x, weight, bias, has_bias, silu, reverse, TC, gout, gx, gw_items, gbias_items):
    """gx (B, L, D); gw_items (B K, W, D) and gbias_items (B K, D), one slice per block of TC
    steps (K = ceil(L / TC)); from the upstream gradient gout (B, L, D)."""
    nb, length, nd = x.shape
    width = weight.shape[0]
    chunks = (length + TC - 1) // TC
    for item in numba.prange(nb * chunks):
        b, c = item // chunks, item % chunks
        t0, t1 = c * TC, min(length, c * TC + TC)
        t2 = min(length, t1 + width - 1)  # gx at the block's last steps reads gp up to t1 + W - 2
        gp = np.empty((t2 - t0, nd), dtype=x.dtype)  # dL/dp_t, t0 <= t < t2
        for t in range(t0, t2):
            g = gp[t - t0]
            go = gout[b, position(t, length, reverse)]
            if silu:
                _pre_activation(x, weight, bias, has_bias, reverse, b, t, g)
                for j in range(nd):
                    sig = 1 / (1 + fast_exp(-g[j]))
                    g[j] = go[j] * sig * (1 + g[j] * (1 - sig))
            else:
                g[:] = go
        gw, gbias = gw_items[item], gbias_items[item]
        gw[:, :] = 0
        gbias[:] = 0
        for t in range(t0, t1):
            g = gp[t - t0]
            for j in range(nd):
                gbias[j] += g[j]
            for k in range(width):
                s = t - (width - 1) + k  # tap k at step t reads x_s
                if s >= 0:
                    xs, gwk = x[b, position(s, length, reverse)], gw[k]
                    for j in range(nd):
                        gwk[j] += g[j] * xs[j]
        for s in range(t0, t1):
            gxs = gx[b, position(s, length, reverse)]
            gxs[:] = 0
            for k in range(width):
                t = s + width - 1 - k  # x_s feeds p_t through tap k
                if t < t2:
                    g, wk = gp[t - t0], weight[k]
                    for j in range(nd):
                        gxs[j] += wk[j] * g[j]


class _FusedCausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, reverse: bool) -> Tensor:
        xl = x.transpose(1, 2).contiguous()  # (B, L, D); no copy when x is a channels-last view
        wl = weight.t().contiguous()  # (W, D)
        out = torch.empty_like(xl)
        use_torch_threads()
        _forward_kernel(xl.numpy(), wl.numpy(), as_array(bias, x, 1), bias is not None, silu, reverse, out.numpy())
        ctx.save_for_backward(xl, wl, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return out.transpose(1, 2)

    @staticmethod
    @first_order_only("causal_conv1d (fused CPU kernel)")
    def backward(ctx, gout: Tensor):
        xl, wl, bias = ctx.saved_tensors
        nb, length, nd = xl.shape
        items = nb * -(-length // _BACKWARD_STEPS)
        gx = torch.empty_like(xl)
        gw, gbias = xl.new_empty(items, *wl.shape), xl.new_empty(items, nd)
        use_torch_threads()
        _backward_kernel(
            xl.numpy(), wl.numpy(), as_array(bias, xl, 1), bias is not None, ctx.silu, ctx.reverse, _BACKWARD_STEPS,
            gout.transpose(1, 2).contiguous().numpy(), gx.numpy(), gw.numpy(), gbias.numpy(),
        )  # fmt: skip
        return gx.transpose(1, 2), gw.sum(0).t(), gbias.sum(0) if bias is not None else None, None, None


def fused_causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, reverse: bool = False) -> Tensor:
    """The fused causal depthwise conv1d: x (B, D, L), weight (D, W), bias (D,) or None -> (B, D, L).

    `reverse`: the same convolution along the reversed sequence (tap k reads x_{t + W - 1 - k}),
    without flipping x and the output.

    CPU tensors of one dtype, float32 or float64, with L >= 1, of any strides: x is read
    channels-last (a copy unless x is a transposed (B, L, D) tensor, as Mamba's in_proj gives);
    the output and x's gradient are transposed views of (B, L, D) tensors.
    """
    return _FusedCausalConv1d.apply(x, weight, bias, silu, reverse)
