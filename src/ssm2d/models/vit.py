"""ViT/DeiT with the 2-D SSM (docs/math.md §7), on timm's `VisionTransformer`.

Suffixes: `_ssm2d` puts the layer before each attention ("pre-attention", the paper's default),
`_ssm2d_ffn` inside each MLP ("mix-ffn"), and `_nope` drops the positional embedding (the
paper's "no positional encoding" ablation). All take any input size (`dynamic_img_size`).
The comparators go in the same pre-attention place of the same backbone, so that all six
spatial layers are compared under one recipe: `_s4nd` (S4ND), `_v2m` (V2M), `_vim` (Vim's
bidirectional scan over the row-major grid), `_ss2d` (VMamba's four-way cross-scan) and `_spsa`
(SP-ViT's spatial-prior attention), and the control `_dwconv` (a plain depthwise 7 x 7 convolution).
`layer_kwargs={...}` passes keyword arguments to the inserted layer, e.g.
`create_model("vit_mini_28_ssm2d", layer_kwargs={"n_ssm": 4})`.

- `vit_sd_32`: the small-data ViT of Lee et al. 2021 for 32 x 32 input (CIFAR): patch 4, dim 192,
  depth 9, 12 heads, MLP ratio 2. `vit_sd_64`: the same at 64 x 64 with patch 8 (Tiny-ImageNet).
- `deit_tiny_224`, `deit_small_224`: DeiT-Tiny and DeiT-Small (patch 16, ImageNet).
- `vit_mini_28`: for 28 x 28 single-channel input (Fashion-MNIST): patch 4, dim 64, depth 4,
  4 heads, MLP ratio 2.
"""

from __future__ import annotations

import functools
from typing import Any

from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..layers import S4ND, SS2D, SSM2D, V2M, DWConv2d, SPAttention, VimMixer2d
from .builder import build, cfg
from .registry import register_variants
from .retrofit import SpatialLayer

__all__: list[str] = []  # entrypoints are reached through the registry

# Base name -> (architecture, data config, variants).
_SD_32 = dict(img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0)
_DEIT_TINY = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
# Variant suffix -> the spatial layer it inserts (pre-attention, or mix-ffn with `_ffn`).
_MIXERS: dict[str, SpatialLayer] = {
    "_ssm2d": SSM2D, "_s4nd": S4ND, "_v2m": V2M, "_spsa": SPAttention, "_vim": VimMixer2d, "_ss2d": SS2D,
    "_dwconv": DWConv2d,
}  # fmt: skip
_ALL = ("", "_nope", "_ssm2d", "_ssm2d_nope", "_ssm2d_ffn", "_ssm2d_ffn_nope")
_COMPARATORS = tuple(k for k in _MIXERS if k != "_ssm2d")
_ARCHS: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "vit_sd_32": (_SD_32, "cifar100", _ALL + _COMPARATORS),
    "vit_sd_64": (dict(_SD_32, img_size=64, patch_size=8), "tiny_imagenet", _ALL),
    "deit_tiny_224": (_DEIT_TINY, "imagenet", ("", "_ssm2d")),
    "deit_small_224": (dict(_DEIT_TINY, embed_dim=384, num_heads=6), "imagenet", ("", "_ssm2d")),
    "vit_mini_28": (
        dict(img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0), "fashion_mnist",
        _ALL + _COMPARATORS,
    ),
}  # fmt: skip
_NAMES = {base + suffix: base for base, (_, _, suffixes) in _ARCHS.items() for suffix in suffixes}

# Base name -> the timm weights of the same architecture (loaded by `pretrained=True`).
_HUB_IDS = {
    "deit_tiny_224": "timm/deit_tiny_patch16_224.fb_in1k", "deit_small_224": "timm/deit_small_patch16_224.fb_in1k",
}  # fmt: skip

default_cfgs = generate_default_cfgs(
    {name: cfg(_ARCHS[base][1], "patch_embed.proj", hf_hub_id=_HUB_IDS.get(base)) for name, base in _NAMES.items()}
)


def _create(
    variant: str, pretrained: bool, layer_kwargs: dict[str, Any] | None = None, **kwargs: Any
) -> VisionTransformer:
    """Build `variant`: its base name gives the architecture, its suffixes the placement.

    `layer_kwargs` go to every inserted spatial layer (after `dim`); other keyword arguments go to
    timm's `VisionTransformer`.
    """
    base = _NAMES[variant]
    arch = _ARCHS[base][0]
    suffix = variant[len(base) :]
    layer: SpatialLayer | None = next((cls for key, cls in _MIXERS.items() if suffix.startswith(key)), None)
    if layer_kwargs:
        if layer is None:
            raise ValueError(f"layer_kwargs: {variant} has no spatial layer to pass them to, got {layer_kwargs!r}")
        layer = functools.partial(layer, **layer_kwargs)
    placement = "mix-ffn" if "_ffn" in suffix else "pre-attention"
    args = dict(arch, pos_embed="none" if variant.endswith("_nope") else "learn", dynamic_img_size=True)
    return build(
        VisionTransformer, variant, pretrained, layer=layer, placement=placement,
        pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs),
    )  # fmt: skip


register_variants(_create, _NAMES)
