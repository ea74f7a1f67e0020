"""SS2D: VMamba's 2-D selective scan (Liu et al., NeurIPS 2024, arXiv 2401.10166).

Glossary: B batch, H x W grid, L = H * W, C = dim channels, E = expand * C inner channels,
N state size, R = dt_rank, K = 4 scan directions.

The layer (docs/math.md §13)::

    x, z = split(in_proj(h))                                   (B, H, W, E) each
    u = silu(depthwise_conv3x3(x))                             (B, E, H, W)
    u_k = cross_scan(u)_k,  k = 0..3                           (B, E, L) in direction k's order
    [dt_k, B_k, C_k] = x_proj_k(u_k);  delta_k = softplus(dt_proj_k(dt_k))
    y_k = selective_scan(u_k, delta_k, A_k, B_k, C_k) + D_k u_k
    y = cross_merge(y_0, ..., y_3)                             (B, H, W, E): back to grid order, summed
    out = out_proj(LayerNorm(y) * silu(z))

The directions are row-major, column-major and both reversed (`ssm2d.ops.cross_scan`): the
output at a cell sees, through direction k, every cell before it in direction k's order, so
through the four together the whole grid. Each direction has its own x_proj, dt_proj, A and D;
the fast path runs the four as one `selective_scan` call with K groups of B and C.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..ops.cross_scan import cross_merge, cross_merge_ref, cross_scan, cross_scan_ref
from ..ops.selective_scan import selective_scan, selective_scan_ref
from ..ops.step_sizes import step_sizes
from .checks import check_grid_input, check_positive_ints
from .mamba_init import init_dt_proj, s4d_real_a_log
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["SS2D"]

K = 4  # scan directions


class _Direction(TaggedModule):
    """One scan direction's selective-SSM parameters: x_proj (E -> R + 2N), dt_proj (R -> E),
    A_log (E, N) and D (E,)."""

    def __init__(self, inner: int, state_dim: int, dt_rank: int) -> None:
        super().__init__()
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state_dim, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, state_dim))
        self.D = nn.Parameter(torch.empty(inner))
        self._tag_parameters()

    def _tag_parameters(self) -> None:
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._optim = NO_WEIGHT_DECAY  # Mamba: A, D and the dt bias skip weight decay

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's defaults: PyTorch's x_proj init, dt from logU[1e-3, 0.1], S4D-Real A = -(1..N), D = 1."""
        self.x_proj.reset_parameters()
        init_dt_proj(self.dt_proj, self.dt_proj.in_features)
        self.A_log.copy_(s4d_real_a_log(*self.A_log.shape))
        self.D.fill_(1.0)


class SS2D(nn.Module):
    """VMamba's SS2D spatial mixer: cross-scan, four selective scans, cross-merge (see module docstring).

    Input and output are (B, H, W, C), any H x W.

    Args:
        dim: channels C.
        state_dim: states N per channel and direction. The default 1 and expand 1 are the
            configuration of VMamba's final models; Mamba's defaults are N = 16, expand 2.
        expand: E = expand * dim.
        dt_rank: rank R of the step-size projections; None gives ceil(dim / 16) (Mamba).
        conv_size: side of the depthwise convolution before the scan (odd; VMamba: 3).
        skip: add the input to the output (y = x + SS2D(x)), for placements without a residual
            around the layer; required by `reset_to_identity`.

    Attributes:
        fast_path: when True (default), one `selective_scan` over the four directions as groups
            and the permutation ops `cross_scan`, `cross_merge`; when False, a loop over the
            directions on `selective_scan_ref` with `cross_scan_ref`, `cross_merge_ref`. Only the
            reference path has a second derivative (double backward on the fast path raises).
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 1,
        expand: int = 1,
        dt_rank: int | None = None,
        conv_size: int = 3,
        skip: bool = False,
    ) -> None:
        super().__init__()
        dt_rank = math.ceil(dim / 16) if dt_rank is None and isinstance(dim, int) else dt_rank
        check_positive_ints(dim=dim, state_dim=state_dim, expand=expand, dt_rank=dt_rank, conv_size=conv_size)
        if conv_size % 2 == 0:
            raise ValueError(f"conv_size: expected an odd size (the convolution keeps the grid), got {conv_size}")
        self.dim, self.state_dim, self.expand, self.dt_rank = dim, state_dim, expand, dt_rank
        self.conv_size, self.skip = conv_size, skip
        self.fast_path = True
        inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, conv_size, padding=conv_size // 2, groups=inner)
        self.directions = nn.ModuleList(_Direction(inner, state_dim, dt_rank) for _ in range(K))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's init for the projections and the convolution (a model may rescale out_proj),
        Mamba's for each direction's SSM parameters."""
        self.in_proj.reset_parameters()
        self.conv2d.reset_parameters()
        for direction in self.directions:
            direction.reset_parameters()
        self.out_norm.reset_parameters()
        self.out_proj.reset_parameters()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: out_proj = 0, so y = x + 0 (needs skip=True)."""
        if not self.skip:
            raise ValueError(
                "reset_to_identity: expected skip=True (without it the layer's output is out_proj(...), which "
                "cannot be the identity), got skip=False; build it as functools.partial(SS2D, skip=True)"
            )
        self.out_proj.weight.zero_()

    def scan(self, u: Tensor) -> Tensor:
        """The four directions' selective scans of a (B, E, H, W) map: (B, K, E, L), sequence k in
        direction k's scan order (merge with `ssm2d.ops.cross_merge`)."""
        return self._scan_fast(u) if self.fast_path else self._scan_ref(u)

    def _scan_fast(self, u: Tensor) -> Tensor:
        """One `selective_scan` call: u (B, K E, L), B and C (B, K, N, L) as K groups."""
        b, e, _, _ = u.shape
        xs = cross_scan(u)  # (B, K, E, L)
        x_proj = torch.stack([d.x_proj.weight for d in self.directions])  # (K, R + 2N, E)
        dbl = torch.einsum("bkel,kce->bkcl", xs, x_proj)  # (B, K, R + 2N, L)
        dt, bs, cs = dbl.split([self.dt_rank, self.state_dim, self.state_dim], dim=2)
        A = -torch.exp(torch.cat([d.A_log for d in self.directions]))  # (K E, N)
        D = torch.cat([d.D for d in self.directions])  # (K E,)
        bias = torch.cat([d.dt_proj.bias for d in self.directions])  # (K E,)
        if u.device.type == "cpu":  # the K dt_proj as one block-diagonal map, bias and softplus fused
            blocks = torch.block_diag(*(d.dt_proj.weight for d in self.directions))  # (K E, K R)
            delta = step_sizes(rearrange(dt, "b k r l -> b l (k r)"), blocks, bias)  # (B, L, K E)
            delta, bias, softplus = rearrange(delta, "b l c -> b c l"), None, False  # a channels-last view
        else:  # the bias and softplus applied in the scan, as mamba-ssm's kernel does
            dt_proj = torch.stack([d.dt_proj.weight for d in self.directions])  # (K, E, R)
            delta = torch.einsum("bkrl,ker->bkel", dt, dt_proj).flatten(1, 2)  # (B, K E, L)
            softplus = True
        y = selective_scan(
            xs.flatten(1, 2), delta, A, bs.contiguous(), cs.contiguous(),
            D=D, delta_bias=bias, delta_softplus=softplus,
        )  # fmt: skip
        return y.view(b, K, e, xs.shape[-1])

    def _scan_ref(self, u: Tensor) -> Tensor:
        """A loop over the directions, each its own `selective_scan_ref` call."""
        xs = cross_scan_ref(u)  # (B, K, E, L)
        ys = []
        for k, d in enumerate(self.directions):
            u_k = xs[:, k]  # (B, E, L)
            dt, b_k, c_k = d.x_proj(u_k.mT).split([self.dt_rank, self.state_dim, self.state_dim], dim=-1)
            delta = F.linear(dt, d.dt_proj.weight).mT  # (B, E, L)
            ys.append(selective_scan_ref(
                u_k, delta, -torch.exp(d.A_log), b_k.mT, c_k.mT, D=d.D, delta_bias=d.dt_proj.bias,
                delta_softplus=True,
            ))  # fmt: skip
        return torch.stack(ys, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        grid = tuple(x.shape[1:3])
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, E) each
        u = F.silu(self.conv2d(rearrange(u, "b h w e -> b e h w")))  # (B, E, H, W)
        merge = cross_merge if self.fast_path else cross_merge_ref
        y = rearrange(merge(self.scan(u), grid), "b e h w -> b h w e")  # (B, H, W, E)
        y = self.out_proj(self.out_norm(y) * F.silu(z))
        return x + y if self.skip else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, expand={self.expand}, dt_rank={self.dt_rank}, "
            f"conv_size={self.conv_size}, skip={self.skip}, fast_path={self.fast_path}"
        )
