"""Fused selective scan for CPU tensors: numba kernels for the forward and backward pass.

Glossary: B batch, D channels, L sequence length, N state size, G groups of B/C, T steps per
checkpoint chunk, K = ceil(L / T) chunks.

The recurrence of `ssm2d.ops.selective_scan` (Gu & Dao 2023, section 3) from the step sizes
delta_t (bias and softplus applied by the caller, in torch, vectorised), with the D skip and the
silu(z) gate fused in::

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t)

Each (batch, channel) row is one sequential loop over t, the rows in parallel
(`numba.prange`). Per step the kernel reads u, delta, z and one B_t and C_t row and writes one
output: the (B, D, L, N) state is never stored. The loop over the N states has no reduction
and no call into libm (`fast_exp`), so LLVM vectorises it; sums over N are taken after it.

Backward. The forward keeps the state at the start of every chunk of T steps, (B, D, K, N).
The backward walks the chunks from the last: it recomputes the chunk's T states from its
checkpoint into a (T + 1, N) buffer, then runs the adjoint g_t = exp(delta_{t+1} A) g_{t+1} +
C_t dy_t backwards through the chunk, as mamba-ssm's CUDA kernel does. The gradients of B and C
are sums over the channels of a group, written by many rows: each thread accumulates into its
own (B, G, L, N) copy, summed afterwards; the gradients of A and D are summed over the batch
the same way from per-row values.

Compiled on first use per dtype (float32, float64) and cached on disk (`cache=True`): next to
this file when the package directory is writable, else in numba's user cache directory
(`NUMBA_CACHE_DIR` when set). The kernels use as many threads as `torch.get_num_threads()`
(capped by numba's `NUMBA_NUM_THREADS`).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from .fast_exp import fast_exp
from .first_order import first_order_only
from .numba_arrays import as_array, use_torch_threads

__all__ = ["CHECKPOINT_STEPS", "fused_scan"]

# T: steps between saved states. The backward recomputes a chunk into a (T + 1, N) buffer that
# stays in L1; the checkpoints cost B D L N / T. At B 2, D 192, L 3136, N 16 (forward +
# backward, 2 loaded cores, in alternation) T = 16, 64 and 256 ran within 4 % of each other.
CHECKPOINT_STEPS = 64


@numba.njit(inline="always")
def _sum(x):
    """sum of a 1-D array with four running sums: a quarter of the latency chain of one."""
    s0, s1, s2, s3 = x[0] * 0, x[0] * 0, x[0] * 0, x[0] * 0
    n, count = 0, x.shape[0]
    while n + 4 <= count:
        s0 += x[n]
        s1 += x[n + 1]
        s2 += x[n + 2]
        s3 += x[n + 3]
        n += 4
    while n < count:
        s0 += x[n]
        n += 1
    return (s0 + s1) + (s2 + s3)


@numba.njit(parallel=True, cache=True)
def _forward_kernel(u, dts, A, Bt, Ct, Dskip, z, has_D, has_z, T, out, ypre, ckpt, last):
    """Fill out (B, D, L), ypre (B, D, L) (the ungated y, when has_z), ckpt (B, D, K, N) and
    last (B, D, N).

    u, dts (the step sizes), z (B, D, L); A (D, N); Bt, Ct (B, G, L, N); Dskip (D,). Absent
    optional arrays are empty and their `has_` flag is False.
    """
    nb, nd, length = u.shape
    n_state = A.shape[1]
    per_b, per_c = nd // Bt.shape[1], nd // Ct.shape[1]
    for row in numba.prange(nb * nd):
        b, d = row // nd, row % nd
        gb, gc = d // per_b, d // per_c
        h = np.zeros(n_state, dtype=u.dtype)
        to_y = np.empty(n_state, dtype=u.dtype)  # h_t C_t per state, summed after the vectorised loop
        for t in range(length):
            if t % T == 0:
                ckpt[b, d, t // T, :] = h
            dt = dts[b, d, t]
            ut = u[b, d, t]
            du = dt * ut
            for n in range(n_state):  # vectorised: no reduction in this loop
                hn = fast_exp(dt * A[d, n]) * h[n] + du * Bt[b, gb, t, n]
                h[n] = hn
                to_y[n] = hn * Ct[b, gc, t, n]
            y = _sum(to_y)
            if has_D:
                y += Dskip[d] * ut
            if has_z:
                ypre[b, d, t] = y
                zt = z[b, d, t]
                y = y * zt / (1 + fast_exp(-zt))
            out[b, d, t] = y
        last[b, d, :] = h


@numba.njit(parallel=True, cache=True)
def _backward_kernel(
    u, dts, A, Bt, Ct, Dskip, z, has_D, has_z, T, ckpt, ypre, gout, glast, has_glast,
    gu, gdt_out, gz, gA_rows, gD_rows, gB_threads, gC_threads,
):  # fmt: skip
    """Fill gu, gdt_out, gz (B, D, L); gA_rows (B, D, N); gD_rows (B, D); and add
    into gB_threads, gC_threads (threads, B, G, L, N), one slice per numba thread.

    Arguments as `_forward_kernel`, plus gout (B, D, L) and glast (B, D, N) (has_glast: the
    last state has an upstream gradient).
    """
    nb, nd, length = u.shape
    n_state = A.shape[1]
    per_b, per_c = nd // Bt.shape[1], nd // Ct.shape[1]
    chunks = (length + T - 1) // T
    for row in numba.prange(nb * nd):
        tid = numba.get_thread_id()
        b, d = row // nd, row % nd
        gb, gc = d // per_b, d // per_c
        g = np.zeros(n_state, dtype=u.dtype)  # adjoint of h_t carried from step t + 1
        if has_glast:
            g[:] = glast[b, d, :]
        gA = np.zeros(n_state, dtype=u.dtype)
        gD = 0.0
        hs = np.empty((T + 1, n_state), dtype=u.dtype)  # h_{t0 - 1}, ..., h_{t1 - 1} of a chunk
        decay = np.empty((T, n_state), dtype=u.dtype)  # exp(delta_t A)
        to_du = np.empty(n_state, dtype=u.dtype)  # per state, summed after the vectorised loop
        to_dt = np.empty(n_state, dtype=u.dtype)
        for k in range(chunks - 1, -1, -1):
            t0 = k * T
            steps = min(length, t0 + T) - t0
            hs[0, :] = ckpt[b, d, k, :]
            for i in range(steps):
                t = t0 + i
                dt = dts[b, d, t]
                du = dt * u[b, d, t]
                for n in range(n_state):
                    a = fast_exp(dt * A[d, n])
                    decay[i, n] = a
                    hs[i + 1, n] = a * hs[i, n] + du * Bt[b, gb, t, n]
            for i in range(steps - 1, -1, -1):
                t = t0 + i
                dt, ut = dts[b, d, t], u[b, d, t]
                gy = gout[b, d, t]
                if has_z:
                    zt = z[b, d, t]
                    sig = 1 / (1 + fast_exp(-zt))
                    gz[b, d, t] = gy * ypre[b, d, t] * sig * (1 + zt * (1 - sig))
                    gy = gy * zt * sig
                du = dt * ut
                for n in range(n_state):  # vectorised: no reduction in this loop
                    gn = g[n] + gy * Ct[b, gc, t, n]  # dL/dh_t
                    gC_threads[tid, b, gc, t, n] += gy * hs[i + 1, n]
                    gB_threads[tid, b, gb, t, n] += gn * du
                    gw = gn * decay[i, n] * hs[i, n]  # dL/d(delta_t A_n)
                    gA[n] += gw * dt
                    to_du[n] = gn * Bt[b, gb, t, n]
                    to_dt[n] = gw * A[d, n]
                    g[n] = gn * decay[i, n]
                gdu = _sum(to_du)
                gdt = _sum(to_dt) + gdu * ut
                gut = gdu * dt
                if has_D:
                    gut += gy * Dskip[d]
                    gD += gy * ut
                gu[b, d, t] = gut
                gdt_out[b, d, t] = gdt
        gA_rows[b, d, :] = gA
        gD_rows[b, d] = gD


class _FusedScan(torch.autograd.Function):
    """(out, last state) of the module docstring's recurrence from the step sizes; see `fused_scan`."""

    @staticmethod
    def forward(ctx, u, dt, A, Bt, Ct, D, z):
        bsz, d, length = u.shape
        out = torch.empty_like(u)
        ypre = torch.empty_like(u) if z is not None else u.new_empty(0, 0, 0)
        ckpt = u.new_empty(bsz, d, -(-length // CHECKPOINT_STEPS), A.shape[1])
        last = u.new_empty(bsz, d, A.shape[1])
        use_torch_threads()
        _forward_kernel(
            as_array(u, u, 3), as_array(dt, u, 3), as_array(A, u, 2), as_array(Bt, u, 4), as_array(Ct, u, 4),
            as_array(D, u, 1), as_array(z, u, 3), D is not None, z is not None, CHECKPOINT_STEPS,
            out.numpy(), ypre.numpy(), ckpt.numpy(), last.numpy(),
        )  # fmt: skip
        ctx.save_for_backward(u, dt, A, Bt, Ct, D, z, ckpt, ypre)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    @first_order_only("selective_scan (fused CPU kernel)")
    def backward(ctx, gout: Tensor | None, glast: Tensor | None):
        u, dt, A, Bt, Ct, D, z, ckpt, ypre = ctx.saved_tensors
        threads = use_torch_threads()
        gu, gdt = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(u) if z is not None else u.new_empty(0, 0, 0)
        gA_rows, gD_rows = u.new_empty(*u.shape[:2], A.shape[1]), u.new_empty(u.shape[:2])
        gB_threads, gC_threads = Bt.new_zeros(threads, *Bt.shape), Ct.new_zeros(threads, *Ct.shape)
        _backward_kernel(
            as_array(u, u, 3), as_array(dt, u, 3), as_array(A, u, 2), as_array(Bt, u, 4), as_array(Ct, u, 4),
            as_array(D, u, 1), as_array(z, u, 3), D is not None, z is not None, CHECKPOINT_STEPS, ckpt.numpy(),
            ypre.numpy(), as_array(torch.zeros_like(u) if gout is None else gout, u, 3), as_array(glast, u, 3),
            glast is not None, gu.numpy(), gdt.numpy(), gz.numpy(), gA_rows.numpy(), gD_rows.numpy(),
            gB_threads.numpy(), gC_threads.numpy(),
        )  # fmt: skip
        need = ctx.needs_input_grad
        return (
            gu,
            gdt,
            gA_rows.sum(0),
            gB_threads.sum(0) if need[3] else None,
            gC_threads.sum(0) if need[4] else None,
            gD_rows.sum(0) if D is not None else None,
            gz if z is not None else None,
        )


def fused_scan(
    u: Tensor, dt: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor, D: Tensor | None, z: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The fused scan on CPU tensors: (out (B, D, L), last state h_{L-1} (B, D, N)).

    Args:
        u: (B, D, L).
        dt: step sizes delta_t, after bias and softplus (cheaper in torch, vectorised), (B, D, L).
        A: (D, N).
        Bt, Ct: (B, G, L, N), time before state (the transpose of `selective_scan`'s layout);
            channel d uses group d // (D / G); B and C may have different G.
        D: (D,) or None.
        z: (B, D, L) or None.

    All tensors contiguous, of one dtype, float32 or float64, on the CPU. Memory: the
    checkpoints, B D L N / `CHECKPOINT_STEPS`, and the backward's per-thread gradients of B and C.
    """
    return _FusedScan.apply(u, dt, A, Bt, Ct, D, z)
