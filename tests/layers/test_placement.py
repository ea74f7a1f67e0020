"""Wrappers that run a spatial layer after another module: GridSize, SpatialAfter,
SpatialOnTokens and their checkpoint-key pre-hook (docs/math.md §7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close, size_id
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from ssm2d import SSM2D
from ssm2d.layers import GridSize, SpatialAfter, SpatialOnTokens
from ssm2d.models import add_spatial_layers

F64 = torch.float64


class FixedDepthwise(nn.Module):
    """A (B, H, W, C) -> (B, H, W, C) spatial layer: a fixed, asymmetric 3 x 2 depthwise conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(dim, 1, 3, 2, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x.permute(0, 3, 1, 2), self.weight, padding=(1, 1), groups=x.shape[-1])
        return y[..., : x.shape[2]].permute(0, 2, 3, 1)


def reference_conv_nchw(x: torch.Tensor, layer: FixedDepthwise) -> torch.Tensor:
    """`FixedDepthwise` written directly on (B, C, H, W)."""
    return F.conv2d(x, layer.weight, padding=(1, 1), groups=x.shape[1])[..., : x.shape[3]]


# ---------------------------------------------------------------------------------------------
# GridSize


# (image size, dynamic_img_pad, patch size); timm's PatchEmbed needs whole patches without padding
GRID_CASES = [
    ((32, 32), False, (4, 4)),
    ((28, 36), False, (4, 4)),
    ((28, 36), False, (4, 2)),
    ((32, 32), True, (4, 4)),
    ((30, 26), True, (4, 4)),
    ((30, 27), True, (4, 2)),
]


@pytest.mark.parametrize(
    "image, dynamic_img_pad, patch",
    GRID_CASES,
    ids=[f"{size_id(i)}-{'pad' if d else 'no-pad'}-patch{size_id(p)}" for i, d, p in GRID_CASES],
)
def test_grid_size_records_patch_grid(image, dynamic_img_pad, patch):
    embed = PatchEmbed(
        img_size=32,
        patch_size=patch,
        in_chans=3,
        embed_dim=8,
        flatten=False,
        output_fmt="NHWC",
        strict_img_size=False,
        dynamic_img_pad=dynamic_img_pad,
    )
    grid = GridSize()
    assert grid.size is None and repr(grid) == "GridSize(size=None)"
    embed.register_forward_pre_hook(grid)
    out = embed(torch.randn(2, 3, *image))
    expected = (-(-image[0] // patch[0]), -(-image[1] // patch[1]))  # whole patches, rounded up when padded
    assert grid.size == expected == tuple(out.shape[1:3]), f"recorded {grid.size}, output grid {tuple(out.shape[1:3])}"
    assert repr(grid) == f"GridSize(size={expected})"


def test_grid_size_follows_each_input():
    embed = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=8, strict_img_size=False)
    grid = GridSize()
    embed.register_forward_pre_hook(grid)
    for image in [(32, 32), (16, 40), (8, 4)]:
        embed(torch.randn(1, 3, *image))
        assert grid.size == (image[0] // 4, image[1] // 4)


def test_vit_with_dynamic_img_pad_runs_on_partial_patches():
    model = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        num_classes=3,
        dynamic_img_size=True,
        dynamic_img_pad=True,
    )
    add_spatial_layers(model)
    y = model(torch.randn(2, 3, 30, 26))
    assert model.blocks[0].norm1.grid.size == (8, 7)
    assert y.shape == (2, 3) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# SpatialAfter


def test_spatial_after_nhwc_equals_hand_computation():
    base = nn.Linear(5, 4).to(F64)
    spatial = FixedDepthwise(4)
    wrapper = SpatialAfter(base, spatial)
    assert wrapper.layout == "nhwc" and "layout='nhwc'" in repr(wrapper)
    x = torch.randn(2, 7, 6, 5, dtype=F64)
    y = wrapper(x)
    expected = reference_conv_nchw(base(x).permute(0, 3, 1, 2), spatial).permute(0, 2, 3, 1)
    assert y.shape == (2, 7, 6, 4)
    assert_close(y, expected, F64, "SpatialAfter nhwc")
    assert torch.equal(y, spatial(base(x)))


def test_spatial_after_nchw_equals_hand_computation():
    base = nn.Conv2d(5, 4, 1).to(F64)
    spatial = FixedDepthwise(4)
    wrapper = SpatialAfter(base, spatial, layout="nchw")
    x = torch.randn(2, 5, 7, 6, dtype=F64)  # (B, C_in, H, W), H != W
    y = wrapper(x)
    assert y.shape == (2, 4, 7, 6)
    assert_close(y, reference_conv_nchw(base(x), spatial), F64, "SpatialAfter nchw")
    # the hand computation is not trivially satisfied: the spatial layer changes its input
    assert (y - base(x)).abs().max().item() > 0.1


def test_spatial_after_owns_no_parameters():
    base, spatial = nn.Linear(5, 4), SSM2D(4, state_dim=2)
    wrapper = SpatialAfter(base, spatial)
    expected = {f"base.{k}" for k in base.state_dict()} | {f"spatial.{k}" for k in spatial.state_dict()}
    assert set(wrapper.state_dict()) == expected


@pytest.mark.parametrize("layout", ["NHWC", "nhw", None])
def test_spatial_after_rejects_bad_layout(layout):
    with pytest.raises(ValueError, match=rf"layout: expected 'nhwc' or 'nchw', got {layout!r}"):
        SpatialAfter(nn.Identity(), FixedDepthwise(4), layout=layout)


# ---------------------------------------------------------------------------------------------
# SpatialOnTokens


def test_spatial_on_tokens_needs_a_recorded_grid():
    wrapper = SpatialOnTokens(nn.Identity(), FixedDepthwise(4), GridSize(), num_prefix_tokens=1)
    with pytest.raises(RuntimeError, match=r"grid: no patch grid recorded.*run the whole model.*grid.size"):
        wrapper(torch.randn(2, 1 + 12, 4, dtype=F64))


@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_spatial_on_tokens_leaves_prefix_untouched(prefix):
    base = nn.Linear(5, 4).to(F64)
    spatial = FixedDepthwise(4)
    grid = GridSize()
    grid.size = (3, 4)
    wrapper = SpatialOnTokens(base, spatial, grid, num_prefix_tokens=prefix)
    assert wrapper.grid is grid and "grid" not in dict(wrapper.named_children())
    assert f"num_prefix_tokens={prefix}" in repr(wrapper)
    x = torch.randn(2, prefix + 12, 5, dtype=F64)
    y = wrapper(x)
    h = base(x)
    assert y.shape == (2, prefix + 12, 4)
    assert torch.equal(y[:, :prefix], h[:, :prefix]), "prefix tokens must be base(x), bit for bit"
    expected = reference_conv_nchw(h[:, prefix:].reshape(2, 3, 4, 4).permute(0, 3, 1, 2), spatial)
    assert_close(y[:, prefix:], expected.permute(0, 2, 3, 1).reshape(2, 12, 4), F64, "patch tokens")


def test_spatial_on_tokens_reads_the_shared_grid_at_call_time():
    grid = GridSize()
    wrapper = SpatialOnTokens(nn.Identity(), FixedDepthwise(4), grid, num_prefix_tokens=1)
    for size in [(3, 4), (4, 3), (2, 6)]:
        grid.size = size
        x = torch.randn(1, 13, 4, dtype=F64)
        expected = reference_conv_nchw(x[:, 1:].reshape(1, *size, 4).permute(0, 3, 1, 2), wrapper.spatial)
        assert_close(wrapper(x)[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 12, 4), F64, f"grid {size}")


# ---------------------------------------------------------------------------------------------
# Checkpoint keys


def _wrapped(kind: str) -> nn.Module:
    if kind == "after":
        return SpatialAfter(nn.Linear(5, 4), SSM2D(4, state_dim=2))
    grid = GridSize()
    return SpatialOnTokens(nn.Linear(5, 4), SSM2D(4, state_dim=2), grid, num_prefix_tokens=1)


@pytest.mark.parametrize("kind", ["after", "tokens"])
def test_unwrapped_keys_load_into_base(kind):
    source = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4))  # a "timm" model before insertion
    target = nn.Sequential(nn.Linear(3, 5), _wrapped(kind))
    saved = source.state_dict()
    assert set(saved) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    result = target.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {f"1.spatial.{k}" for k in target[1].spatial.state_dict()}
    assert torch.equal(target[1].base.weight, source[1].weight)
    assert torch.equal(target[1].base.bias, source[1].bias)
    assert torch.equal(target[0].weight, source[0].weight), "keys outside the wrapper must load as usual"
    assert set(saved) == {"0.weight", "0.bias", "1.weight", "1.bias"}, "the caller's dict must not be renamed"


@pytest.mark.parametrize("kind", ["after", "tokens"])
def test_wrapped_keys_load_strictly(kind):
    source, target = nn.Sequential(_wrapped(kind)), nn.Sequential(_wrapped(kind))
    with torch.no_grad():
        target[0].spatial.c_raw.add_(1.0)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_unwrapped_keys_do_not_leak_into_other_modules():
    # "1.weight" must go to module 1's base only, not to a module whose name starts with "1" (e.g. "10").
    target = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)], SpatialAfter(nn.Linear(4, 4), SSM2D(4, state_dim=2)))
    source = nn.Sequential(*[nn.Linear(4, 4) for _ in range(11)])
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {f"10.spatial.{k}" for k in target[10].spatial.state_dict()}
    assert torch.equal(target[1].weight, source[1].weight)
    assert torch.equal(target[10].base.weight, source[10].weight)
