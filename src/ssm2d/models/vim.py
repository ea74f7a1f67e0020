"""Vision Mamba (Vim; Zhu et al., ICML 2024, arXiv 2401.09417; docs/math.md §9).

Patch embedding, a class token in the middle of the row-major token sequence, a learned
position embedding, and pre-norm residual blocks Add -> RMSNorm -> bidirectional Mamba mixer
(`ssm2d.layers.VimMixer`) with the residual stream kept in float32; a final Add -> RMSNorm and
a linear head on the class token. Module names follow the released model (`layers.{i}.mixer`,
`norm_f`). Any input size whose sides are multiples of the patch size is accepted: the position
embedding is resampled to the new grid (the released model asserts its training size).

- `vim_tiny_224`: Vim-Tiny (dim 192, depth 24, patch 16, ImageNet).
- `vim_mini_28`, `vim_mini_32`: dim 64, depth 4, patch 4, state size 8, for 1 x 28 x 28
  (Fashion-MNIST) and 3 x 32 x 32 (CIFAR-100) input.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, RmsNorm, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers import VimMixer
from ..layers.checks import check_positive_ints
from .builder import build, cfg
from .registry import register_variants

__all__ = ["Vim", "VimBlock"]


class VimBlock(nn.Module):
    """residual <- residual + DropPath(hidden); hidden <- mixer(RMSNorm(residual)) (docs/math.md §9).

    The add of the previous block's output happens here, before the norm (the released
    "fused add + norm"); the residual stream is float32 whatever the compute dtype.

    Args:
        dim: channels C.
        drop_path: stochastic-depth rate of the incoming add.
        norm_eps: RMSNorm epsilon.
        state_dim, expand, conv_size: of the `VimMixer`.
    """

    def __init__(
        self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, state_dim: int = 16, expand: int = 2,
        conv_size: int = 4,
    ) -> None:  # fmt: skip
        super().__init__()
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.mixer = VimMixer(dim, state_dim=state_dim, expand=expand, conv_size=conv_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """hidden (B, L, C), residual (B, L, C) float32 or None for the first block."""
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual


class Vim(nn.Module):
    """Vision Mamba with a middle class token.

    Args:
        img_size: default input size (sets the learned position embedding's grid).
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: classifier outputs (0: no head).
        embed_dim: channels C.
        depth: blocks.
        state_dim: states N per channel of every mixer.
        expand: mixer width E = expand * C.
        conv_size: kernel of the mixers' causal convolutions.
        drop_rate: dropout before the head.
        pos_drop_rate: dropout after adding the position embedding.
        drop_path_rate: stochastic depth; block i's incoming add uses ([0] + linspace(0, rate,
            depth))[i] and the final add uses `rate` (docs/math.md §9).
        norm_eps: RMSNorm epsilon.
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
        conv_size: int = 4,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive_ints(depth=depth)
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.num_features = self.head_hidden_size = embed_dim
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False
        )  # fmt: skip
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))  # class token at L // 2
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [0.0, *torch.linspace(0, drop_path_rate, depth).tolist()]
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, rates[i], norm_eps, state_dim, expand, conv_size) for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Released init (docs/math.md §9): embeddings trunc-normal .02, patch conv lecun-normal, head
        trunc-normal .02, zero biases, out_proj rescaled by 1/sqrt(depth) (GPT-2 pre-norm)."""
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            layer.mixer.reset_parameters()
            layer.mixer.out_proj.weight.div_(math.sqrt(self.depth))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def _pos_embed(self, grid: Tensor) -> Tensor:
        """(B, H, W, C) patches -> (B, H*W + 1, C) tokens, class token at index H*W // 2."""
        b, h, w, _ = grid.shape
        tokens = grid.flatten(1, 2)
        pos = self.pos_embed
        if (h, w) != tuple(self.patch_embed.grid_size):
            mid = (pos.shape[1] - 1) // 2
            patch_pos = torch.cat([pos[:, :mid], pos[:, mid + 1 :]], dim=1)
            patch_pos = resample_abs_pos_embed(patch_pos, [h, w], list(self.patch_embed.grid_size), num_prefix_tokens=0)
            pos = torch.cat([patch_pos[:, : h * w // 2], pos[:, mid : mid + 1], patch_pos[:, h * w // 2 :]], dim=1)
        mid = h * w // 2
        tokens = torch.cat([tokens[:, :mid], self.cls_token.expand(b, -1, -1), tokens[:, mid:]], dim=1)
        return self.pos_drop(tokens + pos)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) -> normalized tokens (B, H*W/P^2 + 1, C), class token in the middle."""
        hidden, residual = self._pos_embed(self.patch_embed(x)), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = residual + self.drop_path(hidden).float()
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L + 1, C) tokens -> logits (B, num_classes) from the class token at index L // 2."""
        x = self.head_drop(x[:, (x.shape[1] - 1) // 2])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, depth={self.depth}, num_classes={self.num_classes}"


# N = 8 instead of Vim's 16 keeps a Fashion-MNIST epoch at a few minutes on 2 CPU cores, and the
# parameter count (144K) next to vit_mini_28's (139K).
_MINI = dict(patch_size=4, embed_dim=64, depth=4, state_dim=8)
# Name -> (architecture, data config).
_ARCHS: dict[str, tuple[dict[str, Any], str]] = {
    "vim_tiny_224": (dict(img_size=224, patch_size=16, embed_dim=192, depth=24), "imagenet"),
    "vim_mini_28": (dict(_MINI, img_size=28), "fashion_mnist"),
    "vim_mini_32": (dict(_MINI, img_size=32), "cifar100"),
}

default_cfgs = generate_default_cfgs({name: cfg(data, "patch_embed.proj") for name, (_, data) in _ARCHS.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> Vim:
    return build(Vim, variant, pretrained, **dict(_ARCHS[variant][0], **kwargs))


register_variants(_create, _ARCHS)
