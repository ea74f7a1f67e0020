"""The V2M classifier (docs/math.md §10; the V2M paper's results table): features, head, position embedding at other
sizes, initialization, weight-decay groups, V2M-T size, errors. Registry-wide checks live in
test_models.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import ssm2d
from ssm2d.layers import V2M
from ssm2d.models.v2m import MixerBlock, Visual2DMamba


def mini(**kwargs) -> Visual2DMamba:
    return ssm2d.create_model("v2m_mini_28", **kwargs)


def test_features_head_and_pooling():
    model = mini().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 7, 7, 32)
        pooled = model.forward_head(feats, pre_logits=True)
        assert_close(pooled, feats.mean(dim=(1, 2)), torch.float32, "mean pool")
        assert_close(model(x), model.head(pooled), torch.float32, "head")
    assert model(x).shape == (2, 10)


def test_architecture_follows_the_spec():
    model = mini()
    assert len(model.blocks) == 4 and all(isinstance(b, MixerBlock) for b in model.blocks)
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, V2M) and (mixer.dim, mixer.state_dim, mixer.expand) == (32, 4, 1)
    assert isinstance(model.blocks[0].norm, torch.nn.RMSNorm) and isinstance(model.norm, torch.nn.RMSNorm)
    assert model.pos_embed.shape == (1, 49, 32)  # no class token (docs/math.md §10)
    rates = [b.drop_path.drop_prob for b in mini(drop_path_rate=0.3).blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2, 0.3])


def test_v2m_tiny_has_about_7m_parameters():
    """Spec 3.2: V2M-T has 7M parameters (the paper's table, rounded)."""
    model = ssm2d.create_model("v2m_tiny_224")
    n = sum(p.numel() for p in model.parameters())
    assert 6.5e6 < n < 7.5e6, n
    assert len(model.blocks) == 24 and model.embed_dim == 192 and model.patch_embed.patch_size == (16, 16)


def test_out_proj_rescaled_by_depth():
    """Spec 2.1: out_proj is Kaiming-uniform divided by sqrt(depth)."""
    model = mini()
    bound = 1 / math.sqrt(32) / math.sqrt(4)  # Linear(32, 32) default bound, rescaled
    for block in model.blocks:
        w = block.mixer.out_proj.weight.abs().max().item()
        assert 0.9 * bound < w <= bound, (w, bound)


def test_position_embedding_resampled_for_other_sizes():
    model = mini().eval()
    base = model._pos_embed((7, 7))
    assert torch.equal(base, model.pos_embed.reshape(1, 7, 7, 32))
    other = model._pos_embed((9, 5))
    assert other.shape == (1, 9, 5, 32)
    # Bicubic resampling of a constant embedding stays constant.
    with torch.no_grad():
        model.pos_embed.fill_(0.25)
    assert_close(model._pos_embed((9, 5)), torch.full((1, 9, 5, 32), 0.25), torch.float32, "constant")
    with torch.no_grad():
        assert model(torch.randn(1, 1, 36, 20)).shape == (1, 10)


def test_no_weight_decay_names_and_groups():
    model = mini()
    names = model.no_weight_decay()
    assert "pos_embed" in names
    for i in range(4):
        for p in ("pass1", "pass2"):
            assert {f"blocks.{i}.mixer.{p}.{n}" for n in ("A_log", "D", "dt_proj.bias")} <= names
    assert "blocks.0.mixer.in_proj.weight" not in names
    groups = ssm2d.param_groups(model, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(model.blocks[0].mixer.pass1.A_log) in no_decay


def test_official_layout_model_square_only():
    model = mini(official_layout=True).eval()
    assert all(b.mixer.official_layout for b in model.blocks)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)
        with pytest.raises(ValueError, match="square grid"):
            model(torch.randn(1, 1, 28, 32))


def test_reset_classifier():
    model = mini()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 32)


def test_bad_arguments_raise():
    with pytest.raises(TypeError):
        mini(stat_dim=4)
    with pytest.raises(ValueError, match="pretrained"):
        ssm2d.create_model("v2m_mini_32", pretrained=True)
    with pytest.raises(ValueError, match="depth"):
        mini(depth=0)


def test_repr_shows_configuration():
    text = repr(mini(num_classes=3))
    assert "embed_dim=32, depth=4, num_classes=3" in text and "official_layout=False" in text
