"""Build a timm backbone from its pretrained config, then insert spatial layers.

With `pretrained=True` the backbone loads its weights through timm's own machinery first (the
config's Hugging Face hub id, or the file of `pretrained_cfg_overlay=dict(file=PATH)`, through
the family's checkpoint filter; a head of another size is re-initialized, another in_chans
adapts the stem), and the spatial layers are inserted after it at identity, so that the model
computes what the pretrained backbone computes until fine-tuning moves them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, get_pretrained_cfg

from ..errors import ConfigError
from .retrofit import SpatialLayer, add_spatial_layers

__all__ = ["DATA_CFGS", "build", "cfg"]

# Default data settings per input family: classes, input size and normalization.
DATA_CFGS: dict[str, dict[str, Any]] = {
    "cifar100": dict(
        num_classes=100, input_size=(3, 32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)
    ),
    "tiny_imagenet": dict(
        num_classes=200, input_size=(3, 64, 64), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
    ),
    "imagenet": dict(num_classes=1000, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    "fashion_mnist": dict(num_classes=10, input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,)),
}


def cfg(data: str, first_conv: str, classifier: str = "head", hf_hub_id: str | None = None) -> dict[str, Any]:
    """A timm pretrained config: data settings of `DATA_CFGS[data]`, and the Hugging Face hub id
    of the base timm model's weights where they are published (None: no weights)."""
    weights = {"hf_hub_id": hf_hub_id} if hf_hub_id else {}
    return dict(
        url="", crop_pct=1.0, interpolation="bicubic", first_conv=first_conv, classifier=classifier,
        license="apache-2.0", **weights, **DATA_CFGS[data],
    )  # fmt: skip


def build(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    layer: SpatialLayer | None = None,
    placement: str | None = None,
    pretrained_filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """timm's `build_model_with_cfg`, then `add_spatial_layers(model, layer, placement)` if `layer`.

    The model's defaults (num_classes, in_chans, img_size) come from its pretrained config,
    and keyword arguments override them. With `pretrained`, the weights load into the backbone
    (filtered by `pretrained_filter_fn`, the timm family's checkpoint filter) before the spatial
    layers are inserted with `init="identity"`.
    """
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        source = get_pretrained_cfg(variant)
        if not (overlay.get("file") or overlay.get("hf_hub_id") or (source and (source.hf_hub_id or source.url))):
            raise ConfigError(
                f"pretrained: {variant} has no published weights; pass pretrained_file=PATH (a .safetensors, "
                ".pth or .bin state dict of its base timm model), or build the timm baseline with its weights "
                "and call ssm2d.add_spatial_layers(model, init='identity')"
            )
    model = build_model_with_cfg(
        model_cls, variant, pretrained=pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs
    )
    if layer is not None:
        add_spatial_layers(model, layer=layer, placement=placement, init="identity" if pretrained else "default")
    return model
