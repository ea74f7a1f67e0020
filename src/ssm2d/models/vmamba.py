"""VMamba: a hierarchical backbone of VSS blocks around SS2D (Liu et al., NeurIPS 2024, arXiv 2401.10166).

A p x p patch embedding (stride-p convolution + LayerNorm; VMamba's p is 4), stages of VSS
blocks in the (B, H, W, C) layout, a 2 x 2 stride-2 convolution + LayerNorm between stages (the
width doubles, the grid halves), a final LayerNorm, global average pooling and a linear head.
The VSS block is VMamba v2's: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))). No
position embedding: the depthwise convolution and the scans carry position.

Any input size works: the patch embedding pads the image to a multiple of the patch size, and
a downsampling pads an odd map with a zero row or column (bottom, right), so a stage's grid is
ceil(previous / 2) and every size down to 1 x 1 runs.

Every SS2D has VMamba's final configuration, N = 1 and expand 1 (the `SS2D` defaults).

- `vmamba_tiny_224`: VMamba-T at 224 x 224 (ImageNet): width 96 (96-192-384-768), depths
  2-2-9-2, MLP ratio 4; 32.4M parameters (the paper's VMamba-T: 30M).
- `vmamba_sd_32`: for 32 x 32 RGB input (CIFAR-100), 2.59M parameters, about `vit_sd_32`'s
  2.71M. Patch 2 (a 16 x 16 grid) and three stages, 16 x 16, 8 x 8 and 4 x 4: with VMamba's
  patch 4 and four stages the last two would see 2 x 2 and 1 x 1 grids, too small to scan.
  Width 64 (64-128-256), depths 2-4-2, MLP ratio 4.
- `vmamba_mini_28`: for 28 x 28 single-channel input (Fashion-MNIST), 144k parameters, about
  `vit_mini_28`'s 139k. Patch 4, so that the first stage scans the 7 x 7 grid of `vit_mini_28`
  and its comparators, and two stages, 7 x 7 and 4 x 4: a third downsampling would leave a
  2 x 2 grid, a fourth 1 x 1. Width 40 (40-80), depths 2-2, MLP ratio 2 (`vit_mini_28`'s).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs
from torch import Tensor

from ..layers.checks import check_positive_ints
from ..layers.ss2d import SS2D
from .builder import build, cfg
from .registry import register_variants

__all__ = ["Downsample", "VMamba", "VSSBlock"]


class VSSBlock(nn.Module):
    """VMamba v2's block: x + DropPath(SS2D(LN(x))), then x + DropPath(MLP(LN(x))).

    Args:
        dim: channels C.
        mixer: the SS2D layer, (B, H, W, C) -> (B, H, W, C).
        mlp_ratio: MLP hidden width over C (GELU); 0 drops the MLP half (VMamba v1's block).
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Downsample(nn.Module):
    """2 x 2 stride-2 convolution + LayerNorm: (B, H, W, C_in) -> (B, ceil(H / 2), ceil(W / 2), C_out).

    An odd H or W is padded with one zero row or column at the bottom or right first.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C_in) -> (B, ceil(H / 2), ceil(W / 2), C_out)."""
        h, w = x.shape[1:3]
        x = F.pad(x.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2))  # (B, C_in, H + H % 2, W + W % 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class VMambaStage(nn.Module):
    """A downsampling (nn.Identity in the first stage) and `depth` VSS blocks at one width."""

    def __init__(self, downsample: nn.Module, blocks: list[VSSBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C_in) -> (B, H', W', C)."""
        return self.blocks(self.downsample(x))


class VMamba(nn.Module):
    """VMamba classifier: patch embedding -> stages of VSS blocks -> LayerNorm -> mean pool -> head.

    Args:
        img_size: nominal input size (any size runs; see the module docstring).
        patch_size: side of the patch embedding's stride-`patch_size` convolution.
        in_chans: input channels.
        num_classes: classes; 0 gives pooled features.
        embed_dim: width of the first stage; stage i has embed_dim * 2**i channels.
        depths: VSS blocks per stage; one stage per entry, a downsampling between stages.
        state_dim: states N of every SS2D.
        expand: SS2D inner width E = expand * C.
        mlp_ratio: MLP hidden width over C in every block (0: no MLP, VMamba v1's block).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 9, 2),
        state_dim: int = 1,
        expand: int = 1,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depths, (tuple, list)) or not depths:
            raise ValueError(f"depths: expected a non-empty tuple of integers >= 1, got {depths!r}")
        check_positive_ints(embed_dim=embed_dim, **{f"depths[{i}]": d for i, d in enumerate(depths)})
        if mlp_ratio < 0:
            raise ValueError(f"mlp_ratio: expected >= 0, got {mlp_ratio}")
        self.num_classes, self.depths, self.embed_dim = num_classes, tuple(depths), embed_dim
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC",
            strict_img_size=False, dynamic_img_pad=True,
        )  # fmt: skip
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        mixer = dict(state_dim=state_dim, expand=expand)
        self.stages = nn.Sequential(*[
            VMambaStage(
                Downsample(dims[i - 1], dim) if i else nn.Identity(),
                [VSSBlock(dim, SS2D(dim, **mixer), mlp_ratio, next(rates)) for _ in range(depth)],
            )
            for i, (dim, depth) in enumerate(zip(dims, depths))
        ])  # fmt: skip
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VMamba's initialization: trunc-normal(.02) for the MLP and head weights, zero biases,
        unit LayerNorms, PyTorch's default for the convolutions, and each SS2D's own (Mamba's
        SSM parameters)."""
        layers = [m for m in self.modules() if isinstance(m, SS2D)]
        inside = {id(m) for layer in layers for m in layer.modules()}
        for m in self.modules():
            if id(m) in inside:
                continue
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.Conv2d)):
                m.reset_parameters()
        for layer in layers:
            layer.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters tagged `_optim = {"weight_decay": 0.0}` (every SS2D's A_log,
        D and dt bias)."""
        return {n for n, p in self.named_parameters() if getattr(p, "_optim", {}).get("weight_decay") == 0.0}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` (0: pooled features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H_img, W_img) -> normalized last-stage features (B, H, W, C)."""
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features (B, H, W, C) -> logits (B, num_classes), or pooled (B, C) if `pre_logits`."""
        x = self.head_drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, depths={self.depths}, num_classes={self.num_classes}"


# Name -> (architecture, data config).
_ARCHS: dict[str, tuple[dict[str, Any], str]] = {
    "vmamba_tiny_224": (dict(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 9, 2)), "imagenet"),
    "vmamba_sd_32": (dict(img_size=32, patch_size=2, embed_dim=64, depths=(2, 4, 2)), "cifar100"),
    "vmamba_mini_28": (dict(img_size=28, patch_size=4, embed_dim=40, depths=(2, 2), mlp_ratio=2.0), "fashion_mnist"),
}

default_cfgs = generate_default_cfgs({name: cfg(data, "patch_embed.proj") for name, (_, data) in _ARCHS.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VMamba:
    """Build `variant` from its architecture; keyword arguments override it."""
    return build(VMamba, variant, pretrained, **dict(_ARCHS[variant][0], **kwargs))


register_variants(_create, _ARCHS)
