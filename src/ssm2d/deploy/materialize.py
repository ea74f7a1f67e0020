"""Spatial layers with their kernels fixed for one grid: what an exported model runs.

The 2-D SSM and S4ND compute their kernels from their parameters on every grid size. For a
deployed model at one input size the kernel is a constant: each layer becomes a depthwise
convolution (`nn.Conv2d` with groups = channels) whose weight is the layer's folded kernel for
that grid, the skip term folded into its center tap, followed by the layer's own output terms.
Mega's EMA (an FFT convolution along the flattened grid) becomes a depthwise `nn.Conv1d` over
that sequence, its two one-sided kernels joined into one of 2 L - 1 taps. ONNX and
`torch.export` then see nothing but standard operators.

Layers of ssm2d that have no such form, the selective scans (Vim, V2M, VMamba's SS2D), are
refused with an error naming them.

Glossary: B batch, H x W grid, L = H W, C channels, G S4ND kernels per channel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import Ssm2dError
from ..layers import (
    S4ND, SSM2D, DWConv2d, MegaEMA, SPAttention, SPAttentionOnTokens, SpatialAfter, SpatialOnTokens, SpatialPrior,
)
from ..layers.checks import check_grid_input
from ..layers.mega import MovingAverageGatedAttention, NormalizedFFN
from ..ops import fold_directions

__all__ = [
    "EXPORTABLE_LAYERS", "ExportError", "FixedDepthwiseConv", "FixedSequenceConv", "check_exportable",
    "materialize_kernels",
]  # fmt: skip

# Modules of ssm2d.layers that export as they are (their forward is standard operators);
# SSM2D and S4ND export once `materialize_kernels` has turned them into `FixedDepthwiseConv`,
# MegaEMA into `FixedSequenceConv`.
EXPORTABLE_LAYERS: tuple[type[nn.Module], ...] = (
    SSM2D, S4ND, MegaEMA, DWConv2d, SpatialAfter, SpatialOnTokens, SPAttention, SPAttentionOnTokens, SpatialPrior,
    MovingAverageGatedAttention, NormalizedFFN,
)  # fmt: skip


class ExportError(Ssm2dError, ValueError):
    """A model that cannot be exported, or whose exported program disagrees with it."""


def _check_materialized_grid(x: Tensor, dim: int, grid: tuple[int, int]) -> None:
    """x must be a (B, H, W, dim) grid of the size a fixed layer's kernel was materialized for."""
    check_grid_input(x, dim)
    if tuple(x.shape[1:3]) != grid:
        raise ValueError(
            f"x: this layer's kernel was materialized for a {grid[0]}x{grid[1]} grid, "
            f"got {x.shape[1]}x{x.shape[2]}; export the model again at that input size"
        )


class FixedDepthwiseConv(nn.Module):
    """A spatial layer frozen on one grid: (B, H, W, C) -> (B, H, W, C'), H x W fixed.

    y = post(conv(x repeated `repeats` times along the channels)), where conv is a depthwise
    `nn.Conv2d` holding a centered kernel (zero padding, output on the input grid).

    Args:
        kernel: (C G, kh2, kw2), odd sizes, centered: entry (kh2 // 2 + p, kw2 // 2 + q) weighs
            the input at offset (-p, -q), as `ssm2d.ops.fold_directions` returns it.
        grid: the (H, W) the kernel was materialized for; other grids are refused.
        repeats: G, copies of the input channels (S4ND's `channels`), channel g C + c is copy g of c.
        post: what the layer applies after its convolution (nn.Identity when nothing).
    """

    def __init__(self, kernel: Tensor, grid: tuple[int, int], repeats: int = 1, post: nn.Module | None = None) -> None:
        super().__init__()
        channels, kh2, kw2 = kernel.shape
        if kh2 % 2 == 0 or kw2 % 2 == 0:
            raise ValueError(f"kernel: expected odd (centered) sizes, got {tuple(kernel.shape)}")
        if channels % repeats:
            raise ValueError(f"repeats: expected a divisor of the kernel's {channels} channels, got {repeats}")
        self.dim, self.grid, self.repeats = channels // repeats, tuple(grid), repeats
        self.conv = nn.Conv2d(
            channels, channels, (kh2, kw2), padding=(kh2 // 2, kw2 // 2), groups=channels, bias=False,
            dtype=kernel.dtype, device=kernel.device,
        )  # fmt: skip
        with torch.no_grad():
            self.conv.weight.copy_(kernel.flip(-2, -1)[:, None])  # Conv2d correlates: flip to convolve
        self.post = nn.Identity() if post is None else post

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) on the materialized grid -> (B, H, W, C')."""
        _check_materialized_grid(x, self.dim, self.grid)
        u = x.repeat(1, 1, 1, self.repeats) if self.repeats > 1 else x
        y = self.conv(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.post(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, repeats={self.repeats}"


class FixedSequenceConv(nn.Module):
    """A layer along the row-major flattened grid, frozen on one grid: (B, H, W, C) -> (B, H, W, C).

    y_t = sum over lags s of kernel[c, L - 1 + s] x_{t - s}, |s| < L = H W, zero outside the
    sequence: a depthwise `nn.Conv1d` with L - 1 zeros of padding on each side.

    Args:
        kernel: (C, 2 L - 1), lag s at index L - 1 + s (lag 0 in the middle).
        grid: the (H, W) the kernel was materialized for; other grids are refused.
    """

    def __init__(self, kernel: Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        channels, taps = kernel.shape
        if taps != 2 * grid[0] * grid[1] - 1:
            raise ValueError(f"kernel: expected 2 H W - 1 = {2 * grid[0] * grid[1] - 1} taps, got {taps}")
        self.dim, self.grid = channels, tuple(grid)
        self.conv = nn.Conv1d(
            channels, channels, taps, padding=taps // 2, groups=channels, bias=False, dtype=kernel.dtype,
            device=kernel.device,
        )  # fmt: skip
        with torch.no_grad():
            self.conv.weight.copy_(kernel.flip(-1)[:, None])  # Conv1d correlates: flip to convolve

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) on the materialized grid -> (B, H, W, C)."""
        _check_materialized_grid(x, self.dim, self.grid)
        y = self.conv(x.flatten(1, 2).transpose(1, 2))  # (B, C, L)
        return y.transpose(1, 2).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}"


@torch.no_grad()
def _ssm2d_conv(layer: SSM2D, grid: tuple[int, int]) -> FixedDepthwiseConv:
    # The eval forward: y = norm(K * x + omega x), K the folded kernel of every direction.
    kernels = layer.kernels(layer.kernel_grid(grid))  # (d, C, kh, kw)
    skip = layer.omega.to(kernels.dtype) if layer.omega is not None else None
    kernel = fold_directions(kernels, skip).to(layer.c_raw.dtype)  # (C, 2kh-1, 2kw-1)
    return FixedDepthwiseConv(kernel, grid, post=copy.deepcopy(layer.norm))


@torch.no_grad()
def _ema_conv(layer: MegaEMA, grid: tuple[int, int]) -> FixedSequenceConv:
    # The forward (docs/math.md §12): y_t = sum_s kf_s x_{t-s} + sum_s kb_s x_{t+s} + omega x_t, s >= 0.
    length = grid[0] * grid[1]
    kernels = layer.kernels(length)  # (D, C, L), lag s at index s
    kernel = kernels.new_zeros(layer.dim, 2 * length - 1)
    kernel[:, length - 1 :] = kernels[0]  # lags 0 .. L-1
    if layer.bidirectional:
        kernel[:, : length - 1] += kernels[1, :, 1:].flip(-1)  # lags -(L-1) .. -1
        kernel[:, length - 1] += kernels[1, :, 0]
    if layer.omega is not None:
        kernel[:, length - 1] += layer.omega.to(kernel.dtype)
    return FixedSequenceConv(kernel, grid)


class _S4NDOutput(nn.Module):
    """S4ND's terms after its convolution when `linear=False`: GELU, dropout, output linear, GLU."""

    def __init__(self, layer: S4ND) -> None:
        super().__init__()
        self.dropout, self.output_linear = copy.deepcopy(layer.dropout), copy.deepcopy(layer.output_linear)
        self.glu = layer.glu

    def forward(self, y: Tensor) -> Tensor:
        """y: (B, H, W, G C) -> (B, H, W, C)."""
        y = self.output_linear(self.dropout(nn.functional.gelu(y)))
        return nn.functional.glu(y, dim=-1) if self.glu else y


@torch.no_grad()
def _s4nd_conv(layer: S4ND, grid: tuple[int, int]) -> FixedDepthwiseConv:
    # The eval forward: y = K * u + D u with u = x repeated G times, K = k_h k_w^T per channel.
    kernel = layer.kernel(grid).clone()  # (G C, 2kh-1, 2kw-1)
    kh, kw = kernel.shape[1] // 2, kernel.shape[2] // 2
    kernel[:, kh, kw] += layer.D.flatten().to(kernel.dtype)
    post = None if layer.linear else _S4NDOutput(layer)
    return FixedDepthwiseConv(kernel.to(layer.C.dtype), grid, repeats=layer.channels, post=post)


# The layers `materialize_kernels` replaces, each by the fixed convolution its function builds
# for the example's grid.
_MATERIALIZE = {SSM2D: _ssm2d_conv, S4ND: _s4nd_conv, MegaEMA: _ema_conv}
_MATERIALIZED = tuple(_MATERIALIZE)


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError naming the first layer of ssm2d in `model` that has no exportable form.

    Every module of a class from `ssm2d.layers` must be one of `EXPORTABLE_LAYERS`; the others
    (the selective scans of Vim, V2M and SS2D, and any layer added later until it is listed) are
    refused rather than traced into a wrong or failing graph.
    """
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__module__.startswith("ssm2d.layers.") or isinstance(module, EXPORTABLE_LAYERS):
            continue
        listed = ", ".join(c.__name__ for c in EXPORTABLE_LAYERS)
        raise ExportError(
            f"model: layer {name or '(the model itself)'} ({cls.__module__}.{cls.__qualname__}) cannot be exported: "
            f"it has no exportable form (ssm2d exports fixed kernels and standard operators, not the data-dependent "
            f"recurrence of a selective scan); "
            f"exportable ssm2d layers: {listed}"
        )


@torch.no_grad()
def materialize_kernels(model: nn.Module, example: Tensor) -> nn.Module:
    """A copy of `model` in eval mode with every SSM2D and S4ND replaced by a `FixedDepthwiseConv`,
    every MegaEMA by a `FixedSequenceConv`.

    The grid of each layer is read from one forward pass of `example`; the copy then computes
    what `model.eval()` computes on inputs of the example's size (to float round-off), with
    standard operators only.

    Args:
        model: any model; it is not modified.
        example: an input of the size to export, e.g. (1, in_chans, H_img, W_img).

    Raises:
        ExportError: a layer of `model` cannot be exported (see `check_exportable`).
    """
    check_exportable(model)
    frozen = copy.deepcopy(model).eval()
    grids: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in frozen.named_modules():
        if isinstance(module, _MATERIALIZED):
            record = lambda m, args, name=name: grids.__setitem__(name, tuple(args[0].shape[1:3]))  # noqa: E731
            hooks.append(module.register_forward_pre_hook(record))
    try:
        frozen(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in list(frozen.named_modules()):
        if not isinstance(module, _MATERIALIZED):
            continue
        if name not in grids:
            raise ExportError(f"model: layer {name} ({type(module).__name__}) did not run on the example input")
        make = next(fn for cls, fn in _MATERIALIZE.items() if isinstance(module, cls))
        conv = make(module, grids[name])
        parent_name, _, attr = name.rpartition(".")
        setattr(frozen.get_submodule(parent_name), attr, conv)
    return frozen
