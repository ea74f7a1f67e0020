"""Spatial layers with their kernels fixed for one grid: what an exported model runs.

The 2-D SSM and S4ND compute their kernels from their parameters on every grid size. For a
deployed model at one input size the kernel is a constant: each layer becomes a depthwise
convolution (`nn.Conv2d` with groups = channels) whose weight is the layer's folded kernel for
that grid, the skip term folded into its center tap, followed by the layer's own output terms.
ONNX and `torch.export` then see nothing but standard operators.

Layers of ssm2d that have no such form, above all the selective scans (Vim, V2M), are refused
with an error naming them.

Glossary: B batch, H x W grid, C channels, G S4ND kernels per channel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import S4ND, SSM2D, SPAttention, SPAttentionOnTokens, SpatialAfter, SpatialOnTokens, SpatialPrior
from ..errors import Ssm2dError
from ..layers.checks import check_grid_input
from ..ops import fold_directions

__all__ = ["EXPORTABLE_LAYERS", "ExportError", "FixedDepthwiseConv", "check_exportable", "materialize_kernels"]

# Modules of ssm2d.layers that export as they are (their forward is standard operators);
# SSM2D and S4ND export once `materialize_kernels` has turned them into `FixedDepthwiseConv`.
EXPORTABLE_LAYERS: tuple[type[nn.Module], ...] = (
    SSM2D, S4ND, SpatialAfter, SpatialOnTokens, SPAttention, SPAttentionOnTokens, SpatialPrior,
)  # fmt: skip


class ExportError(Ssm2dError, ValueError):
    """A model that cannot be exported, or whose exported program disagrees with it."""


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
        check_grid_input(x, self.dim)
        if tuple(x.shape[1:3]) != self.grid:
            raise ValueError(
                f"x: this layer's kernel was materialized for a {self.grid[0]}x{self.grid[1]} grid, "
                f"got {x.shape[1]}x{x.shape[2]}; export the model again at that input size"
            )
        u = x.repeat(1, 1, 1, self.repeats) if self.repeats > 1 else x
        y = self.conv(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.post(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, repeats={self.repeats}"


@torch.no_grad()
def _ssm2d_conv(layer: SSM2D, grid: tuple[int, int]) -> FixedDepthwiseConv:
    # The eval forward: y = norm(K * x + omega x), K the folded kernel of every direction.
    kernels = layer.kernels(layer.kernel_grid(grid))  # (d, C, kh, kw)
    skip = layer.omega.to(kernels.dtype) if layer.omega is not None else None
    kernel = fold_directions(kernels, skip).to(layer.c_raw.dtype)  # (C, 2kh-1, 2kw-1)
    return FixedDepthwiseConv(kernel, grid, post=copy.deepcopy(layer.norm))


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


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError naming the first layer of ssm2d in `model` that has no exportable form.

    Every module of a class from `ssm2d.layers` must be one of `EXPORTABLE_LAYERS`; the others
    (the selective scans of Vim and V2M, and any layer added later until it is listed) are
    refused rather than traced into a wrong or failing graph.
    """
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__module__.startswith("ssm2d.layers.") or isinstance(module, EXPORTABLE_LAYERS):
            continue
        listed = ", ".join(c.__name__ for c in EXPORTABLE_LAYERS)
        raise ExportError(
            f"model: layer {name or '(the model itself)'} ({cls.__module__}.{cls.__qualname__}) cannot be exported: "
            f"it has no fixed-kernel form (a selective scan runs a data-dependent recurrence); "
            f"exportable ssm2d layers: {listed}"
        )


@torch.no_grad()
def materialize_kernels(model: nn.Module, example: Tensor) -> nn.Module:
    """A copy of `model` in eval mode with every SSM2D and S4ND replaced by a `FixedDepthwiseConv`.

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
        if isinstance(module, (SSM2D, S4ND)):
            record = lambda m, args, name=name: grids.__setitem__(name, tuple(args[0].shape[1:3]))  # noqa: E731
            hooks.append(module.register_forward_pre_hook(record))
    try:
        frozen(example)
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in list(frozen.named_modules()):
        if not isinstance(module, (SSM2D, S4ND)):
            continue
        if name not in grids:
            raise ExportError(f"model: layer {name} ({type(module).__name__}) did not run on the example input")
        conv = _ssm2d_conv(module, grids[name]) if isinstance(module, SSM2D) else _s4nd_conv(module, grids[name])
        parent_name, _, attr = name.rpartition(".")
        setattr(frozen.get_submodule(parent_name), attr, conv)
    return frozen
