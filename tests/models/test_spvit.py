"""SP-ViT specifics (docs/math.md §11): which blocks use SP-SA, the class token's split, priors per
grid, and gradients once the prior has left its initialization. The generic checks of every
registered model are in test_models.py."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention

import ssm2d
from ssm2d.layers import SPAttention, SPAttentionOnTokens


def sp_blocks(model) -> list[bool]:
    return [isinstance(block.attn, SPAttentionOnTokens) for block in model.blocks]


def perturb_priors(model) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SPAttention):
                m.prior.w2.normal_(0.0, 0.5)


def test_architectures():
    small = ssm2d.create_model("spvit_small_224")
    assert sp_blocks(small) == [True] * 14 + [False] * 2  # SP-ViT-S: 16 blocks, SP-SA in the first 14
    block = small.blocks[0]
    assert (small.embed_dim, block.attn.mixer.num_heads, block.mlp.fc1.out_features) == (384, 6, 1152)
    assert 23e6 < sum(p.numel() for p in small.parameters()) < 26e6  # 26M with LV-ViT's stem and aux head
    for name, in_chans, classes in (("spvit_mini_28", 1, 10), ("spvit_mini_32", 3, 100)):
        model = ssm2d.create_model(name)
        assert sp_blocks(model) == [True, True, True, False]
        assert model.pos_embed.shape == (1, model.patch_embed.num_patches, 64)  # no class-token slot
        assert model.blocks[0].attn.mixer.qk.bias is None and model.blocks[3].attn.qkv.bias is None
        assert isinstance(model.blocks[3].attn, Attention)
        assert (model.patch_embed.proj.in_channels, model.num_classes) == (in_chans, classes)


def test_class_token_joins_after_the_sp_blocks():
    """Until block K the class token does not depend on the image, and patches never see it."""
    model = ssm2d.create_model("spvit_mini_28").eval()
    perturb_priors(model)
    outputs = []
    model.blocks[2].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
        model.cls_token.add_(1.0)
        model(torch.randn(2, 1, 28, 28) + 1.0)
    first, second = outputs
    assert torch.equal(first[0, 0], first[1, 0]), "class token after the SP blocks depends on the image"
    assert not torch.equal(first[0, 1:], first[1, 1:])
    model_b = ssm2d.create_model("spvit_mini_28").eval()
    model_b.load_state_dict(model.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 1, 28, 28)
        tokens = model_b.blocks[:3](model_b._pos_embed(model_b.patch_embed(x)))
        model_b.cls_token.normal_()
        tokens_b = model_b.blocks[:3](model_b._pos_embed(model_b.patch_embed(x)))
    assert torch.equal(tokens[:, 1:], tokens_b[:, 1:]), "patch tokens saw the class token in an SP-SA block"
    assert not torch.equal(second[0, 0], first[0, 0])


def test_priors_follow_the_grid():
    model = ssm2d.create_model("spvit_mini_32").eval()
    perturb_priors(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert {b.attn.mixer.prior._cache.key[0] for b in model.blocks[:3]} == {(8, 8)}
        y = model(torch.randn(2, 3, 20, 36))
        assert {b.attn.mixer.prior._cache.key[0] for b in model.blocks[:3]} == {(5, 9)}
    assert y.shape == (2, 100) and torch.isfinite(y).all()


def test_every_parameter_gets_gradient_once_the_prior_moves():
    """test_models.py runs at initialization, where w2 = 0 leaves the priors' first layers without gradient."""
    model = ssm2d.create_model("spvit_mini_28", drop_path_rate=0.0).train()
    model(torch.randn(2, 1, 28, 28)).square().mean().backward()
    zero = {n for n, p in model.named_parameters() if not p.grad.any()}
    assert zero == {f"blocks.{i}.attn.mixer.prior.fc1.{w}" for i in range(3) for w in ("weight", "bias")}
    model.zero_grad()
    perturb_priors(model)
    model(torch.randn(2, 1, 28, 28)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient"


def test_arguments():
    assert sp_blocks(ssm2d.create_model("spvit_mini_28", sp_depth=1)) == [True, False, False, False]
    assert sp_blocks(ssm2d.create_model("spvit_mini_28", sp_depth=0)) == [False] * 4
    model = ssm2d.create_model("spvit_mini_28", proj_drop_rate=0.1, class_token=False, global_pool="avg")
    assert model.blocks[0].attn.mixer.proj_drop.p == 0.1 and model.blocks[0].attn.num_prefix_tokens == 0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"sp_depth: expected an integer in \[0, 4\]"):
        ssm2d.create_model("spvit_mini_28", sp_depth=5)
    with pytest.raises(ValueError, match="attn_drop_rate: SP-SA has no attention dropout"):
        ssm2d.create_model("spvit_mini_28", attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="patch_drop_rate"):
        ssm2d.create_model("spvit_mini_28", patch_drop_rate=0.1)
    with pytest.raises(TypeError):
        ssm2d.create_model("spvit_mini_28", sp_dept=2)
    with pytest.raises(ValueError, match="pretrained"):
        ssm2d.create_model("spvit_mini_28", pretrained=True)
