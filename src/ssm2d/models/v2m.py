"""V2M: Visual 2-Dimensional Mamba (Wang et al., arXiv 2410.10382; docs/math.md §10; the V2M paper's results table).

A Vim-style stack of mixer-only pre-norm residual blocks (Add -> RMSNorm -> V2M mixer, no MLP;
docs/math.md §9) on the patch grid: no class token, a learned absolute position embedding, final
RMSNorm, mean pooling, linear head (docs/math.md §10, "Class token"). The whole network stays in the
(B, H, W, C) grid layout. Any input size works: the position embedding is resampled (bicubic)
from the grid it was built for.

- `v2m_tiny_224`: V2M-T (docs/math.md §10, "Model configs"): patch 16, dim 192, depth 24, N = 16,
  expand 2; about 7M parameters as in the paper's table (the V2M paper's results table).
- `v2m_mini_28`: for 28 x 28 single-channel input (Fashion-MNIST): patch 4 (the 7 x 7 grid of
  `vit_mini_28`), dim 32, depth 4, N = 4, expand 1. Its cost is the 8 selective scans per block
  (4 corners x 2 passes) over B x L x E x N states, so width and state are cut to keep a
  Fashion-MNIST epoch at a few minutes on 2 CPU cores.
- `v2m_mini_32`: the same for 32 x 32 RGB input (CIFAR-100), an 8 x 8 grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.checks import check_positive_ints
from ..layers.v2m import V2M
from .builder import build, cfg
from .registry import register_variants

__all__ = ["MixerBlock", "Visual2DMamba"]

NORM_EPS = 1e-5  # Vim's RMSNorm epsilon (docs/math.md §9)


class MixerBlock(nn.Module):
    """Mixer-only pre-norm residual block: x + DropPath(mixer(RMSNorm(x))) (docs/math.md §9).

    Equivalent to Vim's fused "Add -> RMSNorm -> Mixer" chain, whose shifted drop-path list
    gives mixer i the rate linspace(0, drop_path_rate, depth)[i], as here.

    Args:
        dim: channels C.
        mixer: a (B, H, W, C) -> (B, H, W, C) module.
        drop_path: stochastic-depth rate of the residual branch.
    """

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=NORM_EPS)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return x + self.drop_path(self.mixer(self.norm(x)))


class Visual2DMamba(nn.Module):
    """V2M classifier: patch grid -> V2M mixer blocks -> RMSNorm -> mean pool -> head.

    Args:
        img_size: input size the position embedding is built for (other sizes resample it).
        patch_size: patch side.
        in_chans: input channels.
        num_classes: classes; 0 gives pooled features.
        embed_dim: channels C.
        depth: blocks.
        state_dim: states N of every V2M mixer.
        expand: inner width E = expand * C.
        full_bc: learn B and C in both passes (see `V2M`).
        official_layout: the released code's branch layout (square grids only; see `V2M`).
        drop_rate: dropout after the position embedding and before the head.
        drop_path_rate: stochastic depth, linear from 0 to this over the blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        state_dim: int = 16,
        expand: int = 2,
        full_bc: bool = False,
        official_layout: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_ints(depth=depth)
        self.num_classes, self.depth = num_classes, depth
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False
        )
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches, embed_dim))  # (1, L, C)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        mixer = dict(state_dim=state_dim, expand=expand, full_bc=full_bc, official_layout=official_layout)
        self.blocks = nn.Sequential(*[MixerBlock(embed_dim, V2M(embed_dim, **mixer), rate) for rate in rates])
        self.norm = nn.RMSNorm(embed_dim, eps=NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Vim's initialization (docs/math.md §9): lecun-normal patch conv, trunc-normal(.02) position
        embedding and head, Mamba's mixer init with out_proj divided by sqrt(depth) (GPT-2
        pre-norm rescale, one residual per block)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            block.norm.reset_parameters()
            block.mixer.reset_parameters()
            block.mixer.out_proj.weight.div_(math.sqrt(self.depth))
        self.norm.reset_parameters()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters without weight decay: the position embedding and every parameter
        tagged `_optim = {"weight_decay": 0.0}` (A_log, D, dt bias)."""
        tagged = {n for n, p in self.named_parameters() if getattr(p, "_optim", {}).get("weight_decay") == 0.0}
        return {"pos_embed"} | tagged

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` (0: pooled features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """Position embedding on an H x W grid: (1, H, W, C), resampled if H x W is not the
        grid it was built for."""
        base = self.patch_embed.grid_size
        pos = self.pos_embed
        if tuple(grid) != tuple(base):
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(base), num_prefix_tokens=0)
        return pos.unflatten(1, tuple(grid))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H_img, W_img) -> normalized features (B, H, W, C)."""
        x = self.patch_embed(x)  # (B, H, W, C)
        x = self.pos_drop(x + self._pos_embed(x.shape[1:3]))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features (B, H, W, C) -> logits (B, num_classes), or pooled (B, C) if `pre_logits`."""
        x = self.head_drop(x.mean(dim=(1, 2)))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, depth={self.depth}, num_classes={self.num_classes}"


_MINI = dict(patch_size=4, embed_dim=32, depth=4, state_dim=4, expand=1)
# Name -> (architecture, data config).
_ARCHS: dict[str, tuple[dict[str, Any], str]] = {
    "v2m_tiny_224": (dict(img_size=224, patch_size=16, embed_dim=192, depth=24, state_dim=16), "imagenet"),
    "v2m_mini_28": (dict(_MINI, img_size=28), "fashion_mnist"),
    "v2m_mini_32": (dict(_MINI, img_size=32), "cifar100"),
}

default_cfgs = generate_default_cfgs({name: cfg(data, "patch_embed.proj") for name, (_, data) in _ARCHS.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Visual2DMamba:
    """Build `variant` from its architecture; keyword arguments override it."""
    return build(Visual2DMamba, variant, pretrained, **dict(_ARCHS[variant][0], **kwargs))


register_variants(_create, _ARCHS)
