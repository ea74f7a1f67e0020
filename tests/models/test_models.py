"""Every registered model: shapes, gradients, eval cache, state_dict, resolutions, timm registry.

Parametrized over `ssm2d.list_models()`, so a newly registered model is covered automatically.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
from conftest import rel_fro
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

import ssm2d
from ssm2d import SSM2D
from ssm2d.layers import SpatialOnTokens, SpatialPrior
from ssm2d.models import spatial_layers
from ssm2d.models.mega import Mega

NAMES = ssm2d.list_models()
BATCH = 2


def default_input(model: nn.Module, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def second_size(model: nn.Module) -> tuple[int, int]:
    """A non-square size other than the default that the model accepts: (H + P, W + 2P).

    P is the patch size for patch-embedding models (token grids need whole patches; Swin pads
    windows and odd stage maps itself) and 3 for ConvNeXt (any size; odd grids at every stage).
    """
    _, h, w = model.pretrained_cfg["input_size"]
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and not isinstance(model, ConvNeXt):
        ph, pw = patch_embed.patch_size
    else:
        ph = pw = 3
    return h + ph, w + 2 * pw


def expected_grids(model: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Grid each spatial layer sees at input size (H, W), in module order, by arithmetic.

    ViT and Mega: one grid of H/p x W/p tokens. Swin: the patch grid, halved (rounded up, timm pads odd
    maps) at every stage that downsamples. ConvNeXt: the stem's H/p x W/p, halved (rounded
    down: 2 x 2 stride-2 convolution without padding) at every stage that downsamples.
    """
    h, w = size
    if isinstance(model, (VisionTransformer, Mega)):
        ph, pw = model.patch_embed.patch_size
        return [(h // ph, w // pw)] * len(model.blocks)
    grids = []
    if isinstance(model, SwinTransformer):
        ph, pw = model.patch_embed.patch_size
        g = (h // ph, w // pw)
        for stage in model.layers:
            if not isinstance(stage.downsample, nn.Identity):
                g = (math.ceil(g[0] / 2), math.ceil(g[1] / 2))
            grids += [g] * len(stage.blocks)
        return grids
    assert isinstance(model, ConvNeXt), type(model)
    ph, pw = model.stem[0].stride
    g = (h // ph, w // pw)
    for stage in model.stages:
        if not isinstance(stage.downsample, nn.Identity):
            g = (g[0] // 2, g[1] // 2)
        grids += [g] * len(stage.blocks)
    return grids


def ssm2d_layers(model: nn.Module) -> list[SSM2D]:
    """The 2-D SSM layers among the spatial layers (the ones with an eval-mode kernel cache)."""
    return [layer for layer in spatial_layers(model) if isinstance(layer, SSM2D)]


def cached_grids(model: nn.Module) -> list[tuple[int, int] | None]:
    """The grid of each SSM2D's eval-mode kernel cache (None where it is empty)."""
    return [layer._cache.key[0] if layer._cache.key is not None else None for layer in ssm2d_layers(model)]


def fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every SSM2D kernel cache cleared (train() clears it), in eval mode."""
    return copy.deepcopy(model).train().eval()


def dead_parameters(model: nn.Module) -> set[str]:
    """Parameters that legitimately get exactly zero gradient.

    In a class-token ViT (global_pool="token") the logits read only the class token after the
    last block. The last block's MLP is per-token, and the "mix-ffn" spatial layer only touches
    patch tokens, so the last block's `mlp.fc1.spatial` cannot reach the logits: its
    gradient is exactly zero (checked below, and `test_mix_ffn_last_block_live_with_avg_pool`
    shows the same layer is live once the patch tokens are pooled). Nothing else is exempt.
    """
    # SP-SA's prior starts with w2 = 0 (docs/math.md §11), so its first layer gets exactly zero gradient.
    dead = {
        f"{name}.fc1.{p}"
        for name, m in model.named_modules()
        if isinstance(m, SpatialPrior) and not m.w2.any()
        for p in ("weight", "bias")
    }
    if not isinstance(model, VisionTransformer) or model.global_pool != "token":
        return dead
    fc1 = model.blocks[-1].mlp.fc1
    if not isinstance(fc1, SpatialOnTokens):
        return dead
    index = len(model.blocks) - 1
    return dead | {f"blocks.{index}.mlp.fc1.spatial.{n}" for n, _ in fc1.spatial.named_parameters()}


def assert_gradients(model: nn.Module, what: str) -> None:
    dead = dead_parameters(model)
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in dead:
            assert p.grad is None or not p.grad.any(), (
                f"{what}: {name} was expected to be unreachable from the logits, but its gradient has max abs "
                f"{p.grad.abs().max().item():.3e}; update dead_parameters()"
            )
            continue
        assert p.grad is not None, f"{what}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: {name} has a non-finite gradient"
        assert p.grad.abs().max().item() > 0, f"{what}: {name} has an all-zero gradient, shape {tuple(p.shape)}"
        checked += 1
    assert checked >= 10, f"{what}: only {checked} parameters checked"


# ---------------------------------------------------------------------------------------------
# Per-model checks


def test_registry_lists_every_family():
    assert len(NAMES) == len(set(NAMES)) >= 31, f"{len(NAMES)} models: {NAMES}"
    for family in ("vit_", "deit_", "swin_", "convnext_"):
        assert any(n.startswith(family) and n.endswith("_ssm2d") for n in NAMES), f"no {family}*_ssm2d model"


@pytest.mark.parametrize("name", NAMES)
def test_train_forward_and_gradients(name):
    # Stochastic depth off (Swin defaults to drop_path_rate=0.1): with batch 2 a block dropped
    # for both samples would give its parameters a zero gradient by chance.
    model = ssm2d.create_model(name, drop_path_rate=0.0).train()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"], f"num_classes {model.num_classes} != cfg {cfg['num_classes']}"
    layers = spatial_layers(model)
    if "_ssm2d" in name:
        assert layers and all(isinstance(layer, SSM2D) for layer in layers), f"{name}: {layers}"
    else:
        assert not ssm2d_layers(model), f"{name}: has 2-D SSM layers without _ssm2d in its name"
    x = default_input(model)
    y = model(x)
    assert y.shape == (BATCH, cfg["num_classes"]), f"output shape {tuple(y.shape)}"
    assert torch.isfinite(y).all(), "non-finite logits"
    assert y.std().item() > 0, "constant logits"
    y.square().mean().backward()
    assert_gradients(model, name)


@pytest.mark.parametrize("name", NAMES)
def test_eval_cache_and_state_dict_round_trip(name):
    torch.manual_seed(1)
    model = ssm2d.create_model(name).eval()
    x = default_input(model)
    with torch.no_grad():
        y1 = model(x)
        assert all(g is not None for g in cached_grids(model)), "eval + no_grad forward did not cache kernels"
        if ssm2d_layers(model):
            assert cached_grids(model) == expected_grids(model, x.shape[-2:]), f"cached grids {cached_grids(model)}"
        y2 = model(x)  # from the cached kernels
        y_fresh = fresh_copy(model)(x)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), f"two eval forwards differ: max abs diff {(y1 - y2).abs().max().item():.3e}"
    assert torch.equal(y2, y_fresh), f"cached vs fresh copy: max abs diff {(y2 - y_fresh).abs().max().item():.3e}"

    torch.manual_seed(2)
    other = ssm2d.create_model(name).eval()
    ours = model.state_dict()
    differs = [n for n, p in other.state_dict().items() if p.is_floating_point() and not torch.equal(p, ours[n])]
    assert differs, "a second instance with another seed has the same weights: the round trip proves nothing"
    with torch.no_grad():
        assert rel_fro(other(x), y1) > 1e-6, "differently initialized models give the same output"
    result = other.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        y_other = other(x)
    assert torch.equal(y_other, y1), f"after load_state_dict: max abs diff {(y_other - y1).abs().max().item():.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_second_resolution(name):
    model = ssm2d.create_model(name).eval()
    x1 = default_input(model)
    size = second_size(model)
    x2 = torch.randn(BATCH, x1.shape[1], *size)
    with torch.no_grad():
        model(x1)  # fills the kernel caches at the default grid
        grids1 = cached_grids(model)
        y2 = model(x2)
        grids2 = cached_grids(model)
        y2_fresh = fresh_copy(model)(x2)
    assert y2.shape == (BATCH, model.num_classes), f"at {size}: output shape {tuple(y2.shape)}"
    assert torch.isfinite(y2).all(), f"at {size}: non-finite logits"
    if ssm2d_layers(model):
        expected = expected_grids(model, size)
        assert grids2 == expected, f"at {size}: kernels cached for grids {grids2}, expected {expected}"
        assert grids1 == expected_grids(model, x1.shape[-2:])
        assert grids1[0] != grids2[0], f"the first stage's grid did not change: {grids1} -> {grids2}"
    # No kernel of the first grid was reused: same result as a copy that never saw it.
    diff = (y2 - y2_fresh).abs().max().item()
    assert torch.equal(y2, y2_fresh), f"at {size}: max abs diff to a fresh copy {diff:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_timm_create_model_builds_the_same_model(name):
    torch.manual_seed(0)
    ours = ssm2d.create_model(name)
    torch.manual_seed(0)
    theirs = timm.create_model(name)
    assert type(theirs) is type(ours)
    assert theirs.pretrained_cfg["input_size"] == ours.pretrained_cfg["input_size"]
    assert len(spatial_layers(theirs)) == len(spatial_layers(ours))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(theirs_sd) == list(ours_sd)
    for key, value in ours_sd.items():
        assert torch.equal(theirs_sd[key], value), f"{key}: same seed, different init"


def test_mix_ffn_last_block_live_with_avg_pool():
    """The exemption in `dead_parameters` is about class-token pooling only."""
    model = ssm2d.create_model("vit_mini_28_ssm2d_ffn", global_pool="avg").train()
    assert dead_parameters(model) == set()
    model(default_input(model)).square().mean().backward()
    assert_gradients(model, "vit_mini_28_ssm2d_ffn, global_pool='avg'")
    layer = model.blocks[-1].mlp.fc1.spatial
    assert layer.c_raw.grad.abs().max().item() > 0
