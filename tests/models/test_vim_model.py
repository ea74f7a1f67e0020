"""The Vim model (docs/math.md §9): middle class token, position embedding at other grids,
drop-path schedule, float32 residual, init, optimizer groups, fast vs ref path, registry."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import ssm2d
from ssm2d.layers import VimMixer
from ssm2d.models.vim import Vim, VimBlock

F64 = torch.float64


def tiny(**kwargs) -> Vim:
    args = dict(img_size=(12, 16), patch_size=4, in_chans=2, num_classes=5, embed_dim=16, depth=3, state_dim=4)
    return Vim(**dict(args, **kwargs))


def test_class_token_sits_in_the_middle():
    model = tiny()  # 3 x 4 = 12 patches: the class token is token 6 of 13
    with torch.no_grad():
        model.pos_embed.zero_()
        grid = torch.randn(2, 3, 4, 16)
        tokens = model._pos_embed(grid)
    assert tokens.shape == (2, 13, 16)
    assert torch.equal(tokens[:, 6], model.cls_token[0].expand(2, -1).detach())
    assert torch.equal(torch.cat([tokens[:, :6], tokens[:, 7:]], 1), grid.flatten(1, 2))
    features = torch.zeros(2, 13, 16)
    features[:, 6] = torch.randn(2, 16)
    assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 6])


def test_position_embedding_is_resampled_for_other_grids():
    model = tiny()
    with torch.no_grad():
        grid = torch.zeros(1, 3, 4, 16)
        model.cls_token.zero_()
        assert torch.equal(model._pos_embed(grid), model.pos_embed)  # the training grid: as stored
        pos = model._pos_embed(torch.zeros(1, 5, 3, 16))  # 15 patches: class token at 7
    assert pos.shape == (1, 16, 16)
    assert torch.equal(pos[:, 7], model.pos_embed[:, 6]), "the class token's embedding moved"
    y = model(torch.randn(2, 2, 20, 12))
    assert y.shape == (2, 5) and torch.isfinite(y).all()


def test_drop_path_schedule_is_shifted_by_one():
    model = tiny(depth=4, drop_path_rate=0.3)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert model.drop_path.drop_prob == pytest.approx(0.3)


def test_residual_stream_stays_float32():
    block = VimBlock(8, state_dim=3).to(torch.bfloat16)
    hidden, residual = block(torch.randn(2, 5, 8, dtype=torch.bfloat16), None)
    assert residual.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    _, residual = block(hidden, residual)
    assert residual.dtype == torch.float32


def test_init():
    model = tiny(depth=4)
    bound = 1 / math.sqrt(model.layers[0].mixer.out_proj.in_features)  # PyTorch's Linear init bound
    for layer in model.layers:
        w = layer.mixer.out_proj.weight
        assert w.abs().max().item() <= bound / 2 + 1e-7, "out_proj not rescaled by 1/sqrt(depth)"
        assert w.abs().max().item() > 0.8 * bound / 2
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert not model.patch_embed.proj.bias.any() and not model.head.bias.any()
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_no_weight_decay_groups():
    model = tiny()
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}
    groups = ssm2d.param_groups(model, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    for name in ("cls_token", "pos_embed", "layers.0.mixer.directions.0.A_log", "layers.2.mixer.directions.1.A_log",
                 "layers.1.mixer.directions.1.D"):
        assert name in names, f"{name} gets weight decay"
    assert "layers.0.mixer.in_proj.weight" not in names and "patch_embed.proj.weight" not in names


def test_fast_path_matches_ref_path():
    model = tiny(depth=2).to(F64).eval()
    x = torch.randn(2, 2, 12, 16, dtype=F64)
    with torch.no_grad():
        fast = model(x)
        for m in model.modules():
            if isinstance(m, VimMixer):
                m.fast_path = False
        ref = model(x)
    assert_close(fast, ref, F64, "logits")


def test_registered_variants():
    names = ssm2d.list_models("vim_*")
    assert names == ["vim_mini_28", "vim_mini_32", "vim_tiny_224"]
    tiny_224 = ssm2d.create_model("vim_tiny_224")
    assert (tiny_224.embed_dim, tiny_224.depth, tiny_224.patch_embed.patch_size) == (192, 24, (16, 16))
    assert tiny_224.pos_embed.shape == (1, 197, 192)
    params = sum(p.numel() for p in tiny_224.parameters())
    assert 6e6 < params < 8e6, f"Vim-Ti has about 7M parameters, got {params}"
    mini = ssm2d.create_model("vim_mini_28", num_classes=3)
    assert mini.pretrained_cfg["input_size"] == (1, 28, 28) and mini.head.out_features == 3
    assert ssm2d.create_model("vim_mini_32").pretrained_cfg["num_classes"] == 100
    with pytest.raises(ValueError, match="pretrained"):
        ssm2d.create_model("vim_mini_28", pretrained=True)
    with pytest.raises(TypeError):
        ssm2d.create_model("vim_mini_28", drop_path=0.1)


@pytest.mark.parametrize("depth", [0, 2.0, True])
def test_bad_depth_is_a_clear_error(depth):
    with pytest.raises(ValueError, match=r"depth: expected an integer >= 1, got"):
        tiny(depth=depth)
