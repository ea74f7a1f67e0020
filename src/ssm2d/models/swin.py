"""Swin with the 2-D SSM (docs/math.md §7), on timm's `SwinTransformer`.

`_ssm2d` runs the layer on the whole stage map after each block's norm1, before the cyclic
shift and window partition. All take any input size (`dynamic_img_size`).

- `swin_sd_32`: the paper's small-data Swin for 32 x 32 input: patch 2, window 4, dim 96,
  depths 2-6-4, heads 3-6-12.
- `swin_mini_28`: for 28 x 28 single-channel input: patch 4, window 7, dim 32, depths 2-2,
  heads 2-4 (stage grids 7 and 3: one window per stage).
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

from ..layers import SSM2D
from .builder import build, cfg
from .registry import register_variants

__all__: list[str] = []  # entrypoints are reached through the registry

# Base name -> (architecture, data config).
_ARCHS: dict[str, tuple[dict[str, Any], str]] = {
    "swin_sd_32": (
        dict(img_size=32, patch_size=2, window_size=4, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12)),
        "cifar100",
    ),
    "swin_mini_28": (
        dict(img_size=28, patch_size=4, window_size=7, embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
        "fashion_mnist",
    ),
}  # fmt: skip
_NAMES = {base + suffix: base for base in _ARCHS for suffix in ("", "_ssm2d")}

default_cfgs = generate_default_cfgs(
    {name: cfg(_ARCHS[base][1], "patch_embed.proj", "head.fc") for name, base in _NAMES.items()}
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SwinTransformer:
    """Build `variant`: its base name gives the architecture; `_ssm2d` adds the layers."""
    layer = SSM2D if variant.endswith("_ssm2d") else None
    args = dict(_ARCHS[_NAMES[variant]][0], dynamic_img_size=True)
    return build(
        SwinTransformer, variant, pretrained, layer=layer, placement="pre-attention",
        pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs),
    )  # fmt: skip


register_variants(_create, _NAMES)
