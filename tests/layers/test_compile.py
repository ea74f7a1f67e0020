"""torch.compile of SSM2D and S4ND: no graph break in training mode, fullgraph forward and
backward equal to eager mode; and a registered +2-D SSM model compiles."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import ssm2d
from ssm2d import S4ND, SSM2D

# (layer factory, conv_method): small layers, both convolution paths.
LAYERS = {
    "ssm2d-fft": (lambda: SSM2D(6, state_dim=3), "fft"),
    "ssm2d-direct": (lambda: SSM2D(6, state_dim=3, kernel_size=3), "direct"),
    "ssm2d-complex": (lambda: SSM2D(6, state_dim=3, variant="complex", directions=2, out_norm=True), "auto"),
    "s4nd-fft": (lambda: S4ND(6, state_dim=4), "fft"),
    "s4nd-direct": (lambda: S4ND(6, state_dim=4, channels=2, linear=False), "direct"),
}


def make(case: str) -> torch.nn.Module:
    factory, method = LAYERS[case]
    layer = factory()
    layer.conv_method = method
    return layer


def eager_and_compiled(layer: torch.nn.Module, backend: str, x: torch.Tensor) -> None:
    """Compare outputs and gradients (input and every parameter) of eager and compiled calls."""
    upstream = torch.randn(x.shape)
    params = list(layer.parameters())
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        y = fn(x)
        results.append((y, torch.autograd.grad(y, [x, *params], upstream)))
    (y, g), (y_c, g_c) = results
    assert_close(y_c, y, torch.float32, "compiled output")
    for i, (a, b) in enumerate(zip(g_c, g, strict=True)):
        assert_close(a, b, torch.float32, f"compiled gradient {i}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", ["ssm2d-fft", "ssm2d-direct", "s4nd-direct"])
def test_explain_finds_no_graph_break_in_training(case):
    layer = make(case).train()
    x = torch.randn(2, 5, 7, 6, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("case", ["ssm2d-direct", "ssm2d-complex", "s4nd-fft"])
def test_fullgraph_compile_matches_eager(case):
    """Dynamo and AOTAutograd (forward and backward graphs), without code generation."""
    eager_and_compiled(make(case).train(), "aot_eager", torch.randn(2, 5, 7, 6, requires_grad=True))


@pytest.mark.slow
# S4ND's kernel is complex: Inductor leaves those ops to eager, and says so once
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex operators")
def test_inductor_compile_matches_eager():
    """The default backend, which generates and compiles C++ on a CPU: about 30 s for S4ND on a
    loaded 2-core machine. (SSM2D's graphs, the closed-form kernel's many small ops, took
    22 minutes there: too long for the suite; `aot_eager` above checks the same graphs.)"""
    eager_and_compiled(make("s4nd-direct").train(), "inductor", torch.randn(2, 5, 7, 6, requires_grad=True))


def test_registered_model_compiles():
    """A +2-D SSM model (train mode, no dropout or drop-path by default): output and the first
    2-D SSM layer's gradient equal eager mode's."""
    model = ssm2d.create_model("vit_mini_28_ssm2d", num_classes=10).train()
    layer = next(m for m in model.modules() if isinstance(m, SSM2D))
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(model, backend="aot_eager")
    (y, y_c) = (model(x), compiled(x))
    assert_close(y_c, y, torch.float32, "compiled model output")
    (g,), (g_c,) = (torch.autograd.grad(out.square().sum(), [layer.c_raw]) for out in (y, y_c))
    assert_close(g_c, g, torch.float32, "compiled model gradient")
