"""Fused selective scan for CPU tensors: numba kernels for the forward and backward pass.

Glossary: B batch, D channels, L sequence length, N state size, G groups of B/C, T steps per
checkpoint chunk, K = ceil(L / T) chunks, W lanes (channels per block), P = D / W blocks.

The recurrence of `ssm2d.ops.selective_scan` (Gu & Dao 2023, section 3) from the step sizes
delta_t (bias and softplus applied by the caller, in torch), with the D skip and the silu(z)
gate fused in::

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t)

Layout. The kernels vectorise over channels, not states: a block of W channels that share one
group of B and one of C runs as W lanes, its state an (N, W) array, and the innermost loops run
over the lanes (no reduction over N: y_t accumulates lane by lane). The inputs are taken
channels-last, (B, L, P, W), so that a step of a block is one contiguous row; the blocks
(b, p) run in parallel (`numba.prange`), each a sequential loop over t. The (B, D, L, N) state
is never stored. Vectorising over the N = 16 states instead (an earlier version) left every
loop shorter than LLVM's vector body: at Vim's shapes (B 64, D 128, L 49, N 16), one thread,
the forward took 8.2 ms that way and 3.0 ms this way; at V2M's (B 1792, D 128, L 7), 37 ms
and 16 ms.

Backward. The forward keeps the state at the start of every chunk of T steps,
(B, K, P, N, W). The backward walks the chunks from the last: it recomputes the chunk's states
from its checkpoint into a (T + 1, N, W) buffer, then runs the adjoint
g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t backwards through the chunk, as mamba-ssm's CUDA
kernel does. The gradients of B and C are sums over the channels of a group: each block writes
its lanes' sum into its own slice of a (P_group, B, G, L, N) array, summed afterwards; the
gradients of A and D are summed over the batch the same way.

Compiled on first use per dtype (float32, float64) and cached on disk (`cache=True`): next to
this file when the package directory is writable, else in numba's user cache directory
(`NUMBA_CACHE_DIR` when set). The kernels use as many threads as `torch.get_num_threads()`
(capped by numba's `NUMBA_NUM_THREADS`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from .fast_exp import fast_exp
from .first_order import first_order_only
from .numba_arrays import FASTMATH, as_array, position, use_torch_threads

__all__ = ["CHECKPOINT_STEPS", "MAX_LANES", "fused_scan", "lanes"]

# T: steps between saved states. The backward recomputes a chunk into (T + 1, N, W) and
# (T, N, W) buffers, 139 kB at N 16, W 64 in float32: they stay in L2. The checkpoints cost
# B D L N / T.
CHECKPOINT_STEPS = 16

# The widest block: lanes enough for LLVM's vector body (AVX-512: 16 float32 x 4 unrolled), and
# the recompute buffers above in L2.
MAX_LANES = 64


def lanes(d: int, groups_b: int, groups_c: int) -> int:
    """W: the largest divisor, at most `MAX_LANES`, of the channels that share one group of B and
    one of C (gcd(D / G_B, D / G_C)). Blocks of W channels then never straddle a group."""
    seg = math.gcd(d // groups_b, d // groups_c)
    return max(w for w in range(1, min(seg, MAX_LANES) + 1) if seg % w == 0)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_kernel(u, dts, A, Bt, Ct, Dskip, z, has_D, has_z, reverse, has_last, T, out, ypre, ckpt, last):
    """Fill out, ypre (B, L, P, W) (ypre: the ungated y, when has_z), ckpt (B, K, P, N, W) and,
    when has_last, the last state (B, D, N).

    u, dts (the step sizes), z (B, L, P, W); A (P, N, W); Bt, Ct (B, G, L, N); Dskip (P, W).
    Channel d = p W + w. Absent optional arrays are empty and their `has_` flag is False.
    `reverse`: step i of the scan reads and writes position t = L - 1 - i.
    """
    nb, length, nblk, w = u.shape
    n_state = A.shape[1]
    per_b, per_c = nblk * w // Bt.shape[1], nblk * w // Ct.shape[1]
    chunks = (length + T - 1) // T
    for item in numba.prange(nb * nblk):
        b, p = item // nblk, item % nblk
        gb, gc = p * w // per_b, p * w // per_c
        Ap = A[p]
        h = np.zeros((n_state, w), dtype=u.dtype)
        du = np.empty(w, dtype=u.dtype)
        y = np.empty(w, dtype=u.dtype)
        for k in range(chunks):
            ckpt[b, k, p] = h
            for i in range(k * T, min(length, k * T + T)):
                t = position(i, length, reverse)
                dtv, uv = dts[b, t, p], u[b, t, p]
                for j in range(w):
                    du[j] = dtv[j] * uv[j]
                    y[j] = 0
                Bv, Cv = Bt[b, gb, t], Ct[b, gc, t]
                for n in range(n_state):
                    bn, cn, hn, an = Bv[n], Cv[n], h[n], Ap[n]
                    for j in range(w):  # vectorised over the lanes
                        hv = fast_exp(dtv[j] * an[j]) * hn[j] + du[j] * bn
                        hn[j] = hv
                        y[j] += hv * cn
                if has_D:
                    Dp = Dskip[p]
                    for j in range(w):
                        y[j] += Dp[j] * uv[j]
                o = out[b, t, p]
                if has_z:
                    yp, zv = ypre[b, t, p], z[b, t, p]
                    for j in range(w):
                        yp[j] = y[j]
                        o[j] = y[j] * zv[j] / (1 + fast_exp(-zv[j]))
                else:
                    o[:] = y
        if has_last:
            for n in range(n_state):
                for j in range(w):
                    last[b, p * w + j, n] = h[n, j]


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backward_kernel(
    u, dts, A, Bt, Ct, Dskip, z, has_D, has_z, reverse, T, ckpt, ypre, gout, glast, has_glast,
    gu, gdt_out, gz, gA_items, gD_items, gB_parts, gC_parts,
):  # fmt: skip
    """Fill gu, gdt_out, gz (B, L, P, W); gA_items (B, P, N, W); gD_items (B, P, W); and
    gB_parts, gC_parts (P_group, B, G, L, N): slice q holds the sum over the lanes of the q-th
    block of each group.

    Arguments as `_forward_kernel`, plus gout (B, L, P, W) and glast (B, P, N, W) (has_glast:
    the last state has an upstream gradient).
    """
    nb, length, nblk, w = u.shape
    n_state = A.shape[1]
    per_b, per_c = nblk * w // Bt.shape[1], nblk * w // Ct.shape[1]
    chunks = (length + T - 1) // T
    for item in numba.prange(nb * nblk):
        b, p = item // nblk, item % nblk
        gb, gc = p * w // per_b, p * w // per_c
        qb, qc = p - gb * (per_b // w), p - gc * (per_c // w)
        Ap = A[p]
        g = np.zeros((n_state, w), dtype=u.dtype)  # adjoint of h_t carried from step t + 1
        if has_glast:
            g[:, :] = glast[b, p]
        gA = np.zeros((n_state, w), dtype=u.dtype)
        gD = np.zeros(w, dtype=u.dtype)
        hs = np.empty((T + 1, n_state, w), dtype=u.dtype)  # h_{t0 - 1}, ..., h_{t1 - 1} of a chunk
        decay = np.empty((T, n_state, w), dtype=u.dtype)  # exp(delta_t A)
        du = np.empty(w, dtype=u.dtype)
        gy = np.empty(w, dtype=u.dtype)  # dL/dy_t
        gdu = np.empty(w, dtype=u.dtype)  # dL/d(delta_t u_t)
        gdA = np.empty(w, dtype=u.dtype)  # sum_n dL/d(delta_t A_n) A_n
        for k in range(chunks - 1, -1, -1):
            t0 = k * T
            steps = min(length, t0 + T) - t0
            hs[0] = ckpt[b, k, p]
            for i in range(steps):
                t = position(t0 + i, length, reverse)
                dtv, uv = dts[b, t, p], u[b, t, p]
                for j in range(w):
                    du[j] = dtv[j] * uv[j]
                Bv = Bt[b, gb, t]
                for n in range(n_state):
                    bn, h_prev, h_next, dec, an = Bv[n], hs[i, n], hs[i + 1, n], decay[i, n], Ap[n]
                    for j in range(w):
                        a = fast_exp(dtv[j] * an[j])
                        dec[j] = a
                        h_next[j] = a * h_prev[j] + du[j] * bn
            for i in range(steps - 1, -1, -1):
                t = position(t0 + i, length, reverse)
                dtv, uv, go = dts[b, t, p], u[b, t, p], gout[b, t, p]
                if has_z:
                    zv, ypv, gzv = z[b, t, p], ypre[b, t, p], gz[b, t, p]
                    for j in range(w):
                        sig = 1 / (1 + fast_exp(-zv[j]))
                        gzv[j] = go[j] * ypv[j] * sig * (1 + zv[j] * (1 - sig))
                        gy[j] = go[j] * zv[j] * sig
                else:
                    gy[:] = go
                for j in range(w):
                    du[j] = dtv[j] * uv[j]
                    gdu[j] = 0
                    gdA[j] = 0
                Bv, Cv = Bt[b, gb, t], Ct[b, gc, t]
                gBv, gCv = gB_parts[qb, b, gb, t], gC_parts[qc, b, gc, t]
                for n in range(n_state):
                    bn, cn, an, gn_, gAn = Bv[n], Cv[n], Ap[n], g[n], gA[n]
                    h_prev, h_next, dec = hs[i, n], hs[i + 1, n], decay[i, n]
                    sB = bn * 0  # zeros of the input's dtype
                    sC = bn * 0
                    for j in range(w):  # vectorised over the lanes, the two sums too
                        gn = gn_[j] + gy[j] * cn  # dL/dh_t
                        sC += gy[j] * h_next[j]
                        sB += gn * du[j]
                        gw = gn * dec[j] * h_prev[j]  # dL/d(delta_t A_n)
                        gAn[j] += gw * dtv[j]
                        gdu[j] += gn * bn
                        gdA[j] += gw * an[j]
                        gn_[j] = gn * dec[j]
                    gBv[n] = sB
                    gCv[n] = sC
                gur, gdtr = gu[b, t, p], gdt_out[b, t, p]
                for j in range(w):
                    gur[j] = gdu[j] * dtv[j]
                    gdtr[j] = gdA[j] + gdu[j] * uv[j]
                if has_D:
                    Dp = Dskip[p]
                    for j in range(w):
                        gur[j] += gy[j] * Dp[j]
                        gD[j] += gy[j] * uv[j]
        gA_items[b, p] = gA
        gD_items[b, p] = gD


def _lanes_last(t: Tensor, w: int) -> Tensor:
    """(B, D, L) -> contiguous (B, L, P, W)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], t.shape[1] // w, w).contiguous()


def _lanes_state(t: Tensor, w: int) -> Tensor:
    """(B, D, N) -> contiguous (B, P, N, W)."""
    return t.reshape(t.shape[0], t.shape[1] // w, w, t.shape[2]).transpose(2, 3).contiguous()


def _channels(t: Tensor) -> Tensor:
    """(B, L, P, W) -> a (B, D, L) view."""
    return t.flatten(2).transpose(1, 2)


class _FusedScan(torch.autograd.Function):
    """(out, last state) of the module docstring's recurrence from the step sizes; see `fused_scan`."""

    @staticmethod
    def forward(ctx, u, dt, A, Bt, Ct, D, z, reverse, want_last):
        bsz, d, length = u.shape
        n_state = A.shape[1]
        w = lanes(d, Bt.shape[1], Ct.shape[1])
        uw, dtw = _lanes_last(u, w), _lanes_last(dt, w)
        zw = _lanes_last(z, w) if z is not None else None
        Aw = A.reshape(d // w, w, n_state).transpose(1, 2).contiguous()  # (P, N, W)
        Dw = D.reshape(d // w, w).contiguous() if D is not None else None
        out = torch.empty_like(uw)
        ypre = torch.empty_like(uw) if z is not None else u.new_empty(0, 0, 0, 0)
        ckpt = u.new_empty(bsz, -(-length // CHECKPOINT_STEPS), d // w, n_state, w)
        last = u.new_empty(bsz, d, n_state) if want_last else u.new_empty(0, 0, 0)
        use_torch_threads()
        _forward_kernel(
            uw.numpy(), dtw.numpy(), Aw.numpy(), as_array(Bt, u, 4), as_array(Ct, u, 4), as_array(Dw, u, 2),
            as_array(zw, u, 4), D is not None, z is not None, reverse, want_last, CHECKPOINT_STEPS, out.numpy(),
            ypre.numpy(), ckpt.numpy(), last.numpy(),
        )  # fmt: skip
        ctx.save_for_backward(uw, dtw, Aw, Bt, Ct, Dw, zw, ckpt, ypre)
        ctx.set_materialize_grads(False)
        ctx.reverse = reverse
        return _channels(out), last if want_last else None

    @staticmethod
    @first_order_only("selective_scan (fused CPU kernel)")
    def backward(ctx, gout: Tensor | None, glast: Tensor | None):
        uw, dtw, Aw, Bt, Ct, Dw, zw, ckpt, ypre = ctx.saved_tensors
        use_torch_threads()
        bsz, length, nblk, w = uw.shape
        n_state = Aw.shape[1]
        d = nblk * w
        gu, gdt = torch.empty_like(uw), torch.empty_like(uw)
        gz = torch.empty_like(uw) if zw is not None else uw.new_empty(0, 0, 0, 0)
        gA, gD = uw.new_empty(bsz, nblk, n_state, w), uw.new_empty(bsz, nblk, w)
        gB = Bt.new_empty(d // Bt.shape[1] // w, *Bt.shape)
        gC = Ct.new_empty(d // Ct.shape[1] // w, *Ct.shape)
        gout_w = uw.new_zeros(uw.shape) if gout is None else _lanes_last(gout, w)
        _backward_kernel(
            uw.numpy(), dtw.numpy(), Aw.numpy(), as_array(Bt, uw, 4), as_array(Ct, uw, 4), as_array(Dw, uw, 2),
            as_array(zw, uw, 4), Dw is not None, zw is not None, ctx.reverse, CHECKPOINT_STEPS, ckpt.numpy(),
            ypre.numpy(),
            gout_w.numpy(), as_array(None if glast is None else _lanes_state(glast, w), uw, 4), glast is not None,
            gu.numpy(), gdt.numpy(), gz.numpy(), gA.numpy(), gD.numpy(), gB.numpy(), gC.numpy(),
        )  # fmt: skip
        need = ctx.needs_input_grad
        return (
            _channels(gu),
            _channels(gdt),
            gA.sum(0).transpose(1, 2).reshape(d, n_state),
            gB.sum(0) if need[3] else None,
            gC.sum(0) if need[4] else None,
            gD.sum(0).reshape(d) if Dw is not None else None,
            _channels(gz) if zw is not None else None,
            None,
            None,
        )


def fused_scan(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    Bt: Tensor,
    Ct: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    reverse: bool = False,
    return_last_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The fused scan on CPU tensors: (out (B, D, L), the last state of the scan (B, D, N), or
    None when not `return_last_state`: then the kernel does not write it, which at V2M's shapes
    (B 1792, D 128, N 16) saved a 15 MB state and its copy per call).

    Args:
        u: (B, D, L).
        dt: step sizes delta_t, after bias and softplus, (B, D, L). (Computed in torch: a
            vectorisable softplus in the kernels, recomputed in the backward's two passes, made
            the scan 1.2x to 1.5x slower than torch's softplus at Vim's and V2M's shapes.)
        A: (D, N).
        Bt, Ct: (B, G, L, N), time before state (the transpose of `selective_scan`'s layout);
            channel d uses group d // (D / G); B and C may have different G.
        D: (D,) or None.
        z: (B, D, L) or None.
        reverse: scan from position L - 1 down to 0 (h_t from h_{t+1}); the last state is
            then h_0. The same as flipping u, dt, B, C, z along L and the output back.

    u, dt, z of any strides (read channels-last: no copy when they are transposed (B, L, D)
    tensors, as Mamba's in_proj gives), the others contiguous; all of one dtype, float32 or
    float64, on the CPU. Memory: channels-last copies of u, dt, z (and of the output gradient),
    the checkpoints, B D L N / `CHECKPOINT_STEPS`, and the backward's per-block gradients of B
    and C, D / (G W) copies of (B, G, L, N). The outputs and the gradients of u, dt, z are
    transposed views.
    """
    return _FusedScan.apply(u, dt, A, Bt, Ct, D, z, reverse, return_last_state)
