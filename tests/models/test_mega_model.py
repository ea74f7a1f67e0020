"""The Mega models: registered names and sizes, slots, identity retrofit from the slot-free
model, position embedding at other grids and `_nope`, head, optimizer groups, fast vs ref."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import ssm2d
from ssm2d.layers import S4ND, SSM2D, MegaEMA
from ssm2d.models import spatial_layers
from ssm2d.models.mega import Mega

F64 = torch.float64
SLOT_CLASSES = {"ema": MegaEMA, "ssm2d": SSM2D, "s4nd": S4ND}


def tiny(**kwargs) -> Mega:
    args = dict(img_size=(12, 16), patch_size=4, in_chans=2, num_classes=5, embed_dim=8, depth=2, hidden_dim=6,
                ffn_dim=10, zdim=4, ndim=2)  # fmt: skip
    return Mega(**dict(args, **kwargs))


def test_registered_names():
    assert ssm2d.list_models("mega_*") == [
        "mega_mini_28", "mega_mini_28_ema", "mega_mini_28_ema_nope", "mega_mini_28_nope", "mega_mini_28_s4nd",
        "mega_mini_28_s4nd_nope", "mega_mini_28_ssm2d", "mega_mini_28_ssm2d_nope",
        "mega_sd_32", "mega_sd_32_ema", "mega_sd_32_nope", "mega_sd_32_s4nd", "mega_sd_32_ssm2d",
        "mega_sd_32_ssm2d_nope",
        "mega_sd_64", "mega_sd_64_ema", "mega_sd_64_s4nd", "mega_sd_64_ssm2d",
        "mega_tiny_224", "mega_tiny_224_ema", "mega_tiny_224_ssm2d",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "slot", "pos"),
    [("mega_mini_28", "none", True), ("mega_mini_28_ssm2d_nope", "ssm2d", False), ("mega_mini_28_ema", "ema", True),
     ("mega_mini_28_s4nd_nope", "s4nd", False)],
)  # fmt: skip
def test_suffixes_pick_the_slot_and_position_embedding(name, slot, pos):
    model = ssm2d.create_model(name)
    assert model.slot == slot and (model.pos_embed is not None) == pos
    layers = spatial_layers(model)
    if slot == "none":
        assert not layers
    else:
        assert len(layers) == 4 and all(type(layer) is SLOT_CLASSES[slot] for layer in layers)
        assert all(layer.state_dim == 16 if slot != "ema" else layer.ndim == 16 for layer in layers)


def test_sizes():
    mini = ssm2d.create_model("mega_mini_28")
    vit = ssm2d.create_model("vit_mini_28")
    assert (mini.embed_dim, mini.depth, mini.patch_embed.patch_size) == (64, 4, (4, 4))
    assert mini.pretrained_cfg["input_size"] == (1, 28, 28) and mini.num_classes == 10
    ratio = sum(p.numel() for p in mini.parameters()) / sum(p.numel() for p in vit.parameters())
    assert 0.9 < ratio < 1.2, f"mega_mini_28 has {ratio:.2f}x vit_mini_28's parameters"
    for name, patch, classes in (("mega_sd_32", 4, 100), ("mega_sd_64", 8, 200)):
        model = ssm2d.create_model(name)
        attn = model.blocks[0].attn
        assert (model.depth, model.embed_dim, attn.hidden_dim, attn.zdim, attn.ndim) == (9, 192, 192, 192, 16)
        assert model.blocks[0].ffn.fc1.out_features == 192
        assert model.patch_embed.patch_size == (patch, patch) and model.patch_embed.grid_size == (8, 8)
        assert model.num_classes == classes
    tiny_224 = ssm2d.create_model("mega_tiny_224_ssm2d")
    attn = tiny_224.blocks[0].attn
    assert (tiny_224.depth, tiny_224.embed_dim, attn.hidden_dim, attn.zdim, attn.ndim) == (12, 192, 384, 64, 16)
    assert tiny_224.blocks[0].ffn.fc1.out_features == 384 and tiny_224.patch_embed.patch_size == (16, 16)
    assert 5e6 < sum(p.numel() for p in tiny_224.parameters()) < 7e6


@pytest.mark.parametrize("slot", ["ema", "ssm2d", "s4nd"])
def test_identity_retrofit_from_the_slot_free_model(slot):
    """A slot-free checkpoint loads into the model with a slot; identity slots keep its logits."""
    base = ssm2d.create_model("mega_mini_28").eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" model: no zero bias hides a term
    model = ssm2d.create_model(f"mega_mini_28_{slot}", slot_init="identity").eval()
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(".attn.moving_average.spatial." in k for k in result.missing_keys) and result.missing_keys
    x = torch.randn(2, 1, 28, 32)
    with torch.no_grad():
        assert_close(model(x), base(x), dict(rtol=1e-5, atol=1e-5), f"identity {slot} retrofit")
        for layer in spatial_layers(model):
            layer.reset_parameters()
        assert not torch.allclose(model(x), base(x), atol=1e-3)


def test_position_embedding_is_resampled_and_nope_has_none():
    model = tiny()
    with torch.no_grad():
        grid = torch.zeros(1, 3, 4, 8)
        assert torch.equal(model._pos_embed(grid), model.pos_embed.reshape(1, 3, 4, 8))
        assert model._pos_embed(torch.zeros(1, 5, 2, 8)).shape == (1, 5, 2, 8)
    y = model(torch.randn(2, 2, 20, 8))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    nope = tiny(pos_embed="none")
    assert nope.pos_embed is None and "pos_embed" not in nope.no_weight_decay()
    x = torch.randn(1, 3, 4, 8)
    assert torch.equal(nope._pos_embed(x), x)
    with pytest.raises(ValueError, match="pos_embed: expected 'learn' or 'none'"):
        tiny(pos_embed="sincos")


def test_head_is_norm_silu_projection_mean_pool_linear():
    model = tiny().to(F64)
    x = torch.randn(2, 2, 12, 16, dtype=F64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 3, 4, 8)
        pooled = torch.nn.functional.silu(features @ model.proj.weight.T + model.proj.bias).mean((1, 2))
        assert_close(model.forward_head(features, pre_logits=True), pooled, F64, "pre-logits")
        assert_close(model(x), pooled @ model.head.weight.T + model.head.bias, F64, "logits")
    assert tiny(num_classes=0)(torch.randn(1, 2, 12, 16)).shape == (1, 8)


def test_no_weight_decay_groups():
    model = tiny(slot="ema")
    groups = ssm2d.param_groups(model, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    for name in ("pos_embed", "blocks.0.attn.rel_pos", "blocks.1.attn.moving_average.spatial.alpha_raw",
                 "blocks.0.attn.moving_average.spatial.eta", "blocks.0.attn.norm.weight"):  # fmt: skip
        assert name in names, f"{name} gets weight decay"
    assert "blocks.0.attn.mx_proj.weight" not in names and "patch_embed.proj.weight" not in names


@pytest.mark.parametrize("slot", ["ema", "ssm2d", "s4nd"])
def test_fast_path_matches_ref_path(slot):
    model = tiny(slot=slot).to(F64).eval()
    x = torch.randn(2, 2, 12, 20, dtype=F64)
    with torch.no_grad():
        fast = model(x)
        for layer in spatial_layers(model):
            layer.fast_path = False
        ref = model(x)
    assert_close(fast, ref, F64, "logits")


def test_drop_path_schedule_and_dropouts():
    model = tiny(depth=3, drop_path_rate=0.2, dropout=0.1, attention_dropout=0.1, hidden_dropout=0.1)
    rates = [getattr(b.attn.drop_path, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert model.blocks[2].ffn.drop_path.drop_prob == pytest.approx(0.2)
    assert model.blocks[0].attn.attention_dropout.p == 0.1


def test_pretrained_and_misspelled_arguments_are_errors():
    with pytest.raises(ValueError, match="pretrained"):
        ssm2d.create_model("mega_mini_28", pretrained=True)
    with pytest.raises(TypeError):
        ssm2d.create_model("mega_mini_28", drop_path=0.1)
    with pytest.raises(ValueError, match=r"slot: expected one of"):
        tiny(slot="mamba")
