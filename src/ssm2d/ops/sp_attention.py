"""Spatial-prior-enhanced self-attention, SP-SA (Zhou et al., BMVC 2022; docs/math.md §11).

Glossary: B batch, h heads, H x W grid, L = H * W tokens in row-major order, d head width,
k hidden units of the prior per head.

Spatial prior. Token i sits at row y_i, column x_i. Its offset to token j is the unnormalised
integer pair r_ij = (x_j - x_i, y_j - y_i) in [-(W-1), W-1] x [-(H-1), H-1], and each head
maps it through a 2-layer MLP::

    SP_h(r) = sum_k w2[h, k] ReLU(w1[h, k] . r + b1[h, k]) + b2[h]

The prior depends on the offset only, so the fast path evaluates the MLP once per distinct
offset, a (2H-1) x (2W-1) table per head, and gathers the (h, L, L) map from it. The source
code materialises (L, L, h*k) hidden units instead.

Attention. The prior multiplies the logits before the softmax::

    A_h = softmax_j((q_i . k_j) * scale * SP_h(r_ij)),   out_h = A_h v_h,   scale = d^-1/2

torch's `scaled_dot_product_attention` cannot compute this: it only adds a mask to the scaled
logits, and the additive equivalent of the prior, logits * (SP - 1), depends on q and k, so
the logits would have to be formed first anyway. The fast path is therefore two batched
matmuls around a softmax.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sp_attention", "sp_attention_ref", "spatial_prior", "spatial_prior_ref"]


def _check_grid(grid: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (operator.index(s) for s in grid if not isinstance(s, bool))
    except (TypeError, ValueError):
        h = w = 0
    if isinstance(grid, (str, bytes)) or min(h, w) < 1:
        raise ValueError(f"grid: expected (H, W) with integers H, W >= 1, got {grid!r}")
    return h, w


def _check_prior_params(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if w1.ndim != 3 or w1.shape[-1] != 2:
        raise ValueError(f"w1: expected shape (h, k, 2), got {tuple(w1.shape)}")
    heads, hidden = w1.shape[:2]
    for name, t, shape in (("b1", b1, (heads, hidden)), ("w2", w2, (heads, hidden)), ("b2", b2, (heads,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} to match w1 {tuple(w1.shape)}, got {tuple(t.shape)}")


def spatial_prior(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, grid: Sequence[int]) -> Tensor:
    """The SP map of every head on an H x W grid, from one MLP evaluation per distinct offset.

    Args:
        w1: (h, k, 2) first-layer weights acting on r = (dx, dy).
        b1: (h, k) first-layer biases.
        w2: (h, k) second-layer weights.
        b2: (h,) second-layer biases.
        grid: (H, W), any integers >= 1.

    Returns:
        (h, L, L): entry [h, i, j] is SP_h(r_ij), tokens in row-major order.
    """
    _check_prior_params(w1, b1, w2, b2)
    height, width = _check_grid(grid)
    dtype = torch.promote_types(torch.promote_types(w1.dtype, b1.dtype), torch.promote_types(w2.dtype, b2.dtype))
    device = w1.device
    dy = torch.arange(-(height - 1), height, device=device, dtype=dtype)  # (2H-1,)
    dx = torch.arange(-(width - 1), width, device=device, dtype=dtype)  # (2W-1,)
    offsets = torch.stack(torch.meshgrid(dx, dy, indexing="xy"), -1)  # (2H-1, 2W-1, 2) as (dx, dy)
    hidden = torch.einsum("yxc,hkc->hyxk", offsets, w1.to(dtype)) + b1.to(dtype)[:, None, None]
    table = torch.einsum("hyxk,hk->hyx", hidden.relu(), w2.to(dtype)) + b2.to(dtype)[:, None, None]
    # Token (y, x) to token (y', x'): table cell (y' - y + H - 1, x' - x + W - 1).
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (L,) y of each token
    cols = torch.arange(width, device=device).repeat(height)  # (L,) x of each token
    cell = (rows[None, :] - rows[:, None] + height - 1) * (2 * width - 1) + cols[None, :] - cols[:, None] + width - 1
    length = height * width
    return table.flatten(1).index_select(1, cell.flatten()).unflatten(1, (length, length))  # (h, L, L)


def spatial_prior_ref(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, grid: Sequence[int]) -> Tensor:
    """Reference: the MLP of docs/math.md §11 evaluated at every token pair, one pair at a time.

    Same contract as `spatial_prior`. Slow (L^2 Python steps); for tests.
    """
    _check_prior_params(w1, b1, w2, b2)
    height, width = _check_grid(grid)
    dtype = torch.promote_types(torch.promote_types(w1.dtype, b1.dtype), torch.promote_types(w2.dtype, b2.dtype))
    w1, b1, w2, b2 = w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype)
    length = height * width
    rows = []
    for i in range(length):
        y_i, x_i = divmod(i, width)
        row = []
        for j in range(length):
            y_j, x_j = divmod(j, width)
            r = torch.tensor([x_j - x_i, y_j - y_i], dtype=dtype, device=w1.device)  # r_ij
            hidden = torch.relu(w1 @ r + b1)  # (h, k)
            row.append((w2 * hidden).sum(-1) + b2)  # (h,)
        rows.append(torch.stack(row, -1))  # (h, L)
    return torch.stack(rows, -2)  # (h, L, L)


def _check_attention(q: Tensor, k: Tensor, v: Tensor, prior: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("prior", prior)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if q.ndim != 4:
        raise ValueError(f"q: expected shape (B, h, L, d), got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {tuple(q.shape)} as q, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        lead = ", ".join(map(str, q.shape[:3]))
        raise ValueError(f"v: expected shape ({lead}, d_v) to match q, got {tuple(v.shape)}")
    batch, heads, length, _ = q.shape
    if prior.shape not in ((heads, length, length), (batch, heads, length, length)):
        raise ValueError(
            f"prior: expected shape ({heads}, {length}, {length}) or ({batch}, {heads}, {length}, {length}), "
            f"got {tuple(prior.shape)}"
        )


def sp_attention(q: Tensor, k: Tensor, v: Tensor, prior: Tensor, scale: float | None = None) -> Tensor:
    """Self-attention whose logits are multiplied by a spatial prior (docs/math.md §11).

    Args:
        q, k: (B, h, L, d) queries and keys.
        v: (B, h, L, d_v) values.
        prior: (h, L, L), shared by the batch, or (B, h, L, L).
        scale: logit scale; None gives d^-1/2.

    Returns:
        (B, h, L, d_v): softmax_j(q_i . k_j * scale * prior[h, i, j]) v.
    """
    _check_attention(q, k, v, prior)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.mT  # (B, h, L, L)
    return (logits * prior).softmax(-1) @ v  # (B, h, L, d_v)


def sp_attention_ref(q: Tensor, k: Tensor, v: Tensor, prior: Tensor, scale: float | None = None) -> Tensor:
    """Reference: the equation of `sp_attention`, one query row at a time.

    Same contract as `sp_attention`. Slow (B * h * L Python steps); for tests.
    """
    _check_attention(q, k, v, prior)
    batch, heads, length, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    prior = prior.expand(batch, heads, length, length)
    out = []
    for b in range(batch):
        per_head = []
        for h in range(heads):
            rows = []
            for i in range(length):
                logits = (k[b, h] @ q[b, h, i]) * scale * prior[b, h, i]  # (L,)
                weights = torch.exp(logits - logits.max())
                rows.append((weights / weights.sum()) @ v[b, h])  # (d_v,)
            per_head.append(torch.stack(rows))  # (L, d_v)
        out.append(torch.stack(per_head))  # (h, L, d_v)
    return torch.stack(out) if out else v * 0  # (B, h, L, d_v); B = 0: empty, on v's graph
