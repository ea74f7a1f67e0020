"""V2M: the 2-D selective SSM of Wang et al. (arXiv 2410.10382), over four corner orientations.

Glossary: B batch, H x W grid, C = dim channels, E = expand * C inner channels, N state size,
R = dt_rank, S sequences (a batch of 1-D scans).

The 2-D state recurrence is decomposed into two Mamba-1 selective scans (docs/math.md §10): for
each corner, pass 1 scans every row (along W) and pass 2 scans every column (along H) of the
gated pass-1 output. Each pass is one Mamba "inner" op (`MambaInner`, layers/mamba.py)::

    u~ = silu(causal_depthwise_conv1d_k4(u))              along the scan axis
    [dt, B, C] = x_proj(u~);  delta = softplus(dt_proj(dt))
    y = (selective_scan(u~, delta, A, B, C) + D u~) * silu(z)

With the released choice (docs/math.md §10) pass 1 learns B and holds C at 1 (the state is summed), and
pass 2 holds B at 1 and learns C. The four corners (top-left, top-right, bottom-left,
bottom-right) are the same op on the grid flipped along nothing, W, H or both; their outputs are
flipped back and averaged before out_proj, so the output at a cell depends on all four of its
quadrants. All corners share every weight, as in the released code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .checks import check_grid_input, check_positive_ints
from .mamba import MambaInner

__all__ = ["V2M"]


# An orientation: (grid dims to flip, transpose the grid first). Dims of a (B, H, W, E) grid.
Orientation = tuple[tuple[int, ...], bool]
# Faithful (docs/math.md §10): the four corners TL, TR, BL, BR, each rows (W) first, then columns (H).
CORNERS: tuple[Orientation, ...] = (((), False), ((2,), False), ((1,), False), ((1, 2), False))
# Released code (docs/math.md §10, the released layout): fh = TL rows first, fv = TL columns first, bh = TR rows
# first, bv = BL columns first; no bottom-right corner.
RELEASED: tuple[Orientation, ...] = (((), False), ((), True), ((2,), False), ((1,), True))
# Where the released code sums each branch (appendix trace): the aligned map flipped along these
# dims, then transposed. fh, fv at (a, b) hold token (b, a); bh token (P-1-b, a); bv (b, P-1-a).
RELEASED_PLACEMENT: tuple[tuple[int, ...], ...] = ((), (), (1,), (2,))


def _orient(t: Tensor, orientation: Orientation) -> Tensor:
    """(B, H, W, E) grid -> the grid as the orientation scans it (flipped, maybe transposed)."""
    flips, transpose = orientation
    t = t.flip(flips) if flips else t
    return t.transpose(1, 2) if transpose else t


def _unorient(t: Tensor, orientation: Orientation) -> Tensor:
    """Inverse of `_orient`: back to the input's alignment."""
    flips, transpose = orientation
    t = t.transpose(1, 2) if transpose else t
    return t.flip(flips) if flips else t


def _pass1_frame(orientation: Orientation) -> Orientation:
    """The orientation's pass-1 frame: the same transpose, flipped along the pass-1 axis only.

    Pass 1 scans along dim 2 of the oriented grid (W, or H when transposed); a flip of the other
    axis only reorders those rows, and reverses pass 2 (`_flips_pass2_axis`).
    """
    flips, transpose = orientation
    axis = 1 if transpose else 2  # the grid dim that pass 1 scans along
    return ((axis,) if axis in flips else (), transpose)


def _flips_pass2_axis(orientation: Orientation) -> bool:
    """Whether the orientation flips the grid dim that pass 2 scans along."""
    flips, transpose = orientation
    return (2 if transpose else 1) in flips


def _columns(t: Tensor) -> Tensor:
    """(B, H', W', E) oriented grid -> (B W', E, H'): each column a sequence, channels-last."""
    t = t.transpose(1, 2).contiguous()  # (B, W', H', E)
    return rearrange(t, "b w h e -> (b w) e h")


class V2M(nn.Module):
    """V2M spatial mixer: four-corner 2-D selective SSM (Wang et al.; docs/math.md §10).

    Input and output are (B, H, W, C), any H x W. in_proj (no bias) gives the signal x and the
    gate z, each E = expand * C wide; for every corner the grid is flipped, scanned along rows
    (pass 1) and then along columns (pass 2), both gated by silu(z), and flipped back; out_proj
    (no bias) maps the average over the corners back to C. The two passes have their own conv,
    x_proj, dt_proj, A and D, shared by all corners.

    Args:
        dim: channels C.
        state_dim: states N per channel.
        expand: E = expand * dim.
        dt_rank: rank of the step-size projection; None gives ceil(dim / 16) (Mamba).
        conv_size: kernel of the causal depthwise convolutions along the scan axis.
        full_bc: False (default, released code, docs/math.md §10): pass 1 learns B and holds C
            at 1, pass 2 holds B at 1 and learns C (x_proj: E -> R + N). True: both passes
            learn B and C (x_proj: E -> R + 2N), a full selective SSM per pass.
        official_layout: reproduce the released code's layout instead (square grids only,
            docs/math.md §10, the released layout): branches TL rows-first, TL columns-first, TR and
            BL, no bottom-right corner, summed at transposed or rotated positions and halved.
        skip: add the input to the output (y = x + V2M(x)), for placements without a residual
            around the layer; required by `reset_to_identity`.

    Attributes:
        fast_path: the fast selective scan and `causal_conv1d` when True (default); their `_ref`
            twins (sequential recurrence, tap-by-tap convolution) when False.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_size: int = 4,
        full_bc: bool = False,
        official_layout: bool = False,
        skip: bool = False,
    ) -> None:
        super().__init__()
        dt_rank = math.ceil(dim / 16) if dt_rank is None and isinstance(dim, int) else dt_rank
        check_positive_ints(dim=dim, state_dim=state_dim, expand=expand, dt_rank=dt_rank, conv_size=conv_size)
        self.dim, self.state_dim, self.expand, self.dt_rank = dim, state_dim, expand, dt_rank
        self.conv_size, self.full_bc, self.official_layout, self.skip = conv_size, full_bc, official_layout, skip
        self.fast_path = True
        inner = expand * dim
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.pass1 = MambaInner(inner, state_dim, dt_rank, conv_size, "BC" if full_bc else "B")
        self.pass2 = MambaInner(inner, state_dim, dt_rank, conv_size, "BC" if full_bc else "C")
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba defaults (docs/math.md §9): PyTorch's Linear init for in_proj and out_proj (a model
        rescales out_proj by 1/sqrt(depth)), and each pass's own reset."""
        self.in_proj.reset_parameters()
        self.pass1.reset_parameters()
        self.pass2.reset_parameters()
        self.out_proj.reset_parameters()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: out_proj = 0, so y = x + 0 (needs skip=True).

        Used to insert layers into a trained model without changing its outputs; fine-tuning
        moves out_proj away from zero, and the gradients then reach the rest of the layer.
        """
        if not self.skip:
            raise ValueError(
                "reset_to_identity: expected skip=True (without it the layer's output is out_proj(...), which "
                "cannot be the identity), got skip=False; build it as functools.partial(V2M, skip=True)"
            )
        self.out_proj.weight.zero_()

    @property
    def orientations(self) -> tuple[Orientation, ...]:
        """(flip dims, transposed) of each branch, in the order of `orientation_outputs`."""
        return RELEASED if self.official_layout else CORNERS

    def orientation_outputs(self, x: Tensor) -> Tensor:
        """Each branch's gated pass-2 output, placed where it is merged: (4, B, H, W, E).

        Faithful layout: the corners TL, TR, BL, BR, each aligned with the input, so that
        branch k at a cell depends only on the cell's quadrant k. Official layout: the released
        branches fh, fv, bh, bv at the positions where the released code sums them.

        Each branch is pass 1 on its pass-1 frame (`_pass1_frame`), then pass 2 forwards or
        backwards along the frame's columns (docs/math.md §10): the corner flips of the pass-2
        axis only reorder pass 1's rows and reverse pass 2. So the faithful layout runs pass 1 on
        2 frames (TL/BL and TR/BR scan the same rows) and pass 2 forwards and in reverse on both:
        6 scans over the grid instead of 8, and flips for the top-right frame only.
        """
        check_grid_input(x, self.dim)
        if self.official_layout and x.shape[1] != x.shape[2]:
            raise ValueError(f"x: official_layout=True expects a square grid, got H x W = {x.shape[1]} x {x.shape[2]}")
        orientations = self.orientations
        frames = list(dict.fromkeys(_pass1_frame(o) for o in orientations))
        xz = self.in_proj(x)  # (B, H, W, 2E)
        xz = torch.cat([_orient(xz, f) for f in frames])  # (F B, H', W', 2E), pass-1 frames
        rows, cols = xz.shape[1:3]
        u, z = rearrange(xz, "b h w e -> (b h) e w").chunk(2, dim=1)  # (F B H', E, W') views each
        u = self.pass1(u, z, self.fast_path)  # along rows
        # Pass 2 scans the columns of the gated pass-1 output, gated by the same z; built as
        # (F B, W', H', E) so that (b w) e h is a channels-last view, as the fused ops read it.
        u, z = (_columns(rearrange(t, "(b h) e w -> b h w e", h=rows)) for t in (u, z))  # (F B W', E, H') each
        y = {
            rev: self.pass2(u, z, self.fast_path, reverse=rev)  # (F B W', E, H')
            for rev in dict.fromkeys(_flips_pass2_axis(o) for o in orientations)
        }  # pass 2 forwards (False) and backwards (True) along the columns
        y = {rev: rearrange(t, "(f b w) e h -> f b h w e", f=len(frames), w=cols) for rev, t in y.items()}
        y = [
            _unorient(y[_flips_pass2_axis(o)][frames.index(_pass1_frame(o))], _pass1_frame(o)) for o in orientations
        ]  # aligned with the input
        if self.official_layout:
            y = [(t.flip(dims) if dims else t).transpose(1, 2) for t, dims in zip(y, RELEASED_PLACEMENT)]
        return torch.stack(y)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); batch 0 gives an empty output."""
        branches = self.orientation_outputs(x)  # (4, B, H, W, E)
        # Faithful: the average over corners (docs/math.md §10). Released code: (sum of 4) / 2.
        merged = branches.sum(0) / 2 if self.official_layout else branches.mean(0)
        y = self.out_proj(merged)
        return x + y if self.skip else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, expand={self.expand}, dt_rank={self.dt_rank}, "
            f"conv_size={self.conv_size}, full_bc={self.full_bc}, official_layout={self.official_layout}, "
            f"skip={self.skip}, fast_path={self.fast_path}"
        )
