"""The comparators in the ViT pre-attention placement (models/vit.py): every `vit_*` base with
comparator variants has all of them, each inserting its own layer before every attention."""

from __future__ import annotations

import pytest
import torch

import ssm2d
from ssm2d.layers import S4ND, SS2D, SSM2D, V2M, DWConv2d, SPAttention, SpatialOnTokens, VimMixer2d
from ssm2d.models import spatial_layers

LAYERS = {"_s4nd": S4ND, "_v2m": V2M, "_spsa": SPAttention, "_vim": VimMixer2d, "_dwconv": DWConv2d, "_ss2d": SS2D}


@pytest.mark.parametrize("base", ["vit_mini_28", "vit_sd_32"])
def test_every_comparator_is_registered(base):
    names = set(ssm2d.list_models(f"{base}*"))
    missing = {base + suffix for suffix in LAYERS} - names
    assert not missing, f"not registered: {sorted(missing)}"


@pytest.mark.parametrize("suffix", LAYERS)
def test_comparator_sits_before_every_attention(suffix):
    model = ssm2d.create_model("vit_mini_28" + suffix)
    layers = spatial_layers(model)
    assert len(layers) == len(model.blocks)
    assert all(type(m) is LAYERS[suffix] and m.dim == model.embed_dim for m in layers), layers
    assert all(isinstance(block.norm1, SpatialOnTokens) for block in model.blocks)
    # Pre-attention: the layer reads the normalized patch grid of its block.
    seen = []
    layers[1].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.eval()(torch.randn(2, 1, 28, 36))  # a non-square 7 x 9 grid
    assert seen == [(2, 7, 9, model.embed_dim)]


def test_layer_kwargs_reach_every_inserted_layer():
    model = ssm2d.create_model("vit_mini_28_ssm2d", layer_kwargs={"n_ssm": 4, "state_dim": 8, "variant": "complex"})
    layers = spatial_layers(model)
    assert len(layers) == len(model.blocks)
    assert all(type(m) is SSM2D and (m.n_ssm, m.state_dim, m.variant) == (4, 8, "complex") for m in layers)
    with pytest.raises(TypeError, match="n_sssm"):
        ssm2d.create_model("vit_mini_28_ssm2d", layer_kwargs={"n_sssm": 4})
    with pytest.raises(ValueError, match="layer_kwargs: vit_mini_28 has no spatial layer"):
        ssm2d.create_model("vit_mini_28", layer_kwargs={"n_ssm": 4})
