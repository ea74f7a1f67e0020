"""Modules that run a spatial layer after another module, in a backbone's own layout.

A spatial layer maps (B, H, W, C) -> (B, H, W, C). These wrappers adapt it to where a backbone
needs it: after a module that outputs (B, H, W, C) maps (Swin), (B, C, H, W) maps (ConvNeXt),
or (B, P + H*W, C) token sequences with P prefix tokens (ViT). They own no parameters.

Glossary: B batch, P prefix tokens, H x W grid, L = H * W, C channels.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from torch import Tensor

from .grid import apply_on_tokens

__all__ = ["GridSize", "SpatialAfter", "SpatialOnTokens"]


def _accept_base_keys(state_dict: dict, prefix: str, *args: object) -> None:
    """Load-state-dict pre-hook: read the wrapped module's weights under their unwrapped names.

    A checkpoint saved before the wrapper was inserted (for example timm's pretrained weights)
    names them `<prefix>weight`; here they live at `<prefix>base.weight`.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith(("base.", "spatial.")):
            state_dict[f"{prefix}base.{rest}"] = state_dict.pop(key)


class GridSize:
    """The patch grid of the images being processed, recorded by a forward pre-hook.

    Token-sequence backbones (ViT) lose the grid when they flatten patches. An instance is
    registered as a forward pre-hook on the patch embedding: it records the grid each input
    produces, and every `SpatialOnTokens` of the model reads it. Grids of recent inputs stay
    available by token count, so that blocks re-run in the backward pass (gradient
    checkpointing) still find theirs when one graph holds several image sizes; two sizes with
    the same token count in one checkpointed graph resolve to the later one.
    """

    _RECENT = 8  # grids kept by token count

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None
        self._recent: dict[int, tuple[int, int]] = {}

    def __call__(self, patch_embed: nn.Module, args: tuple[Tensor, ...]) -> None:
        """Pre-hook of a timm `PatchEmbed`: args[0] is the image (B, C_in, H_img, W_img)."""
        size = tuple(patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:])))
        self.size = size
        self._recent.pop(size[0] * size[1], None)
        self._recent[size[0] * size[1]] = size
        while len(self._recent) > self._RECENT:
            del self._recent[next(iter(self._recent))]

    def lookup(self, num_patches: int) -> tuple[int, int] | None:
        """The grid of L = `num_patches` tokens: the latest one if it fits, else a recent one."""
        if self.size is not None and self.size[0] * self.size[1] == num_patches:
            return self.size
        return self._recent.get(num_patches, self.size)

    def __repr__(self) -> str:
        return f"GridSize(size={self.size})"


class SpatialAfter(nn.Module):
    """y = spatial(base(x)) on feature maps.

    Args:
        base: the module the spatial layer follows (nn.Identity to run it alone).
        spatial: a (B, H, W, C) -> (B, H, W, C) layer.
        layout: "nhwc" when `base` outputs (B, H, W, C) maps, "nchw" for (B, C, H, W) maps.
    """

    def __init__(self, base: nn.Module, spatial: nn.Module, layout: Literal["nhwc", "nchw"] = "nhwc") -> None:
        super().__init__()
        if layout not in ("nhwc", "nchw"):
            raise ValueError(f"layout: expected 'nhwc' or 'nchw', got {layout!r}")
        self.base, self.spatial, self.layout = base, spatial, layout
        self._register_load_state_dict_pre_hook(_accept_base_keys)

    def forward(self, x: Tensor) -> Tensor:
        """x: whatever `base` takes -> the layout `base` returns."""
        y = self.base(x)
        if self.layout == "nhwc":
            return self.spatial(y)
        return self.spatial(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # via (B, H, W, C)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"


class SpatialOnTokens(nn.Module):
    """y = base(x), then the spatial layer on its patch tokens; prefix tokens pass untouched.

    Args:
        base: the module the spatial layer follows, returning (B, P + H*W, C') tokens.
        spatial: a (B, H, W, C') -> (B, H, W, C') layer.
        grid: the model's `GridSize`, set by a pre-hook on its patch embedding.
        num_prefix_tokens: P, the class and register tokens that lead the sequence.
    """

    def __init__(self, base: nn.Module, spatial: nn.Module, grid: GridSize, num_prefix_tokens: int) -> None:
        super().__init__()
        self.base, self.spatial = base, spatial
        self.grid = grid  # shared by all wrappers of one model; not a submodule
        self.num_prefix_tokens = num_prefix_tokens
        self._register_load_state_dict_pre_hook(_accept_base_keys)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, P + H*W, C) -> (B, P + H*W, C')."""
        y = self.base(x)
        size = self.grid.lookup(y.shape[1] - self.num_prefix_tokens)
        if size is None:
            raise RuntimeError(
                "grid: no patch grid recorded; SpatialOnTokens learns the grid from the model's patch "
                "embedding, so run the whole model (or set `.grid.size = (H, W)` before calling a block)"
            )
        return apply_on_tokens(self.spatial, y, size, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"
