"""Parameter groups honouring the `_optim` tags of the SSM parameters (docs/math.md §4)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import ssm2d
from ssm2d import SSM2D


@pytest.mark.parametrize("kwargs", [dict(), dict(variant="complex", out_norm=True), dict(skip=False)],
                         ids=["default", "complex-out_norm", "no-skip"])
def test_ssm_parameters_are_tagged(kwargs):
    layer = SSM2D(8, state_dim=4, **kwargs)
    ssm_names = {"a_raw", "a_radius_raw", "a_angle_raw", "b_raw", "c_raw", "omega"}
    tagged = {name for name, p in layer.named_parameters() if getattr(p, "_optim", None) == {"weight_decay": 0.0}}
    assert tagged == ssm_names & dict(layer.named_parameters()).keys()
    assert len(tagged) == (5 if kwargs.get("variant") == "complex" else 4) - (not kwargs.get("skip", True))


def _group_of(groups) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_param_groups_weight_decay():
    model = nn.Sequential(nn.Linear(8, 8), SSM2D(8, out_norm=True))
    groups = ssm2d.param_groups(model, weight_decay=0.05)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    decay = _group_of(groups)
    linear, layer = model[0], model[1]
    assert decay[id(linear.weight)] == 0.05
    assert decay[id(linear.bias)] == 0.0
    assert decay[id(layer.norm.weight)] == 0.0
    for name in ("a_raw", "b_raw", "c_raw", "omega"):
        assert decay[id(getattr(layer, name))] == 0.0, name
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    opt = torch.optim.AdamW(groups, lr=1e-3)  # the groups are valid optimizer input
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]


def test_param_groups_skip_frozen_and_keep_extra_settings():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    model[1].weight._optim = {"weight_decay": 0.0, "lr": 1e-4}
    groups = ssm2d.param_groups(model, weight_decay=0.1)
    ids = _group_of(groups)
    assert id(model[0].weight) not in ids
    tagged = [g for g in groups if g.get("lr") == 1e-4]
    assert len(tagged) == 1 and tagged[0]["params"] == [model[1].weight] and tagged[0]["weight_decay"] == 0.0
    assert ids[id(model[0].bias)] == 0.0 and ids[id(model[1].bias)] == 0.0


@pytest.mark.parametrize("copy_fn", ["deepcopy", "pickle"])
def test_tags_survive_copies(copy_fn):
    """copy.deepcopy and pickling build new Parameters; the SSM ones are tagged again."""
    model = nn.Sequential(nn.Linear(8, 8), SSM2D(8))
    if copy_fn == "deepcopy":
        model = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        model = torch.load(buffer, weights_only=False)
    decay = _group_of(ssm2d.param_groups(model, weight_decay=0.05))
    for name, p in model[1].named_parameters():
        assert decay[id(p)] == 0.0, f"{name} after {copy_fn}"
    assert decay[id(model[0].weight)] == 0.05


def test_param_groups_honour_no_weight_decay():
    """timm's `no_weight_decay()` names (position embedding, class token) get no decay."""
    model = ssm2d.create_model("vit_mini_28_ssm2d")
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    decay = _group_of(ssm2d.param_groups(model, weight_decay=0.05))
    assert model.pos_embed.ndim == 3 and decay[id(model.pos_embed)] == 0.0
    assert decay[id(model.cls_token)] == 0.0
    assert decay[id(model.patch_embed.proj.weight)] == 0.05
    assert decay[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_spatial_lr_gives_the_spatial_layers_their_own_rate():
    """`spatial_lr`: every parameter of an inserted spatial layer, and only those, gets that "lr"."""
    model = ssm2d.create_model("vit_mini_28_ssm2d")
    groups = ssm2d.param_groups(model, weight_decay=0.05, spatial_lr=3e-3)
    spatial = {id(p) for layer in ssm2d.models.spatial_layers(model) for p in layer.parameters()}
    assert spatial
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= spatial if g.get("lr") == 3e-3 else not ids & spatial, g.keys()
    assert sum(len(g["params"]) for g in groups if "lr" in g) == len(spatial)
    opt = torch.optim.AdamW(groups, lr=1e-4)
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 3e-3]
    with pytest.raises(ValueError, match="spatial_lr"):
        ssm2d.param_groups(model, weight_decay=0.05, spatial_lr=0.0)
