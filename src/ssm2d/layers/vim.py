"""Vision Mamba's bidirectional mixer (Zhu et al., ICML 2024, arXiv 2401.09417; spec 2.1).

Glossary: B batch, L tokens, C = dim channels, E = expand * C inner channels, N state size,
R = dt_rank, H x W grid.

The "v2" bidirectional Mamba mixer of the released code::

    x, z = split(in_proj(h))                                   (B, E, L) each, shared
    per direction (forward on the sequence, backward on it reversed, then reversed back),
    each with its own conv1d, x_proj, dt_proj, A_log and D:
        u = silu(causal_depthwise_conv1d(x))
        [dt, B, C] = x_proj(u);  delta = softplus(dt_proj(dt))
        y = (selective_scan(u, delta, A, B, C) + D u) * silu(z)
    out = out_proj((y_forward + y_backward) / 2)               out_proj shared

The "/2" merge is the "div2" of the released models (spec 2.1): without it the activations
double per layer. Parameter names are those of the released mixer, so its mixer weights load.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from ..ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from ..ops.selective_scan import selective_scan, selective_scan_ref
from .checks import check_positive_ints
from .mamba_init import init_dt_proj, s4d_real_a_log
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["VimMixer", "VimMixer2d"]


# Direction -> its parameter names: (conv1d, x_proj, dt_proj, A_log, D), as in the released code.
_DIRECTIONS = {
    "forward": ("conv1d", "x_proj", "dt_proj", "A_log", "D"),
    "backward": ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b"),
}


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class VimMixer(TaggedModule):
    """Vim's bidirectional Mamba mixer on a token sequence: (B, L, C) -> (B, L, C).

    It takes the sequence rather than a grid because Vim's class token sits inside the scanned
    sequence (spec 5.2, "in_sequence"); `VimMixer2d` is the (B, H, W, C) grid version.

    Args:
        dim: channels C.
        state_dim: states N per channel.
        expand: E = expand * dim.
        dt_rank: rank R of the step-size projection; None gives ceil(dim / 16) (Mamba).
        conv_size: kernel of the causal depthwise convolutions.

    Attributes:
        fast_path: the chunked selective scan and `F.conv1d` when True (default); their `_ref`
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
        for conv, x_proj, dt_proj, a_log, d in _DIRECTIONS.values():
            # Holds the depthwise taps (E, 1, W); applied by `causal_conv1d`, not called.
            setattr(self, conv, nn.Conv1d(inner, inner, conv_size, groups=inner))
            setattr(self, x_proj, nn.Linear(inner, dt_rank + 2 * state_dim, bias=False))
            setattr(self, dt_proj, nn.Linear(dt_rank, inner))
            setattr(self, a_log, nn.Parameter(torch.empty(inner, state_dim)))
            setattr(self, d, nn.Parameter(torch.empty(inner)))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self._tag_parameters()
        self.reset_parameters()

    def _tag_parameters(self) -> None:
        for _, _, dt_proj, a_log, d in _DIRECTIONS.values():
            for p in (getattr(self, a_log), getattr(self, d), getattr(self, dt_proj).bias):
                p._optim = NO_WEIGHT_DECAY  # Mamba (spec 2.1): A, D and the dt bias skip weight decay

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba defaults (spec 2.1): PyTorch's Linear and conv init, dt from logU[1e-3, 0.1],
        S4D-Real A = -(1..N) and D = 1 in both directions. A model rescales out_proj by
        1/sqrt(depth) (spec 2.1)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        for conv, x_proj, dt_proj, a_log, d in _DIRECTIONS.values():
            getattr(self, conv).reset_parameters()
            getattr(self, x_proj).reset_parameters()
            init_dt_proj(getattr(self, dt_proj), self.dt_rank)
            getattr(self, a_log).copy_(s4d_real_a_log(self.expand * self.dim, self.state_dim))
            getattr(self, d).fill_(1.0)

    def _scan(self, x: Tensor, z: Tensor, direction: str) -> Tensor:
        """One direction's conv, projections and gated selective scan: (B, E, L) -> (B, E, L)."""
        conv, x_proj, dt_proj, a_log, d = (getattr(self, n) for n in _DIRECTIONS[direction])
        conv_fn, scan = (causal_conv1d, selective_scan) if self.fast_path else (causal_conv1d_ref, selective_scan_ref)
        u = conv_fn(x, conv.weight[:, 0], conv.bias, activation="silu")  # (B, E, L)
        dt, b, c = x_proj(rearrange(u, "b e l -> b l e")).split([self.dt_rank, self.state_dim, self.state_dim], -1)
        delta = rearrange(dt @ dt_proj.weight.t(), "b l e -> b e l")  # (B, E, L); bias added in the scan
        b, c = (rearrange(t, "b l n -> b n l") for t in (b, c))  # (B, N, L) each
        A = -torch.exp(_at_least_float32(a_log))  # (E, N); A, D and the dt bias stay >= float32 (Mamba)
        d, dt_bias = _at_least_float32(d), _at_least_float32(dt_proj.bias)
        return scan(u, delta, A, b, c, D=d, z=z, delta_bias=dt_bias, delta_softplus=True)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, C) -> (B, L, C)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, L, {self.dim}), got {tuple(x.shape)}")
        u, z = rearrange(self.in_proj(x), "b l e -> b e l").chunk(2, dim=1)  # (B, E, L) each
        y_forward = self._scan(u, z, "forward")
        y_backward = self._scan(u.flip(-1), z.flip(-1), "backward").flip(-1)  # along the reversed sequence
        return self.out_proj(rearrange((y_forward + y_backward) / 2, "b e l -> b l e"))  # div2 merge

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, expand={self.expand}, dt_rank={self.dt_rank}, "
            f"conv_size={self.conv_size}, fast_path={self.fast_path}"
        )


class VimMixer2d(VimMixer):
    """`VimMixer` on a grid: (B, H, W, C) -> (B, H, W, C), scanning the row-major flattening.

    The spatial-layer form, e.g. for `ssm2d.add_spatial_layers(vit, layer=VimMixer2d)`: the
    "1-D scan + position embedding" baseline of spec 2.1 in any backbone.

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
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (B, H, W, {self.dim}), got {tuple(x.shape)}")
        y = super().forward(x.flatten(1, 2)).unflatten(1, x.shape[1:3])  # row-major tokens
        return x + y if self.skip else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, skip={self.skip}"
