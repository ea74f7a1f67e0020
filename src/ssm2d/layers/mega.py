"""Mega's moving-average gated attention and normalized feed-forward network (Ma et al., ICLR
2023; docs/math.md §12), on (B, H, W, C) grids, with a pluggable moving average.

Glossary: B batch, H x W grid, L = H * W tokens, C = dim, E = hidden_dim (value width),
z = zdim (shared query/key representation), h = ndim.

The moving-average slot is where the 2-D SSM paper puts its layer in place of Mega's EMA:
- "ema": Mega's bidirectional multi-dimensional damped EMA along the row-major patch sequence;
- "ssm2d": `SSM2D` on the grid; "s4nd": `S4ND` on the grid;
- "none": no moving average ("Mega-ablate").
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor

from .checks import check_grid_input, check_positive_ints
from .ema import MegaEMA
from .placement import SpatialAfter
from .s4nd import S4ND
from .ssm2d import SSM2D

__all__ = ["SLOTS", "MovingAverageGatedAttention", "NormalizedFFN", "laplace", "relative_position_bias"]

SLOTS = ("ema", "ssm2d", "s4nd", "none")
# Mega's laplace attention function: mu = sqrt(1/2), sigma = sqrt(1/(4 pi)) (docs/math.md §12)
_LAPLACE_MU = math.sqrt(0.5)
_LAPLACE_SIGMA = math.sqrt(1.0 / (4 * math.pi))


def laplace(x: Tensor) -> Tensor:
    """f(x) = 0.5 (1 + erf((x - mu) / (sigma sqrt(2)))), Mega's laplace attention function."""
    return 0.5 * (1.0 + torch.erf((x - _LAPLACE_MU) / (_LAPLACE_SIGMA * math.sqrt(2.0))))


def relative_position_bias(table: Tensor, grid: tuple[int, int]) -> Tensor:
    """b[i, j] = table[dh, dw] for tokens i = (hi, wi) and j = (hj, wj) of an H x W grid, row-major.

    Args:
        table: (2 Gh - 1, 2 Gw - 1), entry (Gh - 1 + dh, Gw - 1 + dw) for the offset
            (dh, dw) = (hi - hj, wi - wj). Offsets beyond the table, on grids larger than
            Gh x Gw, take the entry at the nearest edge (clipped relative positions).
        grid: (H, W).

    Returns:
        (L, L), L = H W.
    """
    (rows, cols), (h, w) = table.shape, grid
    reach_h, reach_w = (rows - 1) // 2, (cols - 1) // 2
    ih, iw = torch.arange(h, device=table.device), torch.arange(w, device=table.device)
    dh = (ih[:, None] - ih[None, :]).clamp(-reach_h, reach_h) + reach_h  # (H, H)
    dw = (iw[:, None] - iw[None, :]).clamp(-reach_w, reach_w) + reach_w  # (W, W)
    bias = table[dh[:, None, :, None], dw[None, :, None, :]]  # (H, W, H, W): [hi, wi, hj, wj]
    return bias.reshape(h * w, h * w)


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"{name}: expected an integer >= 1 or a pair of them, got {value!r}")
    check_positive_ints(**{name: pair[0]})
    check_positive_ints(**{name: pair[1]})
    return tuple(pair)


def _check_rate(**rates: float) -> None:
    for name, rate in rates.items():
        if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ValueError(f"{name}: expected a number in [0, 1), got {rate!r}")


def _make_slot(slot: str, dim: int, ndim: int, init: str) -> nn.Module:
    if slot not in SLOTS:
        raise ValueError(f"slot: expected one of {SLOTS}, got {slot!r}")
    if init not in ("default", "identity"):
        raise ValueError(f"slot_init: expected 'default' or 'identity', got {init!r}")
    if slot == "none":
        return nn.Identity()
    layer = {"ema": MegaEMA, "ssm2d": SSM2D, "s4nd": S4ND}[slot]
    spatial = layer(dim, ndim) if slot == "ema" else layer(dim, state_dim=ndim)
    if init == "identity":
        spatial.reset_to_identity()
    return SpatialAfter(nn.Identity(), spatial)  # found by `ssm2d.models.spatial_layers`


class MovingAverageGatedAttention(nn.Module):
    """Mega's gated attention block (pre-norm), with its moving average in a pluggable slot.

    With xn = LayerNorm(x), x' = slot(xn) and m = SiLU(x') (docs/math.md §12)::

        v = SiLU(W_v xn + b_v)                                   (B, L, E)
        u, z, r, hx = split(W_m m + b_m)                         C, z, E, C
        u = sigmoid(u); z = SiLU(z); r = SiLU(r)
        q = z * gamma_q + beta_q;  k = z * gamma_k + beta_k      (B, L, z)
        A = laplace(q k^T / L + b_rel)     or softmax(q k^T / sqrt(z) + b_rel)
        h = SiLU(hx + W_h((A v) * r) + b_h)
        out = x + u * (h - x)

    Single-head; b_rel is a learned 2-D relative position bias over (dh, dw) offsets
    (`relative_position_bias`), so any H x W grid works. Input and output are (B, H, W, C).

    Args:
        dim: C.
        zdim: z, width of the shared query/key representation.
        hidden_dim: E, width of the values and the reset gate.
        ndim: the moving average's states (EMA expansion h, SSM2D / S4ND state_dim).
        slot: "ema", "ssm2d", "s4nd" or "none" (see the module docstring).
        attention: "laplace" (Mega's default) or "softmax".
        rel_pos_size: (Gh, Gw) or G, the offsets the bias table holds: |dh| < Gh, |dw| < Gw.
            Larger grids reuse the edge entries. None: no relative position bias.
        dropout: on m and on h (Mega's `dropout`).
        attention_dropout: on A.
        hidden_dropout: on v and on A v.
        drop_path: stochastic depth of the gated residual branch u * (h - x).
        slot_init: "default", or "identity": the slot layer starts as the identity map, so the
            block computes what the block with slot "none" and the same other weights computes.
    """

    def __init__(
        self,
        dim: int,
        zdim: int = 64,
        hidden_dim: int | None = None,
        ndim: int = 16,
        slot: Literal["ema", "ssm2d", "s4nd", "none"] = "ema",
        attention: Literal["laplace", "softmax"] = "laplace",
        rel_pos_size: int | tuple[int, int] | None = 16,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        drop_path: float = 0.0,
        slot_init: Literal["default", "identity"] = "default",
    ) -> None:
        super().__init__()
        hidden_dim = 2 * dim if hidden_dim is None else hidden_dim
        check_positive_ints(dim=dim, zdim=zdim, hidden_dim=hidden_dim, ndim=ndim)
        if attention not in ("laplace", "softmax"):
            raise ValueError(f"attention: expected 'laplace' or 'softmax', got {attention!r}")
        _check_rate(dropout=dropout, attention_dropout=attention_dropout, hidden_dropout=hidden_dropout,
                    drop_path=drop_path)  # fmt: skip
        self.dim, self.zdim, self.hidden_dim, self.ndim = dim, zdim, hidden_dim, ndim
        self.slot, self.attention = slot, attention
        self.norm = nn.LayerNorm(dim)
        self.moving_average = _make_slot(slot, dim, ndim, slot_init)
        self.v_proj = nn.Linear(dim, hidden_dim)
        self.mx_proj = nn.Linear(dim, 2 * dim + zdim + hidden_dim)  # u, z, r, hx
        self.h_proj = nn.Linear(hidden_dim, dim)
        self.gamma = nn.Parameter(torch.empty(2, zdim))  # rows: q, k
        self.beta = nn.Parameter(torch.empty(2, zdim))
        if rel_pos_size is None:
            self.rel_pos = None
        else:
            gh, gw = _pair(rel_pos_size, "rel_pos_size")
            self.rel_pos = nn.Parameter(torch.empty(2 * gh - 1, 2 * gw - 1))
        self.dropout = nn.Dropout(dropout)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mega's initialization: projections N(0, 0.02) with zero biases, gamma and the relative
        position bias N(0, 0.02), beta 0. The slot layer keeps its own initialization."""
        for linear in (self.v_proj, self.mx_proj, self.h_proj):
            nn.init.normal_(linear.weight, 0.0, 0.02)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.gamma, 0.0, 0.02)
        nn.init.zeros_(self.beta)
        if self.rel_pos is not None:
            nn.init.normal_(self.rel_pos, 0.0, 0.02)
        self.norm.reset_parameters()

    def slot_layer(self) -> nn.Module | None:
        """The moving-average layer (None for slot "none")."""
        return self.moving_average.spatial if isinstance(self.moving_average, SpatialAfter) else None

    def attention_weights(self, q: Tensor, k: Tensor, grid: tuple[int, int]) -> Tensor:
        """q, k: (B, L, z) -> A: (B, L, L), rows over the attended tokens."""
        length = q.shape[1]
        if self.attention == "softmax":
            logits = (q * self.zdim**-0.5) @ k.transpose(1, 2)
        else:
            logits = (q @ k.transpose(1, 2)) / length
        if self.rel_pos is not None:
            logits = logits + relative_position_bias(self.rel_pos, grid).to(logits.dtype)
        return logits.softmax(-1) if self.attention == "softmax" else laplace(logits)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        b, h, w, c = x.shape
        xn = self.norm(x)
        m = self.dropout(F.silu(self.moving_average(xn))).flatten(1, 2)  # (B, L, C)
        v = self.hidden_dropout(F.silu(self.v_proj(xn.flatten(1, 2))))  # (B, L, E)
        u, z, r, hx = self.mx_proj(m).split([c, self.zdim, self.hidden_dim, c], dim=-1)
        u, z, r = torch.sigmoid(u), F.silu(z), F.silu(r)
        q = z * self.gamma[0] + self.beta[0]
        k = z * self.gamma[1] + self.beta[1]
        attn = self.attention_dropout(self.attention_weights(q, k, (h, w)))  # (B, L, L)
        o = self.hidden_dropout(attn @ v)  # (B, L, E)
        hidden = self.dropout(F.silu(hx + self.h_proj(o * r)))  # (B, L, C)
        residual = x.flatten(1, 2)
        return (residual + self.drop_path(u * (hidden - residual))).reshape(b, h, w, c)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, zdim={self.zdim}, hidden_dim={self.hidden_dim}, ndim={self.ndim}, "
            f"slot={self.slot!r}, attention={self.attention!r}"
        )


class NormalizedFFN(nn.Module):
    """Mega's normalized feed-forward network: x + FC2(SiLU(FC1(LayerNorm(x)))) (docs/math.md §12).

    Args:
        dim: C.
        hidden_dim: width of FC1's output.
        dropout: on the output of FC2.
        hidden_dropout: on the hidden activation.
        drop_path: stochastic depth of the residual branch.
    """

    def __init__(
        self, dim: int, hidden_dim: int, dropout: float = 0.0, hidden_dropout: float = 0.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, hidden_dim=hidden_dim)
        _check_rate(dropout=dropout, hidden_dropout=hidden_dropout, drop_path=drop_path)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights N(0, 0.02), zero biases (as Mega)."""
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, 0.0, 0.02)
            nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., C)."""
        y = self.fc2(self.hidden_dropout(F.silu(self.fc1(self.norm(x)))))
        return x + self.drop_path(self.dropout(y))
