"""The numba softplus (fast_softplus and the fused_softplus op) against F.softplus in float64:
values over the whole range, gradients, memory orders, and the double backward."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from ssm2d.ops.fast_exp import fast_softplus
from ssm2d.ops.fused_softplus import fused_softplus


@numba.njit
def _fast_softplus_array(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_softplus(x[i])


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float32, 3e-7), (np.float64, 1e-15)])
def test_fast_softplus_relative_error(dtype, rtol):
    """From e^-80 to past the threshold 20 (where x passes through, as F.softplus)."""
    x = np.concatenate([np.linspace(-80, 40, 120_001), np.random.default_rng(1).normal(0, 5, 10_000)]).astype(dtype)
    x = np.concatenate([x, np.array([0.0, 20.0, 20.5], dtype=dtype)])
    out = np.empty_like(x)
    _fast_softplus_array(x, out)
    expected = F.softplus(torch.from_numpy(x.astype(np.float64))).numpy()
    assert np.max(np.abs(out - expected) / expected) <= rtol
    assert out[-1] == x[-1], "above 20 softplus(x) = x"
    with pytest.raises(TypeError, match="numba-compiled code only"):
        fast_softplus(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_fused_softplus_matches_f_softplus(dtype, layout):
    """Forward and gradient against float64 F.softplus, on a (3, 37, 5) tensor that is contiguous,
    a transposed view (channels-last: read in place, output with the same strides) or a slice."""
    base = torch.randn(3, 5, 37, dtype=dtype) * 6
    x = {"contiguous": base.transpose(1, 2).contiguous(), "transposed": base.transpose(1, 2),
         "strided": torch.randn(3, 37, 10, dtype=dtype)[..., ::2] * 6}[layout]  # fmt: skip
    x.requires_grad_(True)
    out = fused_softplus(x)
    if layout == "transposed":
        assert out.stride() == x.stride()
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.softplus(x64)
    (gref,) = torch.autograd.grad(ref, x64, g.double())
    assert_close(out, ref, dtype, "softplus")
    assert_close(gx, gref, dtype, "d softplus / dx")


def test_fused_softplus_double_backward():
    """The backward is torch ops: a second derivative matches F.softplus's (sigmoid')."""
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fused_softplus(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    s = torch.sigmoid(x.detach())
    assert_close(gg, s * (1 - s), torch.float64, "second derivative")


def test_fused_softplus_empty():
    assert fused_softplus(torch.empty(0, 3)).shape == (0, 3)
