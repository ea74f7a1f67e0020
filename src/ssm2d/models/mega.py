"""Mega for images (Ma et al., ICLR 2023), the 2-D SSM paper's main backbone, with its moving
average in a pluggable slot (docs/math.md §12).

Conv patch embedding, a learned absolute position embedding (resampled for other grids, as
timm does), no class token; blocks of `MovingAverageGatedAttention` then `NormalizedFFN` on the
(B, H, W, C) patch grid; a final LayerNorm, Linear + SiLU, mean pooling over the patches and a
linear head. Any input whose sides are multiples of the patch size is accepted.

Suffixes: (none) "Mega-ablate", no moving average; `_ema` Mega's bidirectional EMA along the
row-major patch sequence; `_ssm2d` the 2-D SSM on the grid; `_s4nd` S4ND on the grid; `_nope`
no absolute position embedding (the relative position bias stays).

- `mega_mini_28*`: sized like `vit_mini_28` for 28 x 28 single-channel input: patch 4, dim 64,
  depth 4, hidden = FFN = zdim = 64.
- `mega_sd_32*`, `mega_sd_64*`: the small-data models of the 2-D SSM paper (CIFAR-100,
  Tiny-ImageNet): depth 9, embed = hidden = FFN = zdim = 192, ndim 16, patch 4 at 32 px and 8 at
  64 px (64 tokens).
- `mega_tiny_224*`: Mega-Tiny for ImageNet: depth 12, embed 192, hidden 384, FFN 384, zdim 64,
  ndim 16, patch 16.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.checks import check_positive_ints
from ..layers.mega import MovingAverageGatedAttention, NormalizedFFN
from .builder import build, cfg
from .registry import register_variants

__all__ = ["Mega", "MegaBlock"]


class MegaBlock(nn.Module):
    """x -> MovingAverageGatedAttention -> NormalizedFFN, each with its own residual.

    Args:
        dim: channels C.
        zdim, hidden_dim, ndim, slot, attention, rel_pos_size, slot_init: of the attention.
        ffn_dim: hidden width of the FFN.
        dropout, attention_dropout, hidden_dropout: Mega's dropouts.
        drop_path: stochastic depth of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        zdim: int,
        hidden_dim: int,
        ffn_dim: int,
        ndim: int = 16,
        slot: Literal["ema", "ssm2d", "s4nd", "none"] = "none",
        attention: Literal["laplace", "softmax"] = "laplace",
        rel_pos_size: int | tuple[int, int] | None = 16,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        drop_path: float = 0.0,
        slot_init: Literal["default", "identity"] = "default",
    ) -> None:
        super().__init__()
        self.attn = MovingAverageGatedAttention(
            dim, zdim, hidden_dim, ndim, slot, attention, rel_pos_size, dropout, attention_dropout, hidden_dropout,
            drop_path, slot_init,
        )  # fmt: skip
        self.ffn = NormalizedFFN(dim, ffn_dim, dropout, hidden_dropout, drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return self.ffn(self.attn(x))


class Mega(nn.Module):
    """Mega image classifier on a patch grid.

    Args:
        img_size: default input size (sets the position embedding's and the relative position
            bias's grid).
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: classifier outputs (0: no head).
        embed_dim: channels C.
        depth: blocks.
        hidden_dim: value width E of the attention.
        ffn_dim: hidden width of the FFN.
        zdim: width of the shared query/key representation.
        ndim: states of the moving average.
        slot: the moving average: "none" (Mega-ablate), "ema", "ssm2d" or "s4nd".
        attention: "laplace" (Mega) or "softmax".
        pos_embed: "learn" (a learned absolute position embedding) or "none".
        rel_pos: a learned 2-D relative position bias in every attention.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, linear in depth from 0 to this rate.
        dropout, attention_dropout, hidden_dropout: Mega's dropouts, in every block.
        slot_init: "default", or "identity": every slot layer starts as the identity map, so a
            checkpoint of the model without a slot loads (strict=False) and gives its outputs.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        hidden_dim: int = 384,
        ffn_dim: int = 384,
        zdim: int = 64,
        ndim: int = 16,
        slot: Literal["ema", "ssm2d", "s4nd", "none"] = "none",
        attention: Literal["laplace", "softmax"] = "laplace",
        pos_embed: Literal["learn", "none"] = "learn",
        rel_pos: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        slot_init: Literal["default", "identity"] = "default",
    ) -> None:
        super().__init__()
        check_positive_ints(depth=depth, embed_dim=embed_dim)
        if pos_embed not in ("learn", "none"):
            raise ValueError(f"pos_embed: expected 'learn' or 'none', got {pos_embed!r}")
        self.num_classes, self.embed_dim, self.depth, self.slot = num_classes, embed_dim, depth, slot
        self.num_features = self.head_hidden_size = embed_dim
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False
        )  # fmt: skip
        grid = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim)) if pos_embed == "learn" else None
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            MegaBlock(
                embed_dim, zdim, hidden_dim, ffn_dim, ndim, slot, attention, grid if rel_pos else None, dropout,
                attention_dropout, hidden_dropout, rates[i], slot_init,
            )
            for i in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)  # Linear + SiLU before the pooling
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Position embedding trunc-normal .02; proj and head N(0, .02) and trunc-normal .02 with
        zero biases; the blocks keep their own (Mega's) initialization."""
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.proj.weight, 0.0, 0.02)
        nn.init.zeros_(self.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        names = {f"blocks.{i}.attn.rel_pos" for i, b in enumerate(self.blocks) if b.attn.rel_pos is not None}
        return names | ({"pos_embed"} if self.pos_embed is not None else set())

    def _pos_embed(self, x: Tensor) -> Tensor:
        """(B, H, W, C) patches + the position embedding, resampled if (H, W) is not the default grid."""
        if self.pos_embed is None:
            return x
        b, h, w, c = x.shape
        pos, grid = self.pos_embed, list(self.patch_embed.grid_size)
        if [h, w] != grid:
            pos = resample_abs_pos_embed(pos, [h, w], grid, num_prefix_tokens=0)
        return x + pos.reshape(1, h, w, c)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) -> normalized patch features (B, H/P, W/P, C)."""
        x = self._pos_embed(self.patch_embed(x))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, H, W, C) features -> SiLU(proj) mean-pooled (B, C), then logits (B, num_classes)."""
        x = self.head_drop(F.silu(self.proj(x)).mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, depth={self.depth}, slot={self.slot!r}, num_classes={self.num_classes}"


# Base name -> (architecture, data config, suffixes).
_SD = dict(embed_dim=192, depth=9, hidden_dim=192, ffn_dim=192, zdim=192, ndim=16)
_ARCHS: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "mega_mini_28": (
        dict(img_size=28, patch_size=4, embed_dim=64, depth=4, hidden_dim=64, ffn_dim=64, zdim=64, ndim=16),
        "fashion_mnist",
        ("", "_nope", "_ema", "_ema_nope", "_ssm2d", "_ssm2d_nope", "_s4nd", "_s4nd_nope"),
    ),
    "mega_sd_32": (
        dict(_SD, img_size=32, patch_size=4), "cifar100", ("", "_nope", "_ema", "_ssm2d", "_ssm2d_nope", "_s4nd")
    ),
    "mega_sd_64": (dict(_SD, img_size=64, patch_size=8), "tiny_imagenet", ("", "_ema", "_ssm2d", "_s4nd")),
    "mega_tiny_224": (
        dict(img_size=224, patch_size=16, embed_dim=192, depth=12, hidden_dim=384, ffn_dim=384, zdim=64, ndim=16),
        "imagenet",
        ("", "_ema", "_ssm2d"),
    ),
}  # fmt: skip
_NAMES = {base + suffix: base for base, (_, _, suffixes) in _ARCHS.items() for suffix in suffixes}
# Suffix part -> the slot it selects.
_SLOTS = {"_ema": "ema", "_ssm2d": "ssm2d", "_s4nd": "s4nd"}

default_cfgs = generate_default_cfgs({name: cfg(_ARCHS[base][1], "patch_embed.proj") for name, base in _NAMES.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Mega:
    base = _NAMES[variant]
    suffix = variant[len(base) :]
    slot = next((s for key, s in _SLOTS.items() if suffix.startswith(key)), "none")
    args = dict(_ARCHS[base][0], slot=slot, pos_embed="none" if suffix.endswith("_nope") else "learn")
    return build(Mega, variant, pretrained, **dict(args, **kwargs))


register_variants(_create, _NAMES)
