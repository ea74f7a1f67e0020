"""ConvNeXt with the 2-D SSM in place of the depthwise convolution (docs/math.md §7).

`_ssm2d` replaces every block's 7 x 7 depthwise convolution by a 2-D SSM whose directional
kernels are truncated to 4 x 4 cells each, so that the folded kernel spans the same 7 x 7 as
the convolution it replaces (pass `kernel_size` to `SSM2D` for another truncation);
`_ssm2d_complex` uses the complex variant. `_s4nd` puts S4ND there instead (related-systems
docs/math.md §8, ConvNeXt-S4ND: linear, one kernel per channel), truncated the same way to 4
taps per axis and direction (a 7 x 7 separable kernel); the paper's ConvNeXt-S4ND is global
(`S4ND(kernel_size=None)`).

- `convnext_sd_32`: the paper's small-data ConvNeXt for 32 x 32 input: dims 64-128-256-512,
  depths 2-2-2-2, patch-1 stem (stage grids 32, 16, 8, 4, the 224-input ConvNeXt's grids
  scaled by 32/224 x 8). timm's stem takes patch 1 or >= 4: a patch-2 stem is followed by a
  stride-2 first stage.
- `convnext_mini_28`: for 28 x 28 single-channel input: dims 16-32-64-128, depths 1-1-1-1,
  patch-1 stem (stage grids 28, 14, 7, 3).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.models import generate_default_cfgs
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ..layers import S4ND, SSM2D
from .builder import build, cfg
from .registry import register_variants

__all__: list[str] = []  # entrypoints are reached through the registry

KERNEL_SIZE = 4  # cells per direction: a folded (2 * 4 - 1) = 7 x 7 kernel, as the dwconv replaced

# Base name -> (architecture, data config, variants).
_ARCHS: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "convnext_sd_32": (
        dict(dims=(64, 128, 256, 512), depths=(2, 2, 2, 2), patch_size=1), "cifar100",
        ("", "_ssm2d", "_ssm2d_complex", "_s4nd"),
    ),
    "convnext_mini_28": (
        dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), patch_size=1), "fashion_mnist", ("", "_ssm2d", "_s4nd"),
    ),
}  # fmt: skip
_NAMES = {base + suffix: base for base, (_, _, suffixes) in _ARCHS.items() for suffix in suffixes}

default_cfgs = generate_default_cfgs({name: cfg(_ARCHS[base][1], "stem.0", "head.fc") for name, base in _NAMES.items()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> ConvNeXt:
    """Build `variant`: its base name gives the architecture; `_ssm2d` or `_s4nd` replaces the dwconvs."""
    layer = None
    if "_ssm2d" in variant:
        layer = partial(SSM2D, variant="complex" if variant.endswith("_complex") else "real", kernel_size=KERNEL_SIZE)
    elif variant.endswith("_s4nd"):
        layer = partial(S4ND, kernel_size=KERNEL_SIZE)
    args = _ARCHS[_NAMES[variant]][0]
    return build(
        ConvNeXt, variant, pretrained, layer=layer, placement="dwconv", pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )  # fmt: skip


register_variants(_create, _NAMES)
