"""Inserting spatial layers into timm's ViT, Swin and ConvNeXt (docs/math.md §7): identity init,
data flow of every placement, checkpoints, copies, resolutions and errors."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TOL, assert_close, rel_fro, size_id, tiny_vit
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition
from timm.models.vision_transformer import VisionTransformer

import ssm2d
from ssm2d import SSM2D
from ssm2d.layers import GridSize, SpatialAfter, SpatialOnTokens
from ssm2d.models import PLACEMENTS, add_spatial_layers, spatial_layers
from ssm2d.ops import fold_directions

F64 = torch.float64
PREFIX = 2  # class token + register token of `tiny_vit`


RETROFIT_VIT = dict(embed_dim=48, num_classes=7, dynamic_img_size=False)  # for tiny_vit


def tiny_swin(**kwargs) -> SwinTransformer:
    args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=7)
    return SwinTransformer(**{**args, **kwargs})


def tiny_convnext(**kwargs) -> ConvNeXt:
    # Layer scale 1 instead of timm's 1e-6, so that every block visibly shapes the output.
    args = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), patch_size=1, num_classes=7, ls_init_value=1.0)
    return ConvNeXt(**{**args, **kwargs})


BUILDERS = {"vit": tiny_vit, "swin": tiny_swin, "convnext": tiny_convnext}
IDENTITY_CASES = [("vit", "pre-attention"), ("vit", "mix-ffn"), ("swin", "pre-attention"), ("convnext", "post-dwconv")]


def image(batch=2, size=(32, 32), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, *size, dtype=dtype)


def retrofitted_vit(placement="pre-attention", init="default", dtype=F64, **kwargs) -> VisionTransformer:
    model = add_spatial_layers(tiny_vit(**{**RETROFIT_VIT, **kwargs}), placement=placement, init=init)
    return model.to(dtype).eval()


def spatial_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if ".spatial." in k}


class Capture:
    """Forward (pre-)hooks that store what a module received or returned."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []

    def input(self, module: nn.Module, key: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, args: self.values.__setitem__(key, args[0])))

    def output(self, module: nn.Module, key: str) -> None:
        self.handles.append(module.register_forward_hook(lambda m, args, out: self.values.__setitem__(key, out)))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Identity initialization


@pytest.mark.parametrize("family, placement", IDENTITY_CASES, ids=[f"{f}-{p}" for f, p in IDENTITY_CASES])
def test_identity_init_keeps_outputs(family, placement):
    model = BUILDERS[family]().to(F64).eval()
    x = image(dtype=F64)
    with torch.no_grad():
        before = model(x)
        add_spatial_layers(model, placement=placement, init="identity")
        model.to(F64)
        layers = spatial_layers(model)
        assert len(layers) == {"vit": 2, "swin": 4, "convnext": 4}[family]
        after = model(x)
        assert_close(after, before, TOL[F64], f"{family} {placement}: identity retrofit")
        # The comparison can fail: the same model with its kernels switched on differs.
        for layer in layers:
            layer.c_raw.normal_()
        perturbed = model(x)
    change = rel_fro(perturbed, before)
    assert change > 1e-3, f"{family} {placement}: perturbing C changed the output by only {change:.3e}"


def test_all_placements_are_covered():
    covered = {(f, p) for f, p in IDENTITY_CASES} | {("convnext", "dwconv")}
    assert covered == {(f, p) for f, ps in PLACEMENTS.items() for p in ps}


def test_convnext_dwconv_identity_is_refused():
    model = tiny_convnext()
    with pytest.raises(ValueError, match="post-dwconv"):
        add_spatial_layers(model, placement="dwconv", init="identity")
    assert spatial_layers(model) == [], "a refused call must leave the model unchanged"


# ---------------------------------------------------------------------------------------------
# Where each placement feeds the spatial layer


@pytest.mark.parametrize("block_index", [0, 1])
def test_vit_pre_attention_feeds_q_k_v(block_index):
    model = retrofitted_vit(dynamic_img_size=True)
    assert model.num_prefix_tokens == PREFIX
    block = model.blocks[block_index]
    assert isinstance(block.norm1, SpatialOnTokens)
    cap = Capture()
    cap.input(block, "x")
    cap.input(block.attn, "attn")
    cap.input(block.attn.qkv, "qkv")
    size = (32, 24)  # 8 x 6 patches: a non-square grid catches row/column mix-ups
    with torch.no_grad():
        model(image(size=size, dtype=F64))
        x = cap["x"]
        normed = block.norm1.base(x)
        b, _, c = normed.shape
        patches = block.norm1.spatial(normed[:, PREFIX:].reshape(b, 8, 6, c)).reshape(b, 48, c)
    attn_in = cap["attn"]
    assert attn_in.shape == (2, PREFIX + 48, 48)
    assert torch.equal(attn_in[:, :PREFIX], normed[:, :PREFIX]), "prefix tokens must bypass the spatial layer"
    assert_close(attn_in[:, PREFIX:], patches, F64, "attention input, patch tokens")
    assert rel_fro(patches, normed[:, PREFIX:]) > 0.1, "the spatial layer did nothing: the test proves nothing"
    assert torch.equal(cap["qkv"], attn_in), "qkv must read the attention input"


@pytest.mark.parametrize("block_index", [0, 1])
def test_vit_mix_ffn_runs_between_fc1_and_act(block_index):
    model = retrofitted_vit(placement="mix-ffn", dynamic_img_size=True)
    block = model.blocks[block_index]
    assert isinstance(block.mlp.fc1, SpatialOnTokens) and isinstance(block.norm1, nn.LayerNorm)
    hidden = block.mlp.fc1.base.out_features
    assert block.mlp.fc1.spatial.dim == hidden == 4 * 48
    cap = Capture()
    cap.input(block.norm2, "mid")
    cap.input(block.mlp.act, "act")
    with torch.no_grad():
        model(image(size=(24, 40), dtype=F64))  # 6 x 10 patches
        h = block.mlp.fc1.base(block.norm2(cap["mid"]))
        b = h.shape[0]
        patches = block.mlp.fc1.spatial(h[:, PREFIX:].reshape(b, 6, 10, hidden)).reshape(b, 60, hidden)
    act_in = cap["act"]
    assert act_in.shape == (2, PREFIX + 60, hidden)
    assert torch.equal(act_in[:, :PREFIX], h[:, :PREFIX]), "prefix tokens must bypass the spatial layer"
    assert_close(act_in[:, PREFIX:], patches, F64, "act input, patch tokens")
    assert rel_fro(patches, h[:, PREFIX:]) > 0.1, "the spatial layer did nothing: the test proves nothing"


@pytest.mark.parametrize("block_index", [0, 1], ids=["no-shift", "shifted"])
def test_swin_layer_sees_stage_map_and_attention_its_windows(block_index):
    model = add_spatial_layers(tiny_swin(dynamic_img_size=True)).to(F64).eval()
    block = model.layers[0].blocks[block_index]
    assert isinstance(block, SwinTransformerBlock) and isinstance(block.norm1, SpatialAfter)
    assert any(block.shift_size) == bool(block_index), f"shift {block.shift_size}"
    wh, ww = block.window_size
    assert (wh, ww) == (4, 4)
    cap = Capture()
    cap.input(block.norm1.spatial, "spatial_in")
    cap.output(block.norm1.spatial, "spatial_out")
    cap.input(block.attn, "attn")
    with torch.no_grad():
        model(image(size=(36, 28), dtype=F64))  # stage map 18 x 14: not a multiple of the window
    assert cap["spatial_in"].shape == (2, 18, 14, 16), f"spatial layer input {tuple(cap['spatial_in'].shape)}"
    y = cap["spatial_out"]
    if any(block.shift_size):
        y = torch.roll(y, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    y = F.pad(y, (0, 0, 0, (ww - 14 % ww) % ww, 0, (wh - 18 % wh) % wh))
    windows = window_partition(y, (wh, ww)).reshape(-1, wh * ww, 16)
    assert cap["attn"].shape == windows.shape == (2 * 5 * 4, 16, 16)
    assert torch.equal(cap["attn"], windows), "attention must read windows of the spatial layer's output"


def test_convnext_dwconv_replaces_the_convolution():
    model = add_spatial_layers(tiny_convnext(), layer=partial(SSM2D, kernel_size=3), placement="dwconv")
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert len(blocks) == 4
    for block, dim in zip(blocks, (8, 16, 24, 32)):
        wrapper = block.conv_dw
        assert isinstance(wrapper, SpatialAfter) and wrapper.layout == "nchw"
        assert type(wrapper.base) is nn.Identity
        assert isinstance(wrapper.spatial, SSM2D) and wrapper.spatial.dim == dim
        assert wrapper.spatial.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()), "a depthwise conv is left"
    y = model(image())
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_convnext_post_dwconv_keeps_the_convolution():
    model = add_spatial_layers(tiny_convnext(), placement="post-dwconv")
    for block in [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]:
        assert isinstance(block.conv_dw.base, nn.Conv2d) and block.conv_dw.base.kernel_size == (7, 7)
        assert block.conv_dw.spatial.kernel_size is None


@pytest.mark.parametrize("name", ssm2d.list_models("convnext_*_ssm2d*"))
def test_registered_convnext_layers_span_the_7x7_of_the_dwconv(name):
    model = ssm2d.create_model(name)
    layers = spatial_layers(model)
    assert layers and all(layer.kernel_size == (4, 4) for layer in layers)
    folded = fold_directions(layers[0].kernels(layers[0].kernel_grid((32, 32))))
    assert tuple(folded.shape[-2:]) == (7, 7), f"folded kernel {tuple(folded.shape)}"
    assert all(type(m.base) is nn.Identity for m in model.modules() if isinstance(m, SpatialAfter))


@pytest.mark.parametrize("path", ["fft", "direct", "ref"])
@pytest.mark.parametrize("cell", [(6, 5), (0, 0), (12, 10), (2, 9)], ids=size_id)
def test_kernel_size_bounds_the_receptive_field(cell, path):
    k, grid = 3, (13, 11)
    layer = SSM2D(2, state_dim=3, kernel_size=k).to(F64)
    layer.fast_path = path != "ref"
    layer.conv_method = path if path != "ref" else "auto"
    x = torch.randn(1, *grid, 2, dtype=F64, requires_grad=True)
    i, j = cell
    (gx,) = torch.autograd.grad(layer(x)[0, i, j, 1], x)
    rows, cols = torch.arange(grid[0])[:, None], torch.arange(grid[1])[None, :]
    inside = ((rows - i).abs() <= k - 1) & ((cols - j).abs() <= k - 1)
    g = gx[0, :, :, 1]
    exact = path != "fft"  # the FFT leaves round-off outside the window
    outside = g[~inside].abs().max().item()
    assert outside <= (0.0 if exact else 1e-12), f"cell {cell}: gradient {outside:.3e} beyond {k - 1} cells"
    assert gx[0, :, :, 0].abs().max().item() <= (0.0 if exact else 1e-12), "channels must not mix"
    # Every in-grid corner of the (2k-1) x (2k-1) window is reached (one direction each).
    corners = [(i + di, j + dj) for di in (-(k - 1), k - 1) for dj in (-(k - 1), k - 1)]
    corners = [(r, c) for r, c in corners if 0 <= r < grid[0] and 0 <= c < grid[1]]
    assert corners
    for r, c in corners:
        assert g[r, c].abs().item() > 1e-6, f"cell {cell}: no gradient at window corner {(r, c)}"
    assert int((g.abs() > 1e-9).sum()) == int(inside.sum()), "every cell inside the window should contribute"


# ---------------------------------------------------------------------------------------------
# Prefix tokens, checkpoints, copies, resolutions


@pytest.mark.parametrize("placement", PLACEMENTS["vit"])
def test_prefix_tokens_unchanged_through_every_wrapper(placement):
    model = retrofitted_vit(placement=placement)
    wrappers = [m for m in model.modules() if isinstance(m, SpatialOnTokens)]
    assert len(wrappers) == 2 and all(w.num_prefix_tokens == PREFIX for w in wrappers)
    cap = Capture()
    for i, w in enumerate(wrappers):
        cap.output(w, f"out{i}")
        cap.output(w.base, f"base{i}")
    with torch.no_grad():
        model(image(dtype=F64))
    for i in range(len(wrappers)):
        out, base = cap[f"out{i}"], cap[f"base{i}"]
        assert torch.equal(out[:, :PREFIX], base[:, :PREFIX]), f"wrapper {i}: prefix tokens changed"
        assert rel_fro(out[:, PREFIX:], base[:, PREFIX:]) > 0.1, f"wrapper {i}: patch tokens untouched"


@pytest.mark.parametrize(
    "family, placement",
    [("vit", "pre-attention"), ("vit", "mix-ffn"), ("swin", "pre-attention"), ("convnext", "post-dwconv")],
    ids=["vit-pre-attention", "vit-mix-ffn", "swin", "convnext"],
)
def test_timm_checkpoint_loads_after_insertion(family, placement):
    torch.manual_seed(10)
    original = BUILDERS[family]().to(F64).eval()
    checkpoint = copy.deepcopy(original.state_dict())  # saved before any insertion
    torch.manual_seed(11)
    model = add_spatial_layers(BUILDERS[family](), placement=placement, init="identity").to(F64).eval()
    result = model.load_state_dict(checkpoint, strict=False)
    assert result.unexpected_keys == [], f"unexpected: {result.unexpected_keys}"
    assert set(result.missing_keys) == spatial_keys(model) != set(), f"missing: {result.missing_keys}"
    x = image(dtype=F64)
    with torch.no_grad():
        # identity layers + the timm weights in `.base`: the original model's outputs
        assert_close(model(x), original(x), F64, f"{family}: retrofitted model with the timm checkpoint")
    assert checkpoint.keys() == original.state_dict().keys(), "loading must not rename the caller's dict"


def test_retrofitted_checkpoint_round_trip():
    torch.manual_seed(20)
    model = retrofitted_vit()
    saved = copy.deepcopy(model.state_dict())
    assert any(".base." in k for k in saved) and spatial_keys(model)
    torch.manual_seed(21)
    other = retrofitted_vit()
    assert not torch.equal(other.blocks[0].norm1.spatial.c_raw, model.blocks[0].norm1.spatial.c_raw)
    result = other.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = image(dtype=F64)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_deepcopy_keeps_one_grid_per_model():
    model = retrofitted_vit(dynamic_img_size=True)
    x1, x2 = image(size=(32, 32), dtype=F64), image(size=(24, 40), dtype=F64)
    with torch.no_grad():
        y1 = model(x1)
        clone = copy.deepcopy(model)
        grids = {id(w.grid) for w in clone.modules() if isinstance(w, SpatialOnTokens)}
        hooks = [h for h in clone.patch_embed._forward_pre_hooks.values() if isinstance(h, GridSize)]
        assert len(grids) == 1 and len(hooks) == 1 and id(hooks[0]) in grids, "the copy's wrappers must share its hook"
        assert hooks[0] is not model.blocks[0].norm1.grid, "the copy must not share the original's grid"
        y_clone = clone(x2)  # runs at another resolution than the original last saw
        assert clone.blocks[0].norm1.grid.size == (6, 10)
        assert model.blocks[0].norm1.grid.size == (8, 8), "running the copy changed the original's grid"
        assert torch.equal(model(x1), y1)
        y2 = model(x2)
    assert y_clone.shape == (2, 7)
    assert torch.equal(y_clone, y2), f"copy vs original at 24 x 40: max abs diff {(y_clone - y2).abs().max():.3e}"


@pytest.mark.parametrize("size", [(32, 32), (20, 44), (48, 16)], ids=size_id)
def test_any_resolution(size):
    model = retrofitted_vit(dynamic_img_size=True)
    cap = Capture()
    cap.input(model.blocks[1].norm1.spatial, "grid")
    with torch.no_grad():
        y = model(image(size=size, dtype=F64))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    expected = (size[0] // 4, size[1] // 4)
    assert model.blocks[0].norm1.grid.size == expected
    assert cap["grid"].shape == (2, *expected, 48), f"spatial layer input {tuple(cap['grid'].shape)}"


def _gradients(model: nn.Module, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad()
    sum(model(x).square().sum() for x in images).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_one_resolution():
    model = retrofitted_vit(dynamic_img_size=True).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    images = [image(size=(28, 36), dtype=F64)]
    expected, actual = _gradients(model, images), _gradients(checkpointed, images)
    for name, g in expected.items():
        assert_close(actual[name], g, F64, f"checkpointed grad {name}")


def test_grad_checkpointing_two_resolutions_in_one_graph():
    """Multi-crop style: two resolutions forwarded, then one backward.

    timm's gradient checkpointing re-runs each block in the backward pass, after the second
    forward has recorded its grid. SpatialOnTokens must still find the first forward's grid
    (7 x 9, not 5 x 9) for the re-run, from the token count.
    """
    model = retrofitted_vit(dynamic_img_size=True).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    images = [image(size=(28, 36), dtype=F64), image(size=(20, 36), dtype=F64)]
    expected = _gradients(model, images)
    actual = _gradients(checkpointed, images)
    for name, g in expected.items():
        assert_close(actual[name], g, F64, f"checkpointed grad {name}")


def test_spatial_layers_lists_inserted_layers_in_order():
    model = retrofitted_vit()
    assert spatial_layers(model) == [b.norm1.spatial for b in model.blocks]
    assert spatial_layers(tiny_vit(**RETROFIT_VIT)) == []


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_name_suggests_close_one():
    with pytest.raises(ValueError, match=r"vit_sd_23.*did you mean vit_sd_32"):
        ssm2d.create_model("vit_sd_23")


@pytest.mark.parametrize("name", ["vit_mini_28_ssm2d", "swin_mini_28_ssm2d", "convnext_mini_28_ssm2d"])
def test_misspelled_keyword_is_type_error(name):
    with pytest.raises(TypeError, match="num_clases"):
        ssm2d.create_model(name, num_clases=3)


@pytest.mark.parametrize("name", ["vit_sd_32_ssm2d", "swin_sd_32_ssm2d", "convnext_sd_32_ssm2d", "vit_sd_32"])
def test_pretrained_is_refused(name):
    with pytest.raises(ValueError, match=rf"pretrained: {name} has no published weights.*init='identity'"):
        ssm2d.create_model(name, pretrained=True)


def test_non_timm_model_is_type_error():
    with pytest.raises(TypeError, match=r"VisionTransformer.*SwinTransformer.*ConvNeXt, got Linear"):
        add_spatial_layers(nn.Linear(4, 4))


@pytest.mark.parametrize("family, bad", [("vit", "dwconv"), ("swin", "mix-ffn"), ("convnext", "pre-attention")])
def test_invalid_placement_lists_valid_ones(family, bad):
    valid = PLACEMENTS[family]
    with pytest.raises(ValueError, match=r"placement: expected one of") as info:
        add_spatial_layers(BUILDERS[family](), placement=bad)
    assert all(repr(p) in str(info.value) for p in valid) and repr(bad) in str(info.value), str(info.value)


def test_invalid_init_is_value_error():
    with pytest.raises(ValueError, match=r"init: expected 'default' or 'identity', got 'zeros'"):
        add_spatial_layers(tiny_vit(**RETROFIT_VIT), init="zeros")


def test_layer_instance_is_type_error():
    with pytest.raises(TypeError, match=r"layer: expected a layer class or factory"):
        add_spatial_layers(tiny_vit(**RETROFIT_VIT), layer=SSM2D(8))


def test_second_insertion_is_value_error():
    model = add_spatial_layers(tiny_swin())
    with pytest.raises(ValueError, match="already has spatial layers"):
        add_spatial_layers(model)
    assert len(spatial_layers(model)) == 4


class DepthwiseNHWC(nn.Module):
    """A spatial layer without reset_to_identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def test_identity_init_needs_reset_to_identity():
    with pytest.raises(TypeError, match=r"init='identity': DepthwiseNHWC has no reset_to_identity"):
        add_spatial_layers(tiny_vit(**RETROFIT_VIT), layer=DepthwiseNHWC, init="identity")
    # without init="identity" any (B, H, W, C) layer works
    model = add_spatial_layers(tiny_vit(**RETROFIT_VIT), layer=DepthwiseNHWC)
    assert [type(m) for m in spatial_layers(model)] == [DepthwiseNHWC] * 2
    assert model(image()).shape == (2, 7)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_failing_layer_leaves_the_model_unchanged(family):
    """Layers are all built before any is inserted: a failure on a later block changes nothing."""
    model = BUILDERS[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    hooks = len(getattr(model, "patch_embed", nn.Identity())._forward_pre_hooks)
    calls = []

    def failing(dim: int) -> nn.Module:
        calls.append(dim)
        if len(calls) == 2:
            raise RuntimeError("layer construction failed")
        return ssm2d.SSM2D(dim)

    placement = "post-dwconv" if family == "convnext" else None
    with pytest.raises(RuntimeError, match="layer construction failed"):
        add_spatial_layers(model, layer=failing, placement=placement)
    assert [type(m) for m in model.modules()] == modules and spatial_layers(model) == []
    assert len(getattr(model, "patch_embed", nn.Identity())._forward_pre_hooks) == hooks
    assert model.state_dict().keys() == before.keys()
    add_spatial_layers(model, placement=placement)  # and a retry works
    assert len(spatial_layers(model)) > 1


def test_factory_returning_non_module_is_type_error():
    with pytest.raises(TypeError, match=r"layer\(dim\) to return an nn.Module, got function"):
        add_spatial_layers(tiny_vit(**RETROFIT_VIT), layer=lambda dim: lambda x: x)


def test_patch_dropout_is_refused():
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        add_spatial_layers(tiny_vit(**RETROFIT_VIT, patch_drop_rate=0.5))


def test_list_models_filters_with_shell_patterns():
    names = ssm2d.list_models("*_ssm2d")
    assert "vit_sd_32_ssm2d" in names and "convnext_sd_32_ssm2d" in names
    assert names and all(n.endswith("_ssm2d") for n in names), names
    assert names == sorted(names)
    assert "vit_sd_32_ssm2d_ffn" not in names and "vit_sd_32" not in names
    suffixes = ("", "_nope", "_ssm2d", "_ssm2d_nope", "_ssm2d_ffn", "_ssm2d_ffn_nope", "_s4nd", "_v2m", "_spsa", "_vim",
                "_dwconv", "_ss2d")  # fmt: skip
    assert set(ssm2d.list_models("vit_sd_32*")) == {"vit_sd_32" + s for s in suffixes}
    assert ssm2d.list_models("resnet*") == []
    assert ssm2d.list_models() == sorted(ssm2d.list_models("*"))
    with pytest.raises(TypeError, match="pattern"):
        ssm2d.list_models(3)


@pytest.mark.parametrize("kernel_size", [0, (2,), (3, 0), (2, 3, 4), 2.0, True, (-1, 2)], ids=repr)
def test_bad_kernel_size_is_value_error(kernel_size):
    with pytest.raises(ValueError, match=r"kernel_size: expected None, an integer >= 1 or a pair"):
        SSM2D(8, kernel_size=kernel_size)


@pytest.mark.parametrize("kwargs", [dict(skip=False), dict(out_norm=True)], ids=["skip=False", "out_norm=True"])
def test_reset_to_identity_needs_plain_skip(kwargs):
    layer = SSM2D(8, **kwargs)
    c_before = layer.c_raw.detach().clone()
    with pytest.raises(ValueError, match=r"reset_to_identity: expected skip=True and out_norm=False"):
        layer.reset_to_identity()
    assert torch.equal(layer.c_raw, c_before), "a refused reset must not touch the parameters"
