"""Second derivatives of the fast paths of SSM2D, S4ND and SPAttention: gradgradcheck, and a
gradient penalty's gradient against the reference path (float64, tiny inputs)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch.func import functional_call

from ssm2d import S4ND, SSM2D, SPAttention

F64 = torch.float64

# (layer factory, conv_method or None): as small as still exercises every part (gradgradcheck's
# cost grows with the square of the number of input and parameter entries).
LAYERS = {
    "ssm2d-fft": (lambda: SSM2D(2, state_dim=1, n_ssm=1), "fft"),
    "ssm2d-direct": (lambda: SSM2D(2, state_dim=1, n_ssm=1), "direct"),
    "ssm2d-complex": (lambda: SSM2D(2, state_dim=1, n_ssm=1, variant="complex"), "auto"),
    "s4nd-fft": (lambda: S4ND(2, state_dim=2), "fft"),
    "s4nd-direct": (lambda: S4ND(2, state_dim=2), "direct"),
    "spattention": (lambda: SPAttention(2, num_heads=2), None),
}


def make(case: str, fast_path: bool = True) -> torch.nn.Module:
    factory, method = LAYERS[case]
    layer = factory().to(F64)
    layer.fast_path = fast_path
    if method is not None:
        layer.conv_method = method
    return layer


def as_function(layer: torch.nn.Module):
    names = [n for n, _ in layer.named_parameters()]
    return lambda x, *params: functional_call(layer, dict(zip(names, params)), (x,))


@pytest.mark.parametrize("case", list(LAYERS))
def test_fast_path_passes_gradgradcheck(case):
    layer = make(case)
    x = torch.randn(1, 3, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(as_function(layer), (x, *layer.parameters()))


def penalty_gradients(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of a gradient penalty ||d sum(layer(x)^2) / dx||^2 w.r.t. x and the parameters."""
    params = list(layer.parameters())
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), [x, *params])


@pytest.mark.parametrize("case", list(LAYERS))
def test_gradient_penalty_matches_reference_path(case):
    layer = make(case)
    ref = make(case, fast_path=False)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 3, 2, dtype=F64, requires_grad=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, g_ref in zip(names, penalty_gradients(layer, x), penalty_gradients(ref, x), strict=True):
        assert_close(g, g_ref, F64, f"{case}: penalty gradient of {name}")
