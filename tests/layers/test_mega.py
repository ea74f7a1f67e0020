"""MegaEMA (fast vs reference path), Mega's laplace function and 2-D relative position bias,
MovingAverageGatedAttention against a written-out oracle for every slot, slot swapping and
identity initialisation, NormalizedFFN; any grid, argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import SIZES, assert_close, grads, size_id

import ssm2d
from ssm2d.layers import S4ND, SSM2D, MegaEMA, MovingAverageGatedAttention, NormalizedFFN
from ssm2d.layers.mega import SLOTS, laplace, relative_position_bias
from ssm2d.ops import ema

F64 = torch.float64
DIMS = dict(dim=6, zdim=4, hidden_dim=5, ndim=2)


# ---------------------------------------------------------------------------------------------
# MegaEMA


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("grid", SIZES, ids=size_id)
def test_ema_layer_fast_path_matches_ref_path(grid, bidirectional):
    layer = MegaEMA(5, ndim=3, bidirectional=bidirectional).to(F64)
    x = torch.randn(2, *grid, 5, dtype=F64, requires_grad=True)
    fast = layer(x)
    layer.fast_path = False
    ref = layer(x)
    assert fast.shape == x.shape
    assert_close(fast, ref, F64, "output")
    upstream = torch.randn_like(ref)
    inputs = [x, *layer.parameters()]
    layer.fast_path = True
    g_fast = grads(layer(x), inputs, upstream)
    layer.fast_path = False
    g_ref = grads(layer(x), inputs, upstream)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, g_fast, g_ref):
        assert_close(a, b, F64, f"d/d{name}")


def test_ema_layer_runs_along_the_row_major_sequence():
    layer = MegaEMA(4, ndim=3)
    x = torch.randn(2, 3, 5, 4)
    with torch.no_grad():
        alpha, delta, beta, eta = layer.coefficients()
        expected = ema(x.reshape(2, 15, 4), alpha, delta, beta, eta, layer.omega).reshape(2, 3, 5, 4)
        assert_close(layer(x), expected, torch.float32, "layer vs op on the flattened grid")
        assert_close(eta, layer.eta / math.sqrt(3), torch.float32, "eta scaled by 1/sqrt(h)")
    assert layer.alpha_raw.shape == (2, 4, 3) and layer.omega.shape == (4,)


def test_ema_layer_init_and_identity():
    layer = MegaEMA(64, ndim=16)
    signs = torch.tensor([1.0, -1.0] * 8)
    assert_close(layer.beta.mean((0, 1)), signs, dict(rtol=0, atol=0.02), "beta: +1, -1, ... plus N(0, 0.02)")
    assert 0.15 < layer.alpha_raw.std().item() < 0.25
    layer.reset_to_identity()
    x = torch.randn(2, 3, 4, 64)
    assert_close(layer(x), x, torch.float32, "identity")
    with pytest.raises(ValueError, match="reset_to_identity: expected skip=True"):
        MegaEMA(4, skip=False).reset_to_identity()


def test_ema_parameters_skip_weight_decay_after_a_copy():
    layer = copy.deepcopy(MegaEMA(4, ndim=2))
    groups = ssm2d.param_groups(layer, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 5


# ---------------------------------------------------------------------------------------------
# Laplace attention function and relative position bias


def test_laplace_is_the_normal_cdf_of_mega():
    x = torch.linspace(-2, 3, 101, dtype=F64)
    mu, sigma = torch.tensor(math.sqrt(0.5), dtype=F64), torch.tensor(math.sqrt(1 / (4 * math.pi)), dtype=F64)
    normal = torch.distributions.Normal(mu, sigma)
    assert_close(laplace(x), normal.cdf(x), F64, "laplace")
    assert laplace(torch.tensor(math.sqrt(0.5), dtype=F64)).item() == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize(
    ("table_grid", "grid"), [((3, 4), (3, 4)), ((3, 4), (2, 2)), ((2, 3), (5, 7)), ((1, 1), (2, 3))]
)
def test_relative_position_bias_by_loops(table_grid, grid):
    gh, gw = table_grid
    table = torch.randn(2 * gh - 1, 2 * gw - 1, dtype=F64)
    bias = relative_position_bias(table, grid)
    h, w = grid
    expected = torch.empty(h * w, h * w, dtype=F64)
    for i in range(h * w):
        for j in range(h * w):
            dh = max(-(gh - 1), min(gh - 1, i // w - j // w))
            dw = max(-(gw - 1), min(gw - 1, i % w - j % w))
            expected[i, j] = table[gh - 1 + dh, gw - 1 + dw]
    assert torch.equal(bias, expected)


# ---------------------------------------------------------------------------------------------
# MovingAverageGatedAttention against a written-out oracle


def randomize(module: nn.Module, skip_prefix: str = "moving_average.") -> None:
    """Every parameter outside the slot ~ N(0, 0.5^2): no zero bias or tiny gamma hides a term."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(skip_prefix):
                p.normal_(0.0, 0.5)


def oracle(block: MovingAverageGatedAttention, x: torch.Tensor) -> torch.Tensor:
    """Mega's gated attention written out from the block's parameters (docs/math.md §12).

    The slot's output comes from the slot layer's reference path (tested on its own); the rest
    is computed here token by token.
    """
    p = {n: t.detach() for n, t in block.named_parameters()}
    b, h, w, c = x.shape
    length, zd, e = h * w, block.zdim, block.hidden_dim
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    xn = (x - mean) / torch.sqrt(var + block.norm.eps) * p["norm.weight"] + p["norm.bias"]
    layer = block.slot_layer()
    if layer is None:
        xs = xn
    else:
        layer.fast_path = False
        with torch.no_grad():
            xs = layer(xn)
        layer.fast_path = True
    sigmoid = lambda t: 1 / (1 + torch.exp(-t))  # noqa: E731
    silu = lambda t: t * sigmoid(t)  # noqa: E731
    m = silu(xs).reshape(b, length, c)
    xt = xn.reshape(b, length, c)
    v = silu(xt @ p["v_proj.weight"].T + p["v_proj.bias"])
    proj = m @ p["mx_proj.weight"].T + p["mx_proj.bias"]
    u = sigmoid(proj[..., :c])
    z = silu(proj[..., c : c + zd])
    r = silu(proj[..., c + zd : c + zd + e])
    hx = proj[..., c + zd + e :]
    q = z * p["gamma"][0] + p["beta"][0]
    k = z * p["gamma"][1] + p["beta"][1]
    table = p.get("rel_pos")
    logits = torch.empty(b, length, length, dtype=x.dtype)
    for i in range(length):
        for j in range(length):
            dot = (q[:, i] * k[:, j]).sum(-1)
            logits[:, i, j] = dot / math.sqrt(zd) if block.attention == "softmax" else dot / length
            if table is not None:
                gh, gw = (table.shape[0] + 1) // 2, (table.shape[1] + 1) // 2
                dh = max(-(gh - 1), min(gh - 1, i // w - j // w))
                dw = max(-(gw - 1), min(gw - 1, i % w - j % w))
                logits[:, i, j] += table[gh - 1 + dh, gw - 1 + dw]
    if block.attention == "softmax":
        attn = torch.exp(logits - logits.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
    else:
        mu, sigma = math.sqrt(0.5), math.sqrt(1 / (4 * math.pi))
        attn = 0.5 * (1 + torch.erf((logits - mu) / (sigma * math.sqrt(2))))
    o = attn @ v
    hidden = silu(hx + (o * r) @ p["h_proj.weight"].T + p["h_proj.bias"])
    res = x.reshape(b, length, c)
    return (res + u * (hidden - res)).reshape(b, h, w, c)


@pytest.mark.parametrize("attention", ["laplace", "softmax"])
@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (5, 4)], ids=size_id)
def test_block_matches_oracle(grid, slot, attention):
    block = MovingAverageGatedAttention(**DIMS, slot=slot, attention=attention, rel_pos_size=(2, 3)).to(F64)
    randomize(block)
    x = torch.randn(2, *grid, 6, dtype=F64)
    with torch.no_grad():
        y = block(x)
    assert_close(y, oracle(block, x), F64, f"{slot}, {attention}")


def test_block_without_relative_position_bias_matches_oracle():
    block = MovingAverageGatedAttention(**DIMS, slot="ema", rel_pos_size=None).to(F64)
    randomize(block)
    assert block.rel_pos is None
    x = torch.randn(2, 3, 2, 6, dtype=F64)
    with torch.no_grad():
        assert_close(block(x), oracle(block, x), F64, "no bias")


@pytest.mark.parametrize("slot", ["ema", "ssm2d", "s4nd"])
def test_swapping_the_slot_changes_nothing_else(slot):
    """Same weights outside the slot and an identity slot give the slot-free block's output."""
    none = MovingAverageGatedAttention(**DIMS, slot="none").to(F64)
    randomize(none)
    block = MovingAverageGatedAttention(**DIMS, slot=slot, slot_init="identity").to(F64)
    result = block.load_state_dict(none.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("moving_average.spatial.") for k in result.missing_keys)
    assert set(none.state_dict()) == {k for k in block.state_dict() if not k.startswith("moving_average.")}
    layer = block.slot_layer()
    assert isinstance(layer, {"ema": MegaEMA, "ssm2d": SSM2D, "s4nd": S4ND}[slot])
    x = torch.randn(2, 5, 3, 6, dtype=F64)
    with torch.no_grad():
        assert_close(block(x), none(x), F64, f"identity {slot} slot vs no slot")
        layer.reset_parameters()
        assert not torch.allclose(block(x), none(x)), "a live slot changed nothing: the comparison proves nothing"


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("grid", [(1, 1), (1, 7), (6, 1), (5, 7), (16, 11)], ids=size_id)
def test_any_grid_forward_and_gradients(grid, slot):
    block = MovingAverageGatedAttention(8, zdim=4, hidden_dim=6, ndim=2, slot=slot, rel_pos_size=(4, 4))
    x = torch.randn(2, *grid, 8, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("moving_average.") and grid == (1, 1):
            continue  # on one cell the decays (EMA delta, SSM2D A) never act
        assert p.grad.abs().max() > 0, f"{name}: zero gradient"


def test_empty_batch_and_bad_input():
    block = MovingAverageGatedAttention(8, zdim=4, slot="ema")
    assert block(torch.randn(0, 3, 4, 8)).shape == (0, 3, 4, 8)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=8"):
        block(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="H >= 1 and W >= 1"):
        block(torch.randn(2, 0, 4, 8))
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(2, 3, 4, 8, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(slot="mamba"), r"slot: expected one of \('ema', 'ssm2d', 's4nd', 'none'\), got 'mamba'"),
        (dict(attention="relu2"), r"attention: expected 'laplace' or 'softmax', got 'relu2'"),
        (dict(dropout=1.0), r"dropout: expected a number in \[0, 1\), got 1.0"),
        (dict(slot_init="zeros"), r"slot_init: expected 'default' or 'identity', got 'zeros'"),
        (dict(zdim=0), r"zdim: expected an integer >= 1, got 0"),
        (dict(rel_pos_size=(3, 0)), r"rel_pos_size: expected an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovingAverageGatedAttention(8, **kwargs)


def test_dropouts_act_in_training_only():
    block = MovingAverageGatedAttention(8, zdim=4, slot="ema", dropout=0.3, attention_dropout=0.3, hidden_dropout=0.3)
    x = torch.randn(2, 3, 4, 8)
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))
    default = MovingAverageGatedAttention(8, zdim=4, slot="ema")
    assert all(m.p == 0 for m in default.modules() if isinstance(m, nn.Dropout))


def test_normalized_ffn_written_out():
    ffn = NormalizedFFN(6, 10).to(F64)
    randomize(ffn)
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    xn = nn.functional.layer_norm(x, (6,), ffn.norm.weight, ffn.norm.bias, ffn.norm.eps)
    hidden = xn @ ffn.fc1.weight.T + ffn.fc1.bias
    expected = x + (hidden * torch.sigmoid(hidden)) @ ffn.fc2.weight.T + ffn.fc2.bias
    with torch.no_grad():
        assert_close(ffn(x), expected.detach(), F64, "FFN")


def test_init_follows_mega():
    block = MovingAverageGatedAttention(192, zdim=64, hidden_dim=384, slot="none")
    assert block.v_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not block.mx_proj.bias.any() and not block.beta.any()
    assert block.gamma.std().item() == pytest.approx(0.02, rel=0.2)
    assert block.rel_pos.shape == (31, 31)
