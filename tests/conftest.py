"""Shared tolerances, comparison helper, seeding and small oracles for the ssm2d tests."""

from __future__ import annotations

import math
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ssm2d.ops import DIRECTION_FLIPS  # noqa: E402

# The one tolerance table. Keys are the dtype of the computation under test (the expected
# value is always a float64 / complex128 result); string keys name special criteria.
#   rtol, atol: elementwise |actual - expected| <= atol + rtol * |expected|
#   fro:        relative Frobenius error ||actual - expected|| / ||expected|| <= fro
TOL: dict[object, dict[str, float]] = {
    torch.float64: dict(rtol=1e-8, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(fro=1e-2),
    torch.bfloat16: dict(fro=5e-2),
    "golden": dict(fro=1e-5),  # docs/math.md §3: float64 vs the authors' float32 kernels
}

# Sizes used wherever a grid or kernel size is parametrized: odd, non-square, degenerate.
SIZES = [(1, 1), (1, 7), (6, 1), (5, 7), (9, 4), (13, 13), (16, 11)]


def size_id(value):
    """Test id "5x7" for an (H, W) tuple; pytest's default id for anything else."""
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return None


def rel_fro(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error (absolute when `expected` is all zeros)."""
    diff = torch.linalg.vector_norm(actual - expected).item()
    scale = torch.linalg.vector_norm(expected).item()
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype_or_tol, what: str) -> None:
    """Compare against `TOL[dtype_or_tol]` (or a tolerance dict) in float64.

    The message carries the max abs difference and the relative Frobenius error.
    """
    tol = TOL[dtype_or_tol] if not isinstance(dtype_or_tol, dict) else dtype_or_tol
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    wide = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    act = actual.detach().to("cpu", wide)
    exp = expected.detach().to("cpu", wide)
    diff = (act - exp).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    fro = rel_fro(act, exp)
    msg = f"{what}: max abs diff {max_abs:.3e}, rel Frobenius error {fro:.3e}, tol {tol}"
    assert torch.isfinite(act).all(), f"{what}: non-finite values; {msg}"
    if "fro" in tol:
        assert fro <= tol["fro"], msg
    if "rtol" in tol:
        ok = diff <= tol["atol"] + tol["rtol"] * exp.abs()
        assert bool(ok.all()), f"{msg}; {int((~ok).sum())} of {ok.numel()} elements out of tolerance"


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """A fixed, test-specific seed for the global RNG (layer init and test data)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_coefficients(kind: str, lead: tuple[int, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Random float64 / complex128 (a, b, c) of shapes (*lead, 4|2|2, n).

    kind: "signed" (a ~ U(-1, 1)), "sigmoid" (a, b in (0, 1) as the real layer) or
    "complex" (|a| ~ U(0.3, 0.95), any phase).
    """
    f64 = dict(dtype=torch.float64)
    if kind == "signed":
        a = torch.rand(*lead, 4, n, **f64) * 2 - 1
        b, c = torch.randn(*lead, 2, n, **f64), torch.randn(*lead, 2, n, **f64)
    elif kind == "sigmoid":
        a, b = torch.rand(*lead, 4, n, **f64), torch.rand(*lead, 2, n, **f64)
        c = torch.randn(*lead, 2, n, **f64) / math.sqrt(n)
    elif kind == "complex":
        radius = 0.3 + 0.65 * torch.rand(*lead, 4, n, **f64)
        a = torch.polar(radius, 2 * math.pi * torch.rand(*lead, 4, n, **f64))
        b = torch.randn(*lead, 2, n, dtype=torch.complex128)
        c = torch.randn(*lead, 2, n, dtype=torch.complex128)
    else:
        raise AssertionError(kind)
    return a, b, c


def grads(output: torch.Tensor, inputs, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d<output, upstream>/d inputs; zeros for inputs the output does not depend on."""
    return torch.autograd.grad(output, list(inputs), upstream, allow_unused=True, materialize_grads=True)


def param_grads(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of <layer(x), upstream> w.r.t. x (key "x") and every named parameter."""
    names, params = zip(*layer.named_parameters())
    return dict(zip(("x", *names), grads(layer(x), (x, *params), upstream)))


def tiny_vit(**overrides) -> torch.nn.Module:
    """A small timm ViT (32 x 32 input, patch 4: an 8 x 8 grid; width 24, 2 blocks, 3 heads,
    5 classes, a class and a register token, any input size); keyword arguments override."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=5, reg_tokens=1)
    return VisionTransformer(**{**args, "dynamic_img_size": True, **overrides})


def causal_conv_oracle(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Independent oracle of docs/math.md §6.1 with F.conv2d.

    x (B, H, W, C), kernels (d, C, kh, kw): for each direction flip the input per
    DIRECTION_FLIPS, zero-pad top/left, correlate with the flipped kernel (= causal
    convolution), flip back; sum over directions.
    """
    _, _, kh, kw = kernels.shape
    out = torch.zeros_like(x)
    for kernel, dims in zip(kernels, DIRECTION_FLIPS):
        xf = x.flip(dims) if dims else x
        z = F.pad(xf.permute(0, 3, 1, 2), (kw - 1, 0, kh - 1, 0))
        y = F.conv2d(z, kernel.flip(-2, -1)[:, None].to(x.dtype), groups=x.shape[-1]).permute(0, 2, 3, 1)
        out = out + (y.flip(dims) if dims else y)
    return out


def assert_mamba_scans_in_float32(monkeypatch, run, calls: int) -> None:
    """Run `run()` (a bfloat16 Mamba-based layer on the CPU) and check each of its `calls` inner
    ops: A, D, the dt bias (applied by `step_sizes`) and the step sizes stay float32, and the scan
    gets no second bias or softplus."""
    import ssm2d.layers.mamba as mamba_module

    seen, biases = [], []
    real_scan, real_steps = mamba_module.selective_scan, mamba_module.step_sizes
    monkeypatch.setattr(mamba_module, "selective_scan", lambda *a, **k: seen.append((a[1], a[2], k)) or real_scan(*a, **k))
    monkeypatch.setattr(mamba_module, "step_sizes", lambda *a: biases.append(a[2]) or real_steps(*a))
    run()
    assert len(seen) == len(biases) == calls
    for (delta, A, kwargs), bias in zip(seen, biases):
        assert A.dtype == kwargs["D"].dtype == bias.dtype == delta.dtype == torch.float32
        assert kwargs["delta_bias"] is None and not kwargs["delta_softplus"]
