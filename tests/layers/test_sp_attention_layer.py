"""SPAttention, SpatialPrior and SPAttentionOnTokens: fast vs ref, init, cache, retrofit, errors."""

from __future__ import annotations

import copy
import importlib
from functools import partial

import pytest
import torch
from conftest import assert_close, param_grads, size_id, tiny_vit
from timm.layers import Attention

import ssm2d
from ssm2d.layers import GridSize, SPAttention, SPAttentionOnTokens, SpatialPrior
from ssm2d.models import add_spatial_layers, spatial_layers
from ssm2d.ops import spatial_prior

LAYER_MODULE = importlib.import_module("ssm2d.layers.sp_attention")
F64 = torch.float64
GRIDS = [(5, 7), (9, 4), (3, 3), (1, 6), (4, 1)]


def make_layer(dim=12, num_heads=3, dtype=F64, perturb=True, **kwargs) -> SPAttention:
    """An SPAttention; with `perturb`, the prior's w2, b2 are random, so SP varies with the offset."""
    layer = SPAttention(dim, num_heads, **kwargs).to(dtype)
    if perturb:
        with torch.no_grad():
            layer.prior.w2.normal_(0.0, 0.5)
            layer.prior.b2.uniform_(0.5, 1.5)
            layer.prior.fc1.weight.normal_(0.0, 0.5)
            layer.prior.fc1.bias.normal_(0.0, 0.5)
            layer.proj.bias.normal_(0.0, 0.5)
            for linear in (layer.qk, layer.v):  # logits of order 1 (trunc_normal(.02) makes them tiny)
                linear.weight.normal_(0.0, 0.5)
    return layer


@pytest.fixture
def prior_calls(monkeypatch) -> list:
    """Grid of every fast spatial_prior call made by the layer."""
    calls = []

    def counting(w1, b1, w2, b2, grid):
        calls.append(tuple(grid))
        return spatial_prior(w1, b1, w2, b2, grid)

    monkeypatch.setattr(LAYER_MODULE, "spatial_prior", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# Fast against ref


@pytest.mark.parametrize("grid", GRIDS, ids=size_id)
def test_fast_float32_matches_ref_path_float64(grid):
    ref = make_layer()
    ref.fast_path = False
    fast = copy.deepcopy(ref).float()
    fast.fast_path = True
    x = torch.randn(2, *grid, 12, dtype=F64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    y_ref, y_fast = ref(x), fast(x32)
    assert y_fast.shape == x.shape and y_fast.dtype == torch.float32
    assert_close(y_fast, y_ref, torch.float32, f"layer {grid}")
    upstream = torch.randn_like(y_ref)
    expected, actual = param_grads(ref, x, upstream), param_grads(fast, x32, upstream.float())
    assert expected.keys() == actual.keys() and "prior.fc1.weight" in expected
    for name in expected:
        if name != "prior.fc1.weight" or grid[0] * grid[1] > 1:  # one token: only the offset r = 0
            assert expected[name].abs().max() > 0, f"grad {name} is zero: the comparison proves nothing"
        assert_close(actual[name], expected[name], torch.float32, f"grad {name} {grid}")


def test_fast_path_flag_switches_to_the_ref_ops(monkeypatch):
    calls = []
    for name in ("spatial_prior_ref", "sp_attention_ref"):
        original = getattr(LAYER_MODULE, name)
        monkeypatch.setattr(LAYER_MODULE, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    layer = make_layer()
    x = torch.randn(1, 3, 4, 12, dtype=F64)
    y_fast = layer(x)
    assert calls == []
    layer.fast_path = False
    assert_close(layer(x), y_fast, F64, "ref path vs fast path")
    assert calls == ["spatial_prior_ref", "sp_attention_ref"]
    assert "fast_path=False" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Initialization: plain attention


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("grid", [(5, 7), (4, 1)], ids=size_id)
def test_init_equals_timm_attention(grid, fused):
    layer = SPAttention(12, 3).double()
    assert torch.equal(layer.prior(grid), torch.ones(3, grid[0] * grid[1], grid[0] * grid[1], dtype=F64))
    timm_attn = Attention(12, num_heads=3, qkv_bias=False).double()
    timm_attn.fused_attn = fused
    with torch.no_grad():
        timm_attn.qkv.weight.copy_(torch.cat([layer.qk.weight, layer.v.weight]))  # q, k, v rows
        timm_attn.proj.load_state_dict(layer.proj.state_dict())
        for linear in (layer.qk, layer.v):  # order-1 logits, so that the comparison is sharp
            linear.weight.mul_(25.0)
        timm_attn.qkv.weight.mul_(25.0)
    x = torch.randn(2, *grid, 12, dtype=F64)
    expected = timm_attn(x.flatten(1, 2)).unflatten(1, grid)
    assert_close(layer(x), expected, F64, "SP-SA at init vs timm Attention")


def test_init_follows_spec():
    layer = SPAttention(24, 4)
    assert layer.head_dim == 6 and layer.prior.hidden == 6  # W1: Linear(2 -> D), grouped h x d
    assert layer.qk.bias is None and layer.v.bias is None and not layer.proj.bias.any()
    assert not layer.prior.w2.any() and torch.equal(layer.prior.b2, torch.ones(4))
    assert not layer.prior.fc1.bias.any()
    # trunc_normal(.02) as timm's: truncated at +-2 absolute, so a plain N(0, .02) in practice.
    for weight in (layer.prior.fc1.weight, layer.qk.weight, layer.v.weight, layer.proj.weight):
        assert 0.012 < weight.std().item() < 0.03 and abs(weight.mean().item()) < 0.01


def test_prior_first_layer_gets_gradient_only_once_w2_moves():
    """w2 = 0 at init (docs/math.md §11) gives W1, b1 exactly zero gradient until w2 moves."""
    layer = SPAttention(12, 3).double()
    x = torch.randn(2, 4, 5, 12, dtype=F64)
    layer(x).square().sum().backward()
    assert not layer.prior.fc1.weight.grad.any() and not layer.prior.fc1.bias.grad.any()
    assert layer.prior.w2.grad.abs().max() > 0 and layer.prior.b2.grad.abs().max() > 0
    with torch.no_grad():
        layer.prior.w2.add_(layer.prior.w2.grad, alpha=-1.0)  # one SGD step
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert layer.prior.fc1.weight.grad.abs().max() > 0 and layer.prior.fc1.bias.grad.abs().max() > 0


def test_prior_breaks_permutation_equivariance():
    """Plain attention commutes with any reordering of the tokens; the spatial prior does not."""
    layer = SPAttention(12, 3).double()
    x = torch.randn(2, 4, 5, 12, dtype=F64)
    perm = torch.randperm(20)
    shuffle = lambda t: t.flatten(1, 2)[:, perm].unflatten(1, (4, 5))  # noqa: E731
    assert_close(layer(shuffle(x)), shuffle(layer(x)), F64, "init: equivariant")
    layer = make_layer()
    assert (layer(shuffle(x)) - shuffle(layer(x))).abs().max() > 1e-3


def test_default_heads_and_params():
    assert [SPAttention(d).num_heads for d in (64, 192, 384, 96, 7)] == [1, 3, 6, 1, 1]
    layer = SPAttention(8, 2)
    groups = ssm2d.param_groups(layer, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in layer.named_parameters() if id(p) in decayed}
    # timm's rule: 1-D parameters (w2 is stored as a D-vector, docs/math.md §11), biases and norms do not decay.
    assert names == {"qk.weight", "v.weight", "proj.weight", "prior.fc1.weight"}


# ---------------------------------------------------------------------------------------------
# Cache


def test_prior_cached_per_grid_in_eval(prior_calls):
    layer = make_layer().eval()
    x, x2 = torch.randn(1, 3, 5, 12, dtype=F64), torch.randn(1, 5, 3, 12, dtype=F64)
    with torch.no_grad():
        y1 = layer(x)
        assert layer(x).equal(y1) and prior_calls == [(3, 5)]  # the second call reads the cache
        y2 = layer(x2)  # a new grid, same token count: recomputed
        assert prior_calls == [(3, 5), (5, 3)]
        assert layer.prior._cache.key[0] == (5, 3)
        fresh = copy.deepcopy(layer).train().eval()
        assert fresh.prior._cache.key is None
        assert torch.equal(fresh(x2), y2) and len(prior_calls) == 3
        layer.prior.w2.add_(0.1)  # a parameter update invalidates the cache
        y3 = layer(x2)
        assert len(prior_calls) == 4 and (y3 - y2).abs().max() > 1e-6
    layer.train()
    assert layer.prior._cache.key is None
    layer(x)  # training: never cached
    assert layer.prior._cache.key is None


def test_prior_not_cached_when_gradients_are_needed(prior_calls):
    layer = make_layer().eval()
    x = torch.randn(1, 3, 5, 12, dtype=F64)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert prior_calls == [(3, 5), (3, 5)] and layer.prior._cache.key is None
    assert layer.prior.w2.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# In a timm ViT: pre-attention retrofit, identity, and the token adapter


def test_retrofit_pre_attention():
    model = tiny_vit(img_size=(16, 24)).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        y0 = model(x)
        add_spatial_layers(model, layer=partial(SPAttention, num_heads=3)).eval()
        layers = spatial_layers(model)
        assert len(layers) == 2 and all(isinstance(m, SPAttention) for m in layers)
        y1 = model(x)
        assert y1.shape == y0.shape and (y1 - y0).abs().max() > 1e-4
        assert model(torch.randn(2, 3, 20, 12)).shape == (2, 5)  # a 5 x 3 grid
        assert layers[0].prior._cache.key[0] == (5, 3)


def test_retrofit_identity():
    model = tiny_vit(img_size=(16, 24)).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        y0 = model(x)
        with pytest.raises(ValueError, match="reset_to_identity: expected skip=True"):
            add_spatial_layers(model, layer=SPAttention, init="identity")
        assert not spatial_layers(model)  # a failing layer leaves the model as it was
        add_spatial_layers(model, layer=partial(SPAttention, skip=True), init="identity")
        assert torch.equal(model(x), y0)
    model.train()
    model(x).square().mean().backward()
    proj = spatial_layers(model)[0].proj
    assert proj.weight.grad.abs().max() > 0, "the identity layer must be able to move away from zero"


def test_identity_is_exact():
    layer = make_layer(skip=True)
    x = torch.randn(2, 5, 7, 12, dtype=F64)
    assert (layer(x) - x).abs().max() > 1e-3
    layer.reset_to_identity()
    assert torch.equal(layer(x), x)


def test_on_tokens_excludes_prefix_tokens():
    mixer = make_layer()
    grid = GridSize()
    grid.size = (3, 4)
    attn = SPAttentionOnTokens(mixer, grid, num_prefix_tokens=2)
    x = torch.randn(2, 2 + 12, 12, dtype=F64)
    y = attn(x)
    assert torch.equal(y[:, :2], torch.zeros(2, 2, 12, dtype=F64))
    assert_close(y[:, 2:], mixer(x[:, 2:].unflatten(1, (3, 4))).flatten(1, 2), F64, "patches")
    x2 = x.clone()
    x2[:, :2] = torch.randn(2, 2, 12, dtype=F64)
    assert torch.equal(attn(x2), y), "patch tokens must not see the prefix tokens"
    with pytest.raises(ValueError, match="attn_mask, is_causal"):
        attn(x, attn_mask=torch.zeros(14, 14))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        attn(x[:, :13])
    with pytest.raises(ValueError, match="mixer: expected an SPAttention with skip=False"):
        SPAttentionOnTokens(make_layer(skip=True), grid, 1)
    with pytest.raises(RuntimeError, match="no patch grid recorded"):
        SPAttentionOnTokens(mixer, GridSize(), 1)(x)


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim: expected an integer >= 1"):
        SPAttention(0)
    with pytest.raises(ValueError, match="num_heads: expected an integer >= 1 that divides dim=12, got 5"):
        SPAttention(12, 5)
    with pytest.raises(TypeError):
        SPAttention(12, 3, n_heads=3)
    with pytest.raises(ValueError, match="hidden: expected an integer >= 1"):
        SpatialPrior(2, 0)
    layer = SPAttention(12, 3)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=12, got \(2, 3, 4, 8\)"):
        layer(torch.randn(2, 3, 4, 8))
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 12, 12))
