"""Vision Mamba's bidirectional mixer (Zhu et al., ICML 2024, arXiv 2401.09417; docs/math.md §9).

Glossary: B batch, L tokens, C = dim channels, E = expand * C inner channels, N state size,
R = dt_rank, H x W grid.

The "v2" bidirectional Mamba mixer of the released code::

    x, z = split(in_proj(h))                                   (B, E, L) each, shared
    per direction (forward on the sequence, backward on it reversed, then reversed back),
    each with its own conv1d, x_proj, dt_proj, A_log and D (the backward direction runs the
    reversed op in place, `MambaInner(..., reverse=True)`, rather than flipping):
        u = silu(causal_depthwise_conv1d(x))
        [dt, B, C] = x_proj(u);  delta = softplus(dt_proj(dt))
        y = (selective_scan(u, delta, A, B, C) + D u) * silu(z)
    out = out_proj((y_forward + y_backward) / 2)               out_proj shared

The "/2" merge is the "div2" of the released models (docs/math.md §9): without it the activations
double per layer. Each direction is a `MambaInner` (layers/mamba.py); checkpoints with the released
mixer's parameter names load through a state-dict mapping (`RELEASED_NAMES`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .checks import check_grid_input, check_positive_ints
from .mamba import MambaInner, rename_state_dict_keys

__all__ = ["VimMixer", "VimMixer2d"]


# The released mixer's parameter names -> ours: each direction's conv1d, x_proj, dt_proj, A_log
# and D live in `directions[0]` (forward) and `directions[1]` (backward).
RELEASED_NAMES = {
    **{name: f"directions.0.{name}" for name in ("conv1d", "x_proj", "dt_proj", "A_log", "D")},
    **{f"{name}_b": f"directions.1.{name}" for name in ("conv1d", "x_proj", "dt_proj", "D")},
    "A_b_log": "directions.1.A_log",
}


class VimMixer(nn.Module):
    """Vim's bidirectional Mamba mixer on a token sequence: (B, L, C) -> (B, L, C).

    It takes the sequence rather than a grid because Vim's class token sits inside the scanned
    sequence (docs/math.md §7, "in_sequence"); `VimMixer2d` is the (B, H, W, C) grid version.
    Checkpoints with the released mixer's parameter names (conv1d_b, A_b_log, ...; see
    `RELEASED_NAMES`) load into it.

    Args:
        dim: channels C.
        state_dim: states N per channel.
        expand: E = expand * dim.
        dt_rank: rank R of the step-size projection; None gives ceil(dim / 16) (Mamba).
        conv_size: kernel of the causal depthwise convolutions.

    Attributes:
        fast_path: the fast selective scan and `causal_conv1d` when True (default); their `_ref`
            twins (sequential recurrence, tap-by-tap convolution) when False.
    """

    def __init__(
        self, dim: int, state_dim: int = 16, expand: int = 2, dt_rank: int | None = None, conv_size: int = 4
    ) -> None:
        super().__init__()
        dt_rank = math.ceil(dim / 16) if dt_rank is None and isinstance(dim, int) else dt_rank
        check_positive_ints(dim=dim, state_dim=state_dim, expand=expand, dt_rank=dt_rank, conv_size=conv_size)
        self.dim, self.state_dim, self.expand, self.dt_rank, self.conv_size = dim, state_dim, expand, dt_rank, conv_size
        self.fast_path = True
        inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        # forward scan, backward scan: each its own conv1d, x_proj, dt_proj, A_log and D
        self.directions = nn.ModuleList(MambaInner(inner, state_dim, dt_rank, conv_size) for _ in range(2))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self._register_load_state_dict_pre_hook(rename_state_dict_keys(RELEASED_NAMES))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba defaults (docs/math.md §9): PyTorch's Linear and conv init, dt from logU[1e-3, 0.1],
        S4D-Real A = -(1..N) and D = 1 in both directions. A model rescales out_proj by
        1/sqrt(depth) (docs/math.md §9)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for direction in self.directions:
            direction.reset_parameters()

    def mix(self, x: Tensor) -> Tensor:
        """The mixer on a token sequence: (B, L, C) -> (B, L, C), L >= 1."""
        # split before transposing, and make each half contiguous once for both directions: u and z
        # are then (B, E, L) views of channels-last tensors, which the fused ops read without a copy
        u, z = (rearrange(t.contiguous(), "b l e -> b e l") for t in self.in_proj(x).chunk(2, dim=-1))
        forward, backward = self.directions
        y = forward(u, z, self.fast_path) + backward(u, z, self.fast_path, reverse=True)  # (B, E, L)
        # the div2 merge, (y_forward + y_backward) / 2, folded into out_proj's weight
        return F.linear(rearrange(y, "b e l -> b l e"), self.out_proj.weight / 2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, C) -> (B, L, C); batch 0 gives an empty output."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a floating-point (B, L, {self.dim}) tensor, got {got}")
        if x.shape[1] == 0:
            raise ValueError("x: expected a sequence of L >= 1 tokens, got L=0")
        return self.mix(x)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, expand={self.expand}, dt_rank={self.dt_rank}, "
            f"conv_size={self.conv_size}, fast_path={self.fast_path}"
        )


class VimMixer2d(VimMixer):
    """`VimMixer` on a grid: (B, H, W, C) -> (B, H, W, C), scanning the row-major flattening.

    The spatial-layer form, e.g. for `ssm2d.add_spatial_layers(vit, layer=VimMixer2d)`: the
    "1-D scan + position embedding" baseline of docs/math.md §9 in any backbone.

    Args:
        dim, state_dim, expand, dt_rank, conv_size: as `VimMixer`.
        skip: add the input to the output (y = x + mixer(x)), for placements without a residual
            around the layer; required by `reset_to_identity`.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_size: int = 4,
        skip: bool = False,
    ) -> None:
        super().__init__(dim, state_dim, expand, dt_rank, conv_size)
        self.skip = skip

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: out_proj = 0, so y = x + 0 (needs skip=True)."""
        if not self.skip:
            raise ValueError(
                "reset_to_identity: expected skip=True (without it the layer's output is out_proj(...), which "
                "cannot be the identity), got skip=False; build it as functools.partial(VimMixer2d, skip=True)"
            )
        self.out_proj.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); batch 0 gives an empty output."""
        check_grid_input(x, self.dim)
        y = self.mix(x.flatten(1, 2)).unflatten(1, x.shape[1:3])  # row-major
        return x + y if self.skip else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, skip={self.skip}"
