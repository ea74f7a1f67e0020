"""The VMamba classifier (models/vmamba.py): features and head, stage grids at any input size,
downsampling, drop-path schedule, init, weight-decay groups, fast vs ref path, sizes of the
registered variants, errors. Registry-wide checks live in test_models.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import ssm2d
from ssm2d.layers import SS2D
from ssm2d.models.vmamba import Downsample, VMamba, VSSBlock

F64 = torch.float64


def mini(**kwargs) -> VMamba:
    return ssm2d.create_model("vmamba_mini_28", **kwargs)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_grids(model: VMamba, x: torch.Tensor) -> list[tuple[int, int]]:
    """Grid each SS2D sees on input x, in module order."""
    grids = []
    hooks = [m.register_forward_pre_hook(lambda m, a: grids.append(tuple(a[0].shape[1:3])))
             for m in model.modules() if isinstance(m, SS2D)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return grids


def test_features_head_and_pooling():
    model = mini().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 4, 4, 80)  # 7 x 7 at width 40, then 4 x 4 at width 80
        pooled = model.forward_head(feats, pre_logits=True)
        assert_close(pooled, feats.mean(dim=(1, 2)), torch.float32, "mean pool")
        assert_close(model(x), model.head(pooled), torch.float32, "head")
    assert model(x).shape == (2, 10)


def test_architecture():
    model = mini()
    assert [len(stage.blocks) for stage in model.stages] == [2, 2]
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert isinstance(model.stages[1].downsample, Downsample)
    block = model.stages[1].blocks[0]
    assert isinstance(block, VSSBlock) and isinstance(block.mixer, SS2D)
    assert (block.mixer.dim, block.mixer.state_dim, block.mixer.expand) == (80, 1, 1)
    assert block.mlp.fc1.out_features == 160  # MLP ratio 2
    assert isinstance(block.norm1, torch.nn.LayerNorm) and isinstance(model.patch_embed.norm, torch.nn.LayerNorm)
    assert stage_grids(model, torch.randn(1, 1, 28, 28)) == [(7, 7)] * 2 + [(4, 4)] * 2


def test_block_is_two_residual_branches():
    block = VSSBlock(8, SS2D(8, state_dim=2), mlp_ratio=2.0).to(F64)
    x = torch.randn(2, 3, 5, 8, dtype=F64)
    h = x + block.mixer(block.norm1(x))
    assert_close(block(x), h + block.mlp(block.norm2(h)), F64, "VSS block")
    no_mlp = VSSBlock(8, block.mixer, mlp_ratio=0.0).to(F64)
    assert no_mlp.mlp is None and no_mlp.norm2 is None
    assert_close(no_mlp(x), x + block.mixer(block.norm1(x)), F64, "VSS block without MLP")


@pytest.mark.parametrize("size", [(7, 7), (5, 9), (3, 4), (1, 1), (2, 3)])
def test_downsample_pads_odd_maps(size):
    down = Downsample(3, 5).to(F64)
    x = torch.randn(2, *size, 3, dtype=F64)
    y = down(x)
    h, w = size
    assert y.shape == (2, math.ceil(h / 2), math.ceil(w / 2), 5)
    padded = F.pad(x.permute(0, 3, 1, 2), (0, w % 2, 0, h % 2))  # zeros at the bottom and right
    expected = down.norm(F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2).permute(0, 2, 3, 1))
    assert_close(y, expected, F64, f"downsample {size}")


@pytest.mark.parametrize(
    "name, size, grids",
    [("vmamba_mini_28", (30, 29), [(8, 8), (4, 4)]), ("vmamba_mini_28", (9, 27), [(3, 7), (2, 4)]),
     ("vmamba_mini_28", (1, 1), [(1, 1), (1, 1)]), ("vmamba_sd_32", (33, 18), [(17, 9), (9, 5), (5, 3)]),
     ("vmamba_sd_32", (3, 5), [(2, 3), (1, 2), (1, 1)])],
)  # fmt: skip
def test_any_input_size(name, size, grids):
    """The patch embedding pads to whole patches, every downsampling rounds up: no size is too
    small or too odd, and training runs."""
    model = ssm2d.create_model(name, num_classes=3)
    x = torch.randn(2, model.pretrained_cfg["input_size"][0], *size)
    expected = [g for g, stage in zip(grids, model.stages, strict=True) for _ in stage.blocks]
    assert stage_grids(model, x) == expected
    y = model.train()(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert model.stages[-1].blocks[-1].mixer.in_proj.weight.grad.abs().max() > 0


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = mini(drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.stages for b in stage.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_init():
    model = mini()
    head = model.head.weight
    assert head.std().item() == pytest.approx(0.02, rel=0.3) and not model.head.bias.any()
    fc1 = model.stages[0].blocks[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.2) and not fc1.bias.any()
    mixer = model.stages[1].blocks[1].mixer
    assert torch.equal(mixer.directions[2].A_log, torch.zeros(80, 1))  # S4D-Real: A = -1 for N = 1
    assert torch.equal(mixer.directions[2].D, torch.ones(80))
    bound = 1 / math.sqrt(80)  # PyTorch's Linear init: the SS2D projections keep it
    assert 0.8 * bound < mixer.in_proj.weight.abs().max() <= bound


def test_no_weight_decay_names_and_groups():
    model = mini()
    names = model.no_weight_decay()
    tagged = ("A_log", "D", "dt_proj.bias")
    expected = {f"stages.{s}.blocks.{b}.mixer.directions.{k}.{n}"
                for s in range(2) for b in range(2) for k in range(4) for n in tagged}  # fmt: skip
    assert names == expected
    groups = ssm2d.param_groups(model, weight_decay=0.1)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    params = dict(model.named_parameters())
    assert id(params["stages.0.blocks.0.mixer.in_proj.weight"]) in decay
    assert not any(id(params[n]) in decay for n in expected)


def test_fast_path_matches_ref_path():
    model = mini().to(F64).eval()
    x = torch.randn(2, 1, 20, 28, dtype=F64)
    with torch.no_grad():
        fast = model(x)
        for m in model.modules():
            if isinstance(m, SS2D):
                m.fast_path = False
        ref = model(x)
    assert_close(fast, ref, F64, "logits")


def test_registered_variants_and_sizes():
    assert ssm2d.list_models("vmamba_*") == ["vmamba_mini_28", "vmamba_sd_32", "vmamba_tiny_224"]
    tiny = ssm2d.create_model("vmamba_tiny_224")
    assert tiny.depths == (2, 2, 9, 2) and tiny.embed_dim == 96 and tiny.num_features == 768
    assert tiny.patch_embed.patch_size == (4, 4) and tiny.pretrained_cfg["input_size"] == (3, 224, 224)
    assert 29e6 < n_params(tiny) < 34e6, f"VMamba-T has about 30M parameters, got {n_params(tiny)}"
    for name, base in (("vmamba_mini_28", "vit_mini_28"), ("vmamba_sd_32", "vit_sd_32")):
        ours, theirs = n_params(ssm2d.create_model(name)), n_params(ssm2d.create_model(base))
        assert 0.85 < ours / theirs < 1.15, f"{name}: {ours} parameters, {base}: {theirs}"
    sd = ssm2d.create_model("vmamba_sd_32")
    assert sd.pretrained_cfg["num_classes"] == 100 and sd.patch_embed.patch_size == (2, 2)
    assert mini().pretrained_cfg["input_size"] == (1, 28, 28)


def test_reset_classifier():
    model = mini()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 80)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"depths": ()}, "depths: expected a non-empty tuple"), ({"depths": (2, 0)}, r"depths\[1\]"),
     ({"embed_dim": 0}, "embed_dim"), ({"mlp_ratio": -1.0}, "mlp_ratio")],
)  # fmt: skip
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mini(**kwargs)


def test_misspelled_argument_and_pretrained_raise():
    with pytest.raises(TypeError):
        mini(depth=(2, 2))
    with pytest.raises(ValueError, match="pretrained"):
        ssm2d.create_model("vmamba_sd_32", pretrained=True)


def test_repr_shows_configuration():
    assert "embed_dim=40, depths=(2, 2), num_classes=3" in repr(mini(num_classes=3))
