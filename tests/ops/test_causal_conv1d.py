"""causal_conv1d (one F.conv1d) against causal_conv1d_ref (tap by tap) and nn.Conv1d: docs/math.md §9."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_close, grads

from ssm2d.ops import causal_conv1d, causal_conv1d_ref

F64 = torch.float64


def random_inputs(length, width, bias=True, batch=2, d=5, dtype=torch.float32) -> list[torch.Tensor]:
    x, weight = torch.randn(batch, d, length), torch.randn(d, width)
    tensors = [x, weight] + ([torch.randn(d)] if bias else [])
    return [t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("length", "width"), [(1, 4), (3, 4), (7, 4), (33, 1), (6, 5)])
def test_fast_float32_matches_ref_float64(length, width, bias, activation):
    inputs = random_inputs(length, width, bias)
    wide = [t.detach().to(F64).requires_grad_() for t in inputs]
    fast = causal_conv1d(*inputs, activation=activation)
    ref = causal_conv1d_ref(*wide, activation=activation)
    assert fast.dtype == torch.float32 and fast.shape == inputs[0].shape
    assert_close(fast, ref, torch.float32, "output")
    upstream = torch.randn_like(ref)
    pairs = zip(("x", "weight", "bias"), grads(fast, inputs, upstream.float()), grads(ref, wide, upstream))
    for name, g_fast, g_ref in pairs:
        assert g_ref.abs().max().item() > 0, f"d/d{name} is zero"
        assert_close(g_fast, g_ref, torch.float32, f"d/d{name}")


@pytest.mark.parametrize(("length", "width"), [(1, 4), (9, 4), (4, 7)])
def test_ref_matches_padded_nn_conv1d(length, width):
    """The layout of Mamba's conv1d: nn.Conv1d(groups=D, padding=W - 1), first L outputs."""
    x, weight, bias = (t.detach().to(F64) for t in random_inputs(length, width))
    conv = nn.Conv1d(5, 5, width, groups=5, padding=width - 1).to(F64)
    with torch.no_grad():
        conv.weight.copy_(weight[:, None])
        conv.bias.copy_(bias)
        expected = F.silu(conv(x)[..., :length])
    assert_close(causal_conv1d_ref(x, weight, bias, "silu"), expected, F64, "ref vs nn.Conv1d")
    assert_close(causal_conv1d(x, weight, bias, "swish"), expected, F64, "fast vs nn.Conv1d")


def test_output_is_causal():
    x, weight, bias = (t.detach() for t in random_inputs(12, 4, d=3))
    changed = x.clone()
    changed[..., 7:] += 1.0
    for fn in (causal_conv1d, causal_conv1d_ref):
        y, y_changed = fn(x, weight, bias), fn(changed, weight, bias)
        assert torch.equal(y[..., :7], y_changed[..., :7]), f"{fn.__name__}: the past saw the future"
        assert not torch.equal(y[..., 7:], y_changed[..., 7:])


def test_bad_inputs_raise_clear_errors():
    x, weight, bias = (t.detach() for t in random_inputs(6, 4))
    cases = [
        ((x[0], weight), ValueError, "x: expected (B, D, L)"),
        ((x, weight[:3]), ValueError, "weight: expected (D, W) with D=5"),
        ((x, weight[:, None]), ValueError, "weight: expected (D, W)"),
        ((x, weight, bias[:2]), ValueError, "bias: expected (5,)"),
        ((x, weight, bias, "gelu"), ValueError, "activation: expected one of"),
        ((x.long(), weight), TypeError, "x: expected a floating-point torch.Tensor"),
    ]
    for fn in (causal_conv1d, causal_conv1d_ref):
        for args, error, message in cases:
            with pytest.raises(error) as info:
                fn(*args)
            assert message in str(info.value), f"{fn.__name__}: {info.value}"


def test_other_dtypes_take_the_conv1d_path():
    """bfloat16 (not a fused-kernel dtype) runs one F.conv1d; it still matches the ref."""
    x, weight, bias = (t.detach() for t in random_inputs(9, 4))
    fast = causal_conv1d(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "silu")
    assert fast.dtype == torch.bfloat16
    assert_close(fast, causal_conv1d_ref(x.double(), weight.double(), bias.double(), "silu"), torch.bfloat16, "bf16")


def test_double_backward_raises_a_clear_error():
    x, weight, bias = random_inputs(6, 4)
    (gx,) = torch.autograd.grad(causal_conv1d(x, weight, bias, "silu").square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"causal_conv1d \(fused CPU kernel\): double backward.*fast_path = False"):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------
# reverse: the anti-causal convolution of a bidirectional mixer's backward direction


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(("length", "width", "bias"), [(1, 4, True), (7, 4, True), (70, 4, False), (6, 5, True)])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_reverse_fast_matches_ref_float64(dtype, length, width, bias, activation):
    """The fused kernel in reverse (70 steps: two backward blocks of 64) against the ref."""
    inputs = random_inputs(length, width, bias, d=7, dtype=dtype)
    wide = [t.detach().to(F64).requires_grad_() for t in inputs]
    fast = causal_conv1d(*inputs, activation=activation, reverse=True)
    ref = causal_conv1d_ref(*wide, activation=activation, reverse=True)
    assert fast.dtype == dtype and ref.abs().max() > 1e-2
    assert_close(fast, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    pairs = zip(("x", "weight", "bias"), grads(fast, inputs, upstream.to(dtype)), grads(ref, wide, upstream))
    for name, g_fast, g_ref in pairs:
        assert g_ref.abs().max().item() > 0, f"d/d{name} is zero"
        assert_close(g_fast, g_ref, dtype, f"d/d{name}")


@pytest.mark.parametrize("fn", [causal_conv1d, causal_conv1d_ref], ids=["fast", "ref"])
def test_reverse_is_the_causal_convolution_of_the_flipped_sequence(fn):
    x, weight, bias = (t.detach().to(F64) for t in random_inputs(11, 4))
    expected = causal_conv1d_ref(x.flip(-1), weight, bias, "silu").flip(-1)
    assert_close(fn(x, weight, bias, "silu", reverse=True), expected, F64, f"{fn.__name__} reverse")
    changed = x.clone()
    changed[..., :4] += 1.0  # the reverse convolution reads the future only: steps >= 4 see no change
    assert torch.equal(fn(changed, weight, bias, reverse=True)[..., 4:], fn(x, weight, bias, reverse=True)[..., 4:])


def test_reverse_on_the_conv1d_path():
    """bfloat16 runs F.conv1d, right-padded with the taps flipped."""
    x, weight, bias = (t.detach() for t in random_inputs(9, 4))
    fast = causal_conv1d(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "silu", reverse=True)
    expected = causal_conv1d_ref(x.double(), weight.double(), bias.double(), "silu", reverse=True)
    assert_close(fast, expected, torch.bfloat16, "bf16 reverse")
