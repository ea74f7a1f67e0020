"""The GPU: every spatial layer against its CPU result, a bf16 autocast training step, torch.compile
on the device, and a training step without host sync. Skipped where CUDA is not available."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, param_grads

import ssm2d
from ssm2d import S4ND, SSM2D, V2M, SPAttention, VimMixer2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# float32 on two devices: different kernels (cuFFT, cuDNN, another summation order), so the
# relative Frobenius error, not an elementwise bound.
DEVICES_AGREE = dict(fro=1e-4)

LAYERS: dict[str, Callable[[], torch.nn.Module]] = {
    "ssm2d": lambda: SSM2D(16, state_dim=4),
    "ssm2d-truncated": lambda: SSM2D(16, state_dim=4, kernel_size=3),  # the direct path on a GPU
    "ssm2d-complex": lambda: SSM2D(16, state_dim=4, variant="complex", out_norm=True),
    "s4nd": lambda: S4ND(16, state_dim=8),
    "s4nd-truncated": lambda: S4ND(16, state_dim=8, kernel_size=2, channels=2, linear=False),
    "vim": lambda: VimMixer2d(16, state_dim=4),
    "v2m": lambda: V2M(16, state_dim=4),
    "spattention": lambda: SPAttention(16, num_heads=2),
}


@pytest.fixture(autouse=True)
def _exact_float32(monkeypatch):
    """No TF32: the comparisons with the CPU are of float32 arithmetic."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.parametrize("case", list(LAYERS))
def test_layer_forward_and_backward_match_the_cpu(case):
    layer = LAYERS[case]()
    gpu = copy.deepcopy(layer).to(CUDA)
    x = torch.randn(2, 9, 7, 16, requires_grad=True)
    upstream = torch.randn(2, 9, 7, 16)
    x_gpu = x.detach().to(CUDA).requires_grad_()
    expected = param_grads(layer, x, upstream)
    actual = param_grads(gpu, x_gpu, upstream.to(CUDA))
    assert_close(gpu(x_gpu).cpu(), layer(x), DEVICES_AGREE, f"{case} output")
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name].cpu(), expected[name], DEVICES_AGREE, f"{case} gradient of {name}")


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def small_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = ssm2d.create_model("vit_mini_28_ssm2d", num_classes=10).to(CUDA).train()
    x = torch.randn(8, 1, 28, 28, device=CUDA)
    y = torch.randint(0, 10, (8,), device=CUDA)
    return model, x, y


def test_bf16_autocast_training_step():
    model, x, y = small_model()
    optimizer = torch.optim.AdamW(ssm2d.param_groups(model, weight_decay=0.05), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = training_step(model, optimizer, x, y)
    assert torch.isfinite(loss), f"loss {loss.item()}"
    spatial = [m for m in model.modules() if isinstance(m, SSM2D)]
    assert spatial and all(torch.isfinite(p.grad).all() for m in spatial for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must not change parameter dtypes"
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the step changed nothing"


@pytest.mark.parametrize("case", ["ssm2d", "ssm2d-truncated", "s4nd"])
def test_compiled_layer_matches_eager_on_the_gpu(case):
    torch._dynamo.reset()
    layer = LAYERS[case]().to(CUDA).train()
    x = torch.randn(2, 9, 7, 16, device=CUDA, requires_grad=True)
    upstream = torch.randn(2, 9, 7, 16, device=CUDA)
    compiled = torch.compile(layer, fullgraph=True)
    expected = param_grads(layer, x, upstream)
    actual = param_grads(compiled, x, upstream)
    for name in expected:
        assert_close(actual[name], expected[name], DEVICES_AGREE, f"compiled {case}: gradient of {name}")
    torch._dynamo.reset()


def test_training_step_makes_no_host_sync():
    """After a first step (which moves the kernel's small binomial tables to the device once),
    a training step of a +2-D SSM model queues its work without waiting for the device."""
    model, x, y = small_model()
    optimizer = torch.optim.AdamW(ssm2d.param_groups(model, weight_decay=0.05), lr=1e-3)
    training_step(model, optimizer, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(model, optimizer, x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
