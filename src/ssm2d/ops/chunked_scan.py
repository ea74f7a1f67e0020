"""Chunked parallel form of Mamba's selective scan, the fast path of `selective_scan`.

Glossary: B batch, D channels (d in a block), L sequence length, N state size, G groups,
T steps per chunk, K = ceil(L / T) chunks.

Computes y_t = C_t . h_t for h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (h_{-1} = 0), with the
step sizes delta already biased and activated; `selective_scan` adds D u and the gate.

Spec 5.3, option 2. The sequence is cut into K chunks of T steps. All chunks advance together
through T steps from a zero state (their local end states), a loop over the K chunks carries
the true state across chunk boundaries (the decay of a whole chunk is exp(A sum_t delta_t)),
and a second pass of T steps from the carried states gives every h_t: 2T + K vectorised steps
instead of L. Within a chunk the steps are taken one by one rather than through the masked
decay matrix exp(S_t - S_s): with a decay per (channel, state) that matrix costs T times the
state tensor in exponentials and memory. Only products of exp(delta A) <= 1 appear, so the
scan is stable for any delta >= 0 and A <= 0.

The gradients are written out: the adjoint g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t is the
same chunked scan backwards in time, and dL/d(delta_t A) = g_t exp(delta_t A) h_{t-1}.

Memory. The layout is (T, D, N, B, K): a step is one contiguous slice, and batch and chunks
innermost keep the broadcasts over N vectorised. Channels go in blocks of at most
`_BLOCK_ELEMENTS` state entries held in buffers reused by every block and kept for later
calls (on CPU a first pass over fresh pages costs several times a pass over reused ones). The
(B, D, L) inputs and outputs are read and written through strided (T, D, B, K) views, one
block of channels at a time, a transpose that stays in cache. The backward pass recomputes the
states from the chunk-entry states saved by the forward: O(B D L N / T) saved, plus one block.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .first_order import first_order_only

__all__ = ["chunked_scan", "default_chunk_size"]

# Block size: at least _BLOCK_ELEMENTS state entries (4 MB in float32: the three buffers fit
# the L3 cache) and _STEP_ELEMENTS per step slice (below that, per-op overhead dominates).
# Measured on 2 CPU cores: at L = 3136, B = 16, D = 384, N = 16 the choices 1M/4M and
# 64K/256K ran within 10 %; training vim_mini_28 (batch 128), 1M was 25 % faster than 4M.
# At L = 3136, B = 2, D = 384, 16K and 32K per step were 30 % and 10 % slower than 64K.
_BLOCK_ELEMENTS = 1 << 20
_STEP_ELEMENTS = 1 << 16
# Workspaces up to this many elements (64 MB in float32) are kept per thread, device and dtype.
_CACHED_ELEMENTS = 1 << 24
_CACHE = threading.local()


def default_chunk_size(length: int) -> int:
    """T = round(sqrt(L)): the scan then takes 2T + K = O(sqrt(L)) vectorised steps.

    At L = 3136, T = 28, 56, 112 and 196 ran within measurement noise of each other.
    """
    return max(1, round(math.sqrt(length)))


def _to_chunks(t: Tensor, chunk: int) -> Tensor:
    """(B, ..., L) -> (T, ..., B, K) contiguous, zero-padded to K * T steps (for the small B and C)."""
    return _chunk_view(t, chunk).contiguous()


def _chunk_view(t: Tensor, chunk: int) -> Tensor:
    """(B, ..., L) -> (T, ..., B, K) as a strided view, over a zero-padded copy if L % T != 0.

    Blocks of channels are made contiguous one at a time (`Tensor.contiguous` on a block is
    cache-resident; on the whole tensor the same transpose is three times slower).
    """
    pad = -t.shape[-1] % chunk
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], -1, chunk).movedim(-1, 0).movedim(1, -2)


def _from_chunks(t: Tensor, length: int) -> Tensor:
    """(T, ..., B, K) -> (B, ..., L) contiguous, dropping the padding."""
    return rearrange(t, "t ... b k -> b ... (k t)")[..., :length].contiguous()


def _chunked_empty(like: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """An uninitialised (B, D, K T) tensor and its (T, D, B, K) view (see `_chunk_view`)."""
    out = like.new_empty(*like.shape[:-1], -(-like.shape[-1] // chunk) * chunk)
    return out, _chunk_view(out, chunk)


def _trim(t: Tensor, length: int) -> Tensor:
    """(..., K T) -> (..., L): drops the padding."""
    return t if t.shape[-1] == length else t[..., :length].contiguous()


def _local_end(a: list[Tensor], x: list[Tensor]) -> Tensor:
    """h = a * h + x from a zero state over the steps in order; returns the last h."""
    state = x[0].clone()
    for a_t, x_t in zip(a[1:], x[1:]):
        state = torch.addcmul(x_t, a_t, state)
    return state


def _carry(decay: Tensor, local_end: Tensor, reverse: bool) -> Tensor:
    """States entering each chunk, (..., K), from chunk decays and zero-start end states (..., K)."""
    decay, local_end = decay.movedim(-1, 0), local_end.movedim(-1, 0)  # (K, ...)
    incoming = torch.zeros_like(local_end)
    steps = [*zip(decay.unbind(0), local_end.unbind(0), incoming.unbind(0))]
    if reverse:
        steps.reverse()
    for (decay_j, end_j, in_j), (_, _, in_i) in zip(steps, steps[1:]):  # chunk j feeds the next chunk i
        torch.addcmul(end_j, decay_j, in_j, out=in_i)
    return incoming.movedim(0, -1)


def _chunk_decay(dt_sum: Tensor, A: Tensor) -> Tensor:
    """prod of exp(delta A) over a chunk from the chunk's sum of delta: (d, B, K) -> (d, N, B, K).

    The exponent is floored at log(sqrt(tiny)): the decay over a long chunk often underflows,
    and exp with a subnormal result, and products with it, are two orders of magnitude slower
    on CPU. The floor moves a carried state by at most sqrt(tiny) (1e-19 in float32) of itself.
    """
    floor = math.log(torch.finfo(dt_sum.dtype).tiny) / 2
    return torch.mul(dt_sum[:, None], A[..., None, None]).clamp_min_(floor).exp_()


def _states(dt: Tensor, a: Tensor, x: Tensor, A: Tensor, h0: Tensor | None = None) -> Tensor:
    """Forward states, written over x. dt (T, d, B, K); a, x (T, d, N, B, K); A (d, N).

    `h0` (d, N, B, K), the states entering each chunk, is computed unless given; returned.
    """
    if h0 is None:
        h0 = _carry(_chunk_decay(dt.sum(0), A), _local_end(a.unbind(0), x.unbind(0)), reverse=False)
    prev = h0
    for a_t, x_t in zip(a.unbind(0), x.unbind(0)):
        prev = x_t.addcmul_(a_t, prev)
    return h0


def _adjoint(dt: Tensor, a: Tensor, g: Tensor, A: Tensor) -> None:
    """Adjoint states g_t <- a_{t+1} g_{t+1} + g_t, in place over g (shapes as in `_states`)."""
    nxt = torch.zeros_like(a[0])  # (d, N, B, K): a at step 0 of the next chunk (none after the last)
    nxt[..., :-1] = a[0, ..., 1:]
    shifted = [*a.unbind(0)[1:], nxt]  # a'_t = a_{t+1}
    dt_next = F.pad(dt[0, ..., 1:], (0, 1))  # (d, B, K)
    decay = _chunk_decay(dt.sum(0) - dt[0] + dt_next, A)  # prod of a' per chunk
    steps = g.unbind(0)[::-1]
    prev = _carry(decay, _local_end(shifted[::-1], steps), reverse=True)
    for a_t, g_t in zip(shifted[::-1], steps):
        prev = g_t.addcmul_(a_t, prev)


def _blocks(d: int, groups: int, per_channel: int, chunk: int) -> list[tuple[int, int, int]]:
    """(group, first channel, end channel) blocks that never cross a group boundary."""
    per_group = d // groups
    budget = max(_BLOCK_ELEMENTS, _STEP_ELEMENTS * chunk)
    size = max(1, min(per_group, budget // per_channel))
    return [(g, c, min(c + size, (g + 1) * per_group))
            for g in range(groups) for c in range(g * per_group, (g + 1) * per_group, size)]


class _Workspace:
    """`count` flat buffers for the largest block, reused by every block, viewed as (T, d, N, B, K).

    The memory is kept per thread, device and dtype for later calls (up to `_CACHED_ELEMENTS`):
    on CPU the first pass over fresh pages costs eight times a pass over reused ones.
    """

    def __init__(self, like: Tensor, per_channel: int, blocks: list[tuple[int, int, int]], count: int) -> None:
        size = per_channel * max(c1 - c0 for _, c0, c1 in blocks)
        cache = _CACHE.__dict__.setdefault("buffers", {})
        key, need = (like.device, like.dtype), count * size
        flat = cache.get(key)
        if flat is None or flat.numel() < need:
            with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
                flat = like.new_empty(need)
            if need <= _CACHED_ELEMENTS:
                cache[key] = flat
        self.buffers = flat[:need].view(count, size).unbind(0)

    def view(self, i: int, shape: tuple[int, ...]) -> Tensor:
        return self.buffers[i][: math.prod(shape)].view(shape)


def _block_setup(ws: _Workspace, dtb: Tensor, ub: Tensor, A: Tensor, Bc: Tensor, g: int):
    """v = delta u, a = exp(delta A) and x = v B of one block (a, x in workspace buffers 0 and 1).

    dtb, ub (T, d, B, K); A (d, N); Bc (T, G, N, B, K).
    """
    shape = (dtb.shape[0], dtb.shape[1], A.shape[1], *dtb.shape[2:])  # (T, d, N, B, K)
    v = dtb * ub  # (T, d, B, K)
    a = torch.mul(dtb[:, :, None], A[..., None, None], out=ws.view(0, shape)).exp_()
    x = torch.mul(v[:, :, None], Bc[:, g, None], out=ws.view(1, shape))
    return v, a, x


class _ChunkedScan(torch.autograd.Function):
    """y = C . h for the recurrence of the module docstring."""

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
        # u, dt (B, D, L); A (D, N); B, C (B, G, N, L); all in the compute dtype
        length, n = u.shape[-1], A.shape[1]
        uv, dtv = _chunk_view(u, chunk), _chunk_view(dt, chunk)  # (T, D, B, K) views
        Bc, Cc = _to_chunks(B, chunk), _to_chunks(C, chunk)  # (T, G, N, B, K)
        per_channel = uv[:, 0].numel() * n
        blocks = _blocks(u.shape[1], B.shape[1], per_channel, chunk)
        ws = _Workspace(u, per_channel, blocks, 2)
        y, yv = _chunked_empty(u, chunk)
        h0 = u.new_empty(u.shape[1], n, *uv.shape[2:])  # (D, N, B, K): chunk-entry states
        for g, c0, c1 in blocks:
            dtb, Ab = dtv[:, c0:c1].contiguous(), A[c0:c1]
            _, a, h = _block_setup(ws, dtb, uv[:, c0:c1].contiguous(), Ab, Bc, g)
            h0[c0:c1] = _states(dtb, a, h, Ab)
            yv[:, c0:c1] = h.mul_(Cc[:, g, None]).sum(2)
        ctx.save_for_backward(u, dt, A, B, C, h0)
        ctx.chunk = chunk
        return _trim(y, length)

    @staticmethod
    @first_order_only("selective_scan (chunked)")
    def backward(ctx, gy: Tensor):
        u, dt, A, B, C, h0 = ctx.saved_tensors
        chunk, length, n = ctx.chunk, u.shape[-1], A.shape[1]
        uv, dtv, gyv = (_chunk_view(t, chunk) for t in (u, dt, gy.to(u.dtype)))  # (T, D, B, K) views
        Bc, Cc = _to_chunks(B, chunk), _to_chunks(C, chunk)  # (T, G, N, B, K)
        per_channel = uv[:, 0].numel() * n
        blocks = _blocks(u.shape[1], B.shape[1], per_channel, chunk)
        ws = _Workspace(u, per_channel, blocks, 3)
        (gu, guv), (gdt, gdtv) = _chunked_empty(u, chunk), _chunked_empty(u, chunk)
        gA = torch.empty_like(A)
        gB, gC = torch.zeros_like(Bc), torch.zeros_like(Cc)  # (T, G, N, B, K)
        for g, c0, c1 in blocks:
            dtb, ub, gyb = dtv[:, c0:c1].contiguous(), uv[:, c0:c1].contiguous(), gyv[:, c0:c1].contiguous()
            Ab, h0b, Bg, gBg, gCg = A[c0:c1], h0[c0:c1], Bc[:, g], gB[:, g], gC[:, g]
            v, a, h = _block_setup(ws, dtb, ub, Ab, Bc, g)
            _states(dtb, a, h, Ab, h0b)  # h: states (T, d, N, B, K)
            adj = torch.mul(gyb[:, :, None], Cc[:, g, None], out=ws.view(2, h.shape))
            _adjoint(dtb, a, adj, Ab)  # adj: dL/dh_t through the whole future
            # sums over the channels of the group, one channel at a time: the sum stays in cache
            if ctx.needs_input_grad[4]:
                for gy_c, h_c in zip(gyb.unbind(1), h.unbind(1)):
                    gCg.addcmul_(gy_c[:, None], h_c)
            if ctx.needs_input_grad[3]:
                for v_c, adj_c in zip(v.unbind(1), adj.unbind(1)):
                    gBg.addcmul_(v_c[:, None], adj_c)
            # w = dL/d(delta_t A) = adj_t * a_t * h_{t-1}, built in place over a
            a[1:].mul_(h[:-1])
            a[0].mul_(h0b)
            w = a.mul_(adj).flatten(-2)  # (T, d, N, B K)
            adj_n, B_n = adj.unbind(2), Bg[:, None].unbind(2)
            s = adj_n[0] * B_n[0]  # (T, d, B, K): sum_n adj B, one state at a time
            for adj_i, B_i in zip(adj_n[1:], B_n[1:]):
                s.addcmul_(adj_i, B_i)
            guv[:, c0:c1] = s * dtb
            gdtv[:, c0:c1] = torch.matmul(Ab[:, None], w).view_as(s).addcmul_(s, ub)  # sum_n w A + s u
            # sum over (t, b, k) of w delta; bmm on flat views: matmul's broadcasting copies dtb
            gA[c0:c1] = torch.bmm(w.flatten(0, 1), dtb.reshape(-1, w.shape[-1], 1)).view(w.shape[:3]).sum(0)
        return _trim(gu, length), _trim(gdt, length), gA, _from_chunks(gB, length), _from_chunks(gC, length), None


def chunked_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    """y = C . h, (B, D, L), by the chunked scan with T = `chunk` steps per chunk.

    Args:
        u, dt: input and step sizes, (B, D, L), one floating dtype for all arguments.
        A: (D, N), non-positive for a stable scan.
        B, C: (B, G, N, L) with D divisible by G; channel d uses group d // (D / G).
        chunk: T >= 1.
    """
    return _ChunkedScan.apply(u, dt, A, B, C, chunk)
