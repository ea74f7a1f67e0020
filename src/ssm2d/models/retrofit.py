"""Insert spatial layers into timm's ViT/DeiT, Swin and ConvNeXt, in place (docs/math.md §7).

The backbones stay timm's own classes: a placement wraps one submodule of every block (the
pre-attention norm, the MLP's first linear, or the depthwise convolution) so that its output
goes through a spatial layer. The wrapped module's keys gain a `.base` level, and the wrappers
also accept them under their timm names, so timm checkpoints load before or after insertion
(after it with strict=False: the spatial layers' keys are new).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer

from ..layers import SSM2D
from ..layers.placement import GridSize, SpatialAfter, SpatialOnTokens

__all__ = ["PLACEMENTS", "add_spatial_layers", "layer_grids", "spatial_layers"]

SpatialLayer = Callable[[int], nn.Module]

# Family -> valid placements, the paper's default first (docs/math.md §7).
PLACEMENTS: dict[str, tuple[str, ...]] = {
    "vit": ("pre-attention", "mix-ffn"),
    "swin": ("pre-attention",),
    "convnext": ("dwconv", "post-dwconv"),
}


def _family(model: nn.Module) -> str:
    for cls, family in ((VisionTransformer, "vit"), (SwinTransformer, "swin"), (ConvNeXt, "convnext")):
        if isinstance(model, cls):
            return family
    raise TypeError(
        f"model: expected a timm VisionTransformer (ViT/DeiT), SwinTransformer or ConvNeXt, got {type(model).__name__}"
    )


def _build(layer: SpatialLayer, dim: int, init: str) -> nn.Module:
    spatial = layer(dim)
    if not isinstance(spatial, nn.Module):
        raise TypeError(f"layer: expected layer(dim) to return an nn.Module, got {type(spatial).__name__}")
    if init == "identity":
        reset = getattr(spatial, "reset_to_identity", None)
        if reset is None:
            raise TypeError(f"init='identity': {type(spatial).__name__} has no reset_to_identity() method")
        reset()
    return spatial


def _vit_sites(model: VisionTransformer, placement: str) -> list[tuple[nn.Module, str, int]]:
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("model: patch dropout removes tokens from the grid; build it with patch_drop_rate=0")
    sites = []
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise TypeError(f"model.blocks[{i}]: expected timm's pre-norm Block, got {type(block).__name__}")
        if placement == "pre-attention":
            # Between norm1 and the attention, so that Q, K and V read the layer's output.
            sites.append((block, "norm1", model.embed_dim))
        else:  # mix-ffn: fc1 -> spatial on the widened grid -> act -> fc2
            sites.append((block.mlp, "fc1", block.mlp.fc1.out_features))
    return sites


def _swin_sites(model: SwinTransformer) -> list[tuple[nn.Module, str, int]]:
    # norm1 returns the whole (B, H, W, C) stage map; the shift and windows come after it.
    return [(m, "norm1", m.dim) for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def _convnext_sites(model: ConvNeXt, placement: str, init: str) -> list[tuple[nn.Module, str, int]]:
    if placement == "dwconv" and init == "identity":
        raise ValueError(
            "init='identity': replacing the depthwise convolution changes the model's outputs; "
            "use placement='post-dwconv' to keep the convolution and add the layer after it"
        )
    sites = []
    for block in [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]:
        conv = block.conv_dw
        if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels):
            raise TypeError(f"model: expected depthwise nn.Conv2d blocks, got {conv!r}")
        if conv.stride != (1, 1):
            raise ValueError(f"model: the spatial layer keeps the grid, but a depthwise conv has stride {conv.stride}")
        sites.append((block, "conv_dw", conv.in_channels))
    return sites


def _wrap(
    family: str, placement: str, base: nn.Module, spatial: nn.Module, grid: GridSize | None, prefix: int
) -> nn.Module:
    if family == "vit":
        return SpatialOnTokens(base, spatial, grid, prefix)
    if family == "convnext":
        return SpatialAfter(base if placement == "post-dwconv" else nn.Identity(), spatial, layout="nchw")
    return SpatialAfter(base, spatial)


def add_spatial_layers(
    model: nn.Module,
    layer: SpatialLayer = SSM2D,
    placement: str | None = None,
    init: Literal["default", "identity"] = "default",
) -> nn.Module:
    """Insert a spatial layer into every block of a timm ViT/DeiT, Swin or ConvNeXt, in place.

    Args:
        model: a timm `VisionTransformer` (incl. DeiT), `SwinTransformer` or `ConvNeXt`, pretrained
            or not. Any input resolution it accepts still works: kernels follow the grid.
        layer: the spatial layer class, or any factory called as `layer(dim)` that returns a
            (B, H, W, C) -> (B, H, W, C) module, e.g. `functools.partial(SSM2D, state_dim=8)`.
        placement: where in each block (default: the paper's, listed first):
            ViT "pre-attention" (after norm1; Q, K, V read the layer's output; prefix tokens
            bypass it) or "mix-ffn" (fc1 -> layer on the hidden grid -> GELU -> fc2);
            Swin "pre-attention" (on the whole stage map after norm1, before shift and windows);
            ConvNeXt "dwconv" (replaces the depthwise convolution) or "post-dwconv" (after it).
        init: "default" keeps each layer's own initialization; "identity" calls the layer's
            `reset_to_identity()` (2-D SSM: skip 1, C 0) so the model's outputs are unchanged.

    Returns:
        The same model, modified.
    """
    if isinstance(layer, nn.Module) or not callable(layer):
        raise TypeError(f"layer: expected a layer class or factory called as layer(dim), got {layer!r}")
    family = _family(model)
    if placement is None:
        placement = PLACEMENTS[family][0]
    if placement not in PLACEMENTS[family]:
        raise ValueError(f"placement: expected one of {PLACEMENTS[family]} for a {family} model, got {placement!r}")
    if init not in ("default", "identity"):
        raise ValueError(f"init: expected 'default' or 'identity', got {init!r}")
    if spatial_layers(model):
        raise ValueError("model: already has spatial layers; add them to a model without any")
    if family == "vit":
        sites = _vit_sites(model, placement)
    elif family == "swin":
        sites = _swin_sites(model)
    else:
        sites = _convnext_sites(model, placement, init)
    # Build every layer before changing anything, so that a failing layer leaves the model as it was.
    spatial = [_build(layer, dim, init) for _, _, dim in sites]
    grid, prefix = None, 0
    if family == "vit":
        grid, prefix = GridSize(), model.num_prefix_tokens
        model.patch_embed.register_forward_pre_hook(grid)
    for (parent, name, _), layer_ in zip(sites, spatial, strict=True):
        setattr(parent, name, _wrap(family, placement, getattr(parent, name), layer_, grid, prefix))
    return model


def spatial_layers(model: nn.Module) -> list[nn.Module]:
    """The spatial layers inserted by `add_spatial_layers`, in module order."""
    return [m.spatial for m in model.modules() if isinstance(m, (SpatialAfter, SpatialOnTokens))]


@torch.no_grad()
def layer_grids(model: nn.Module, layers: Mapping[str, nn.Module], input_size: Sequence[int]) -> dict[str, tuple[int, int]]:
    """The (H, W) grid each of `layers` (name -> spatial layer of `model`) sees for one image of
    `input_size` (C, H, W), recorded by one forward of zeros in eval mode (which `model` is left in).
    A layer the forward does not reach is missing from the result."""
    grids: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            grids.setdefault(name, (args[0].shape[1], args[0].shape[2]))  # x is (B, H, W, C)

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in layers.items()]
    try:
        param = next(model.parameters())
        model.eval()(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return grids
