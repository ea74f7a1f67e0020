"""Every spatial layer checks its input the same way (`ssm2d.layers.checks.check_grid_input`):
a real floating-point (B, H, W, C) tensor; batch 0 gives an empty output; H or W = 0 and integer
or complex input are refused with one message naming what came.

To cover another layer, add a factory `(dim) -> module` to LAYERS.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

from ssm2d import SS2D, S4ND, SSM2D, V2M, MegaEMA, MovingAverageGatedAttention, SPAttention, VimMixer2d
from ssm2d.layers import DWConv2d

DIM = 8
LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "ssm2d": lambda dim: SSM2D(dim, state_dim=4),
    "ssm2d_complex": lambda dim: SSM2D(dim, state_dim=4, variant="complex"),
    "s4nd": lambda dim: S4ND(dim, state_dim=4),
    "sp_attention": lambda dim: SPAttention(dim, num_heads=2),
    "vim": lambda dim: VimMixer2d(dim, state_dim=4),
    "v2m": lambda dim: V2M(dim, state_dim=4),
    "ss2d": lambda dim: SS2D(dim, state_dim=2),
    "mega_ema": lambda dim: MegaEMA(dim),
    "mega": lambda dim: MovingAverageGatedAttention(dim, slot="ssm2d"),
    "dwconv": lambda dim: DWConv2d(dim),
}


@pytest.fixture(params=list(LAYERS), ids=list(LAYERS))
def layer(request) -> nn.Module:
    return LAYERS[request.param](DIM)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_input_is_a_type_error_naming_the_dtype(layer, fast_path, dtype):
    layer.fast_path = fast_path
    x = torch.randint(-3, 4, (1, 3, 5, DIM)).to(dtype)
    with pytest.raises(TypeError, match=f"x: expected a floating-point tensor, got dtype {dtype}"):
        layer(x)


@pytest.mark.parametrize(
    ("name", "fast_path"),
    [
        pytest.param(name, fast, id=f"{name}-{'fast' if fast else 'ref'}")
        for name in LAYERS
        for fast in (True, False)
    ],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_zero_gives_an_empty_output(name, fast_path, dtype):
    layer = LAYERS[name](DIM).to(dtype)
    layer.fast_path = fast_path
    y = layer(torch.randn(0, 3, 5, DIM, dtype=dtype))
    assert y.shape == (0, 3, 5, DIM) and y.dtype == dtype
    # The layer still works on a real batch afterwards (nothing empty cached).
    assert layer(torch.randn(2, 3, 5, DIM, dtype=dtype)).shape == (2, 3, 5, DIM)


@pytest.mark.parametrize(
    ("name", "fast_path", "method"),
    [
        ("ssm2d", True, "fft"),
        ("ssm2d", True, "direct"),
        ("ssm2d", False, "auto"),
        ("s4nd", True, "fft"),
        ("s4nd", True, "direct"),
        ("s4nd", False, "auto"),
        ("sp_attention", True, None),
        ("sp_attention", False, None),
        *[(name, fast, None) for name in ("vim", "v2m", "ss2d", "mega_ema", "mega") for fast in (True, False)],
        ("dwconv", True, None),
    ],
)
def test_batch_zero_backward(name, fast_path, method):
    layer = LAYERS[name](DIM)
    layer.fast_path = fast_path
    if method is not None:
        layer.conv_method = method
    x = torch.randn(0, 9, 7, DIM, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize(("height", "width"), [(0, 5), (3, 0), (0, 0)])
def test_an_empty_grid_gets_the_same_message_in_every_layer(layer, height, width):
    x = torch.randn(2, height, width, DIM)
    message = f"x: expected a grid with H >= 1 and W >= 1, got H={height}, W={width}"
    with pytest.raises(ValueError, match=message):
        layer(x)


@pytest.mark.parametrize("shape", [(3, 5, DIM), (2, 3, 5, DIM + 1), (1, 2, 3, 5, DIM)], ids=str)
def test_a_wrong_shape_gets_the_same_message_in_every_layer(layer, shape):
    message = f"x: expected shape (B, H, W, C) with C={DIM}, got {tuple(shape)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(*shape))
