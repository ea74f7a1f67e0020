"""step_sizes (the fused numba dt_proj + bias + softplus) against step_sizes_ref in float64, on
outputs and every gradient; its dispatch, input checks and the clear error on double backward."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, grads

from ssm2d.ops import step_sizes, step_sizes_ref

F64 = torch.float64
module = importlib.import_module("ssm2d.ops.step_sizes")


def random_inputs(lead, rank, width, dtype=torch.float32) -> list[torch.Tensor]:
    """x (*lead, R), weight (E, R), bias (E,): pre-activations spread over softplus' curve."""
    x, weight, bias = torch.randn(*lead, rank), torch.randn(width, rank), torch.randn(width) * 2
    return [t.to(dtype).requires_grad_() for t in (x, weight, bias)]


@pytest.mark.parametrize(("lead", "rank", "width"), [((1,), 1, 1), ((3, 5), 4, 7), ((2, 301), 4, 128), ((700,), 3, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_fast_matches_ref_float64(dtype, lead, rank, width):
    """Row counts below, at and over the backward's 256-row blocks (602, 700), odd widths."""
    inputs = random_inputs(lead, rank, width, dtype)
    wide = [t.detach().to(F64).requires_grad_() for t in inputs]
    fast, ref = step_sizes(*inputs), step_sizes_ref(*wide)
    assert fast.dtype == dtype and fast.shape == (*lead, width)
    assert_close(fast, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip(("x", "weight", "bias"), grads(fast, inputs, upstream.to(dtype)), grads(ref, wide, upstream)):
        assert g_ref.abs().max() > 0, f"d/d{name} is zero"
        assert_close(g_fast, g_ref, dtype, f"d/d{name}")


def test_ref_is_softplus_of_dt_proj():
    x, weight, bias = (t.detach().to(F64) for t in random_inputs((4, 6), 2, 5))
    proj = torch.nn.Linear(2, 5).to(F64)
    with torch.no_grad():
        proj.weight.copy_(weight)
        proj.bias.copy_(bias)
        assert_close(step_sizes_ref(x, weight, bias), F.softplus(proj(x)), F64, "ref")
        assert (step_sizes_ref(x, weight, bias) > 0).all()


def test_strided_x_as_a_slice_of_x_proj():
    """x is the first R columns of x_proj's output in Mamba: a strided view."""
    proj = torch.randn(2, 9, 4 + 2 * 3, requires_grad=True)
    _, weight, bias = random_inputs((1,), 4, 16)
    x = proj[..., :4]
    fast = step_sizes(x, weight, bias)
    ref = step_sizes_ref(x.detach().double(), weight.detach().double(), bias.detach().double())
    assert_close(fast, ref, torch.float32, "strided x")
    (g,) = torch.autograd.grad(fast.sum(), proj)
    assert g[..., 4:].abs().max() == 0 and g[..., :4].abs().max() > 0


def test_dispatch(monkeypatch):
    """CPU float32/float64 of one dtype take the fused kernel; mixed dtypes and bfloat16 the torch ops."""
    calls = []
    real = module.fused_step_sizes
    monkeypatch.setattr(module, "fused_step_sizes", lambda *a: calls.append(1) or real(*a))
    x, weight, bias = (t.detach() for t in random_inputs((3,), 2, 4))
    step_sizes(x, weight, bias)
    assert calls == [1]
    out = step_sizes(x, weight, bias.double())
    assert calls == [1] and out.dtype == F64
    out = step_sizes(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert calls == [1] and out.dtype == torch.bfloat16


def test_bad_inputs_raise_clear_errors():
    x, weight, bias = (t.detach() for t in random_inputs((3,), 2, 4))
    cases = [
        ((x, weight[:, :1], bias), ValueError, "weight: expected (E, R) with R=2"),
        ((x, weight, bias[:3]), ValueError, "bias: expected (4,)"),
        ((x.long(), weight, bias), TypeError, "x: expected a floating-point torch.Tensor"),
    ]
    for fn in (step_sizes, step_sizes_ref):
        for args, error, message in cases:
            with pytest.raises(error) as info:
                fn(*args)
            assert message in str(info.value), f"{fn.__name__}: {info.value}"


def test_double_backward_raises_a_clear_error():
    x, weight, bias = random_inputs((5,), 2, 3)
    (gx,) = torch.autograd.grad(step_sizes(x, weight, bias).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"step_sizes \(fused CPU kernel\): double backward"):
        gx.sum().backward()
