"""DWConv2d, the depthwise-convolution control: against a naive float64 sum, on odd and non-square grids."""

from __future__ import annotations

import pytest
import torch

from conftest import SIZES, assert_close, grads, size_id
from ssm2d.layers import DWConv2d


def _naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y[b, i, j, c] = bias[c] + sum_{p, q} w[c, p, q] x[b, i + p - r, j + q - r, c], zero outside."""
    _, h, w, _ = x.shape
    k = weight.shape[-1]
    r = k // 2
    y = bias.expand_as(x).clone()
    for p in range(k):
        for q in range(k):
            for i in range(h):
                for j in range(w):
                    ii, jj = i + p - r, j + q - r
                    if 0 <= ii < h and 0 <= jj < w:
                        y[:, i, j] = y[:, i, j] + weight[:, 0, p, q] * x[:, ii, jj]
    return y


@pytest.mark.parametrize("size", SIZES[:6], ids=size_id)
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_matches_naive_sum_forward_and_backward(size, kernel_size):
    layer = DWConv2d(5, kernel_size).double()
    x = torch.randn(2, *size, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.conv.weight.detach().clone().requires_grad_()
    bias = layer.conv.bias.detach().clone().requires_grad_()
    y = layer(x)
    expected = _naive(x, weight, bias)
    assert_close(y, expected, torch.float64, f"forward {size} k={kernel_size}")
    upstream = torch.randn_like(y)
    got = grads(y, [x, layer.conv.weight, layer.conv.bias], upstream)
    want = grads(expected, [x, weight, bias], upstream)
    for name, g, w in zip(("x", "weight", "bias"), got, want, strict=True):
        assert_close(g, w, torch.float64, f"d{name} {size} k={kernel_size}")


def test_identity_reset_and_float32():
    layer = DWConv2d(6)
    layer.reset_to_identity()
    x = torch.randn(3, 5, 9, 6)
    assert torch.equal(layer(x), x)


def test_input_checks_and_empty_batch():
    layer = DWConv2d(4)
    assert layer(torch.randn(0, 3, 5, 4)).shape == (0, 3, 5, 4)
    with pytest.raises(ValueError, match=r"H >= 1 and W >= 1"):
        layer(torch.randn(1, 0, 5, 4))
    with pytest.raises(ValueError, match=r"C=4"):
        layer(torch.randn(1, 3, 5, 3))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 3, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size: expected an odd integer"):
        DWConv2d(4, 6)
    with pytest.raises(ValueError, match="dim: expected an integer >= 1"):
        DWConv2d(0)
