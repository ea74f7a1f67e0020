"""SP-ViT (Zhou et al., BMVC 2022): a ViT whose first blocks use SP-SA, on timm's `VisionTransformer`.

SP-ViT's split (docs/math.md §11, "ConViT-style split"): the first K blocks attend over the patch
tokens with SP-SA, the class token joins after them, and the remaining blocks use plain
attention. Here the class token is in the sequence from the start, as timm builds it, but the
SP-SA blocks exclude it (`SPAttentionOnTokens`: patches never see it, its attention output is
zero), so until block K it stays independent of the image, as a token that joins there would.
The position embedding covers the patches only (`no_embed_class`, docs/math.md §11), and
qk, v carry no bias in any block (docs/math.md §11).

SP-SA is compared as a mixer inside timm's plain pre-norm block (docs/math.md §11): LV-ViT's
conv stem, the PosCNN after every block, the skip_lam residual scaling and the token-labeling
head are not part of these models.

- `spvit_small_224`: SP-ViT-S: patch 16 (LV-ViT's stem also gives a 14 x 14 grid at 224),
  dim 384, depth 16, 6 heads, MLP ratio 3, SP-SA in the first 14 blocks (docs/math.md §11).
- `spvit_mini_28` (Fashion-MNIST) and `spvit_mini_32` (CIFAR-100): the size of `vit_mini_28`
  (patch 4, dim 64, depth 4, 4 heads, MLP ratio 2), SP-SA in the first 3 blocks: like S, all
  but the last blocks.

Keyword arguments go to `VisionTransformer`; `sp_depth` sets K. Any input size works
(`dynamic_img_size`): the priors follow the grid.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

from ..layers import GridSize, SPAttention, SPAttentionOnTokens
from .builder import build, cfg
from .registry import register_variants

__all__: list[str] = []  # entrypoints are reached through the registry

# Name -> (architecture, SP-SA blocks K, data config).
_MINI = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
_ARCHS: dict[str, tuple[dict[str, Any], int, str]] = {
    "spvit_small_224": (
        dict(img_size=224, patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0), 14, "imagenet",
    ),
    "spvit_mini_28": (dict(_MINI, img_size=28), 3, "fashion_mnist"),
    "spvit_mini_32": (dict(_MINI, img_size=32), 3, "cifar100"),
}  # fmt: skip

default_cfgs = generate_default_cfgs({name: cfg(data, "patch_embed.proj") for name, (_, _, data) in _ARCHS.items()})


def _create(variant: str, pretrained: bool, sp_depth: int | None = None, **kwargs: Any) -> VisionTransformer:
    """Build `variant` with SP-SA in its first `sp_depth` blocks (default: the variant's K)."""
    arch, default_depth, _ = _ARCHS[variant]
    if kwargs.get("attn_drop_rate", 0.0):
        raise ValueError(f"attn_drop_rate: SP-SA has no attention dropout, expected 0, got {kwargs['attn_drop_rate']}")
    args = dict(arch, qkv_bias=False, no_embed_class=True, dynamic_img_size=True)
    model = build(VisionTransformer, variant, pretrained, **dict(args, **kwargs))
    sp_depth = default_depth if sp_depth is None else sp_depth
    if not isinstance(sp_depth, int) or isinstance(sp_depth, bool) or not 0 <= sp_depth <= len(model.blocks):
        raise ValueError(f"sp_depth: expected an integer in [0, {len(model.blocks)}] (the depth), got {sp_depth!r}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("patch_drop_rate: patch dropout removes tokens from the grid SP-SA needs; expected 0")
    grid = GridSize()
    model.patch_embed.register_forward_pre_hook(grid)
    for block in model.blocks[:sp_depth]:
        mixer = SPAttention(model.embed_dim, block.attn.num_heads, proj_drop=kwargs.get("proj_drop_rate", 0.0))
        block.attn = SPAttentionOnTokens(mixer, grid, model.num_prefix_tokens)
    return model


register_variants(_create, _ARCHS)
