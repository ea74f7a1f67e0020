"""Mamba's step sizes for CPU tensors: the low-rank dt_proj, its bias and softplus in one numba pass.

Glossary: M rows (sequences x steps), R = dt_rank, E channels, TR rows per backward block.

    p = x W^T + bias,   delta = softplus(p)          x (M, R), W (E, R), bias (E,)

Why: at Vim's shapes (M = 64 x 50, R = 4, E = 128) the rank-4 matrix product runs far below
matmul speed (K = 4 is too short for a GEMM kernel), and the bias add, softplus and its backward
(sigmoid, product) are four more passes over (M, E). Fused, the forward is one pass that writes
delta channels-last, (M, E), the layout the fused selective scan reads; the backward recomputes
p (R multiply-adds per element) and writes the gradients of x, W and bias in one more pass.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .fast_exp import fast_exp, fast_softplus
from .first_order import first_order_only
from .numba_arrays import FASTMATH, as_array, use_torch_threads

__all__ = ["fused_step_sizes"]

# TR: rows per parallel block of the backward, each with its own (R, E) and (E,) partial sums.
_BACKWARD_ROWS = 256


@numba.njit(inline="always", fastmath=FASTMATH)
def _pre_activation(xr, wt, bias, p):
    """p (E,) = bias + sum_r xr[r] wt[r] for one row xr (R,); wt (R, E)."""
    p[:] = bias
    for r in range(wt.shape[0]):
        xv, wr = xr[r], wt[r]
        for e in range(p.shape[0]):
            p[e] += xv * wr[e]


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_kernel(x, wt, bias, out):
    """out (M, E) = softplus(x wt + bias); x (M, R), wt (R, E), bias (E,)."""
    for m in numba.prange(x.shape[0]):
        o = out[m]
        _pre_activation(x[m], wt, bias, o)
        for e in range(o.shape[0]):
            o[e] = fast_softplus(o[e])


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backward_kernel(x, wt, bias, TR, gout, gx, gw_items, gbias_items):
    """gx (M, R); gw_items (K, R, E) and gbias_items (K, E), one slice per block of TR rows
    (K = ceil(M / TR)); from the upstream gradient gout (M, E)."""
    n_rows, rank = x.shape
    width = wt.shape[1]
    blocks = (n_rows + TR - 1) // TR
    for blk in numba.prange(blocks):
        gp = np.empty(width, dtype=x.dtype)  # dL/dp of a row
        gw, gbias = gw_items[blk], gbias_items[blk]
        gw[:, :] = 0
        gbias[:] = 0
        for m in range(blk * TR, min(n_rows, blk * TR + TR)):
            _pre_activation(x[m], wt, bias, gp)
            go = gout[m]
            for e in range(width):
                gp[e] = go[e] / (1 + fast_exp(-gp[e]))  # softplus' = sigmoid
                gbias[e] += gp[e]
            xr, gxr = x[m], gx[m]
            for r in range(rank):
                wr, gwr, xv = wt[r], gw[r], xr[r]
                s = xv * 0  # zero of the input's dtype
                for e in range(width):
                    s += gp[e] * wr[e]
                    gwr[e] += gp[e] * xv
                gxr[r] = s


class _FusedStepSizes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, R)
        wt = weight.t().contiguous()  # (R, E)
        out = x.new_empty(rows.shape[0], weight.shape[0])  # (M, E)
        use_torch_threads()
        _forward_kernel(rows.numpy(), wt.numpy(), as_array(bias, x, 1), out.numpy())
        ctx.save_for_backward(rows, wt, bias)
        ctx.lead = x.shape[:-1]
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @first_order_only("step_sizes (fused CPU kernel)")
    def backward(ctx, gout: Tensor):
        rows, wt, bias = ctx.saved_tensors
        blocks = -(-rows.shape[0] // _BACKWARD_ROWS)
        gx = torch.empty_like(rows)
        gw, gbias = rows.new_empty(blocks, *wt.shape), rows.new_empty(blocks, wt.shape[1])
        use_torch_threads()
        _backward_kernel(
            rows.numpy(), wt.numpy(), bias.detach().numpy(), _BACKWARD_ROWS,
            gout.reshape(-1, wt.shape[1]).contiguous().numpy(), gx.numpy(), gw.numpy(), gbias.numpy(),
        )  # fmt: skip
        return gx.view(*ctx.lead, wt.shape[0]), gw.sum(0).t(), gbias.sum(0)


def fused_step_sizes(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """softplus(x W^T + bias) by the fused kernels: x (..., R), weight (E, R), bias (E,) -> (..., E).

    CPU tensors of one dtype, float32 or float64; x of any strides (rows are gathered into an
    (M, R) copy, small next to the output). The output is contiguous, (..., E).
    """
    return _FusedStepSizes.apply(x, weight, bias)
