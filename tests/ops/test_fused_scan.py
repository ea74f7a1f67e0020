"""The fused CPU selective scan (numba) against selective_scan_ref on outputs and every gradient,
its last state against a written-out recurrence, its dispatch, fast_exp, and the clear error on
double backward."""

from __future__ import annotations

import importlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from conftest import assert_close, grads
from test_selective_scan import LAYOUTS, NAMES, check_against_ref, random_inputs, widen

from ssm2d.ops import selective_scan
from ssm2d.ops.fast_exp import fast_exp
from ssm2d.ops.fused_scan import CHECKPOINT_STEPS, MAX_LANES, lanes

scan_module = importlib.import_module("ssm2d.ops.selective_scan")
F64 = torch.float64
T = CHECKPOINT_STEPS


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw"])
@pytest.mark.parametrize("length", [1, 2, 7, T - 1, T, T + 1, 3 * T + 5])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_fused_matches_ref_float64(dtype, length, softplus, layout):
    """Lengths around the checkpoint chunk, and over several chunks (3 T + 5)."""
    inputs = random_inputs(length, softplus, LAYOUTS[layout], d=6, dtype=dtype)
    check_against_ref(inputs, softplus, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("present", [(), ("D",), ("z",), ("delta_bias",), ("D", "z")], ids="_".join)
def test_fused_optional_arguments(dtype, present):
    """Each optional argument alone or with another, the others None."""
    u, delta, A, B, C, D, z, bias = random_inputs(2 * T + 3, False, (2, 2), d=4, dtype=dtype)
    kwargs = {k: (v if k in present else None) for k, v in dict(D=D, z=z, delta_bias=bias).items()}
    fast = selective_scan(u, delta, A, B, C, **kwargs)
    args = [u, delta, A, B, C, *(t for t in kwargs.values() if t is not None)]
    wide = widen(args)
    wide_kwargs = dict(zip([k for k, v in kwargs.items() if v is not None], wide[5:]))
    ref = scan_module.selective_scan_ref(*wide[:5], **wide_kwargs)
    assert_close(fast, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    for g_fast, g_ref in zip(grads(fast, args, upstream.to(dtype)), grads(ref, wide, upstream)):
        assert g_ref.abs().max() > 0
        assert_close(g_fast, g_ref, dtype, "gradient")


def last_state_oracle(u, delta, A, B, delta_bias, softplus):
    """h_{L-1} of h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, one step at a time: (B, D, N)."""
    dt = delta + delta_bias[:, None]
    dt = torch.nn.functional.softplus(dt) if softplus else dt
    Bg = B.unsqueeze(1) if B.ndim == 3 else B
    Bd = Bg.repeat_interleave(u.shape[1] // Bg.shape[1], dim=1)  # (B, D, N, L)
    h = torch.zeros(*u.shape[:2], A.shape[1], dtype=u.dtype)
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bd[..., t]
    return h


@pytest.mark.parametrize("path", ["fused", "chunked"])
@pytest.mark.parametrize(("length", "layout"), [(1, "plain"), (9, "grouped"), (2 * T + 1, "grouped_3x1")])
def test_return_last_state(path, length, layout):
    """(out, last state); gradients through both outputs together."""
    inputs = random_inputs(length, True, LAYOUTS[layout], d=6)
    chunk = None if path == "fused" else 4
    out, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk)
    assert_close(out, selective_scan(*inputs, delta_softplus=True, chunk_size=chunk), torch.float32, "out")
    u, delta, A, B, _, _, _, bias = wide = widen(inputs)
    expected = last_state_oracle(u, delta, A, B, bias, True)
    assert last.dtype == torch.float32 and expected.abs().max() > 1e-2
    assert_close(last, expected, torch.float32, "last state")
    ref_out = scan_module.selective_scan_ref(*wide, delta_softplus=True)
    g_out, g_last = torch.randn_like(ref_out), torch.randn_like(expected)
    fast = torch.autograd.grad([out, last], inputs, [g_out.float(), g_last.float()], allow_unused=True,
                               materialize_grads=True)  # fmt: skip
    ref = torch.autograd.grad([ref_out, expected], wide, [g_out, g_last], allow_unused=True, materialize_grads=True)
    for name, g_fast, g_ref in zip(NAMES, fast, ref):
        assert_close(g_fast, g_ref, torch.float32, f"d/d{name}")


def test_last_state_alone_has_gradients():
    """Only the last state used: the output's gradient is absent in the backward."""
    u, delta, A, B, C, *_ = inputs = random_inputs(T + 3, False, d=3)
    _, last = selective_scan(u, delta, A, B, C, return_last_state=True)
    wide = widen([u, delta, A, B])
    expected = last_state_oracle(*wide, torch.zeros(3, dtype=F64), False)
    upstream = torch.randn_like(expected)
    for g_fast, g_ref in zip(grads(last, [u, delta, A, B], upstream.float()), grads(expected, wide, upstream)):
        assert_close(g_fast, g_ref, torch.float32, "gradient")
    assert inputs[4].grad is None


def test_cpu_dispatches_to_the_fused_kernel(monkeypatch):
    """CPU tensors go to the fused kernel; chunk_size selects the chunked scan."""
    calls = []
    real = scan_module.fused_scan
    monkeypatch.setattr(scan_module, "fused_scan", lambda *a: calls.append(1) or real(*a))
    inputs = [t.detach() for t in random_inputs(5, True)]
    selective_scan(*inputs, delta_softplus=True)
    assert calls == [1]
    selective_scan(*inputs, delta_softplus=True, chunk_size=2)
    assert calls == [1]


def test_single_thread_matches_two():
    """Per-thread gradient copies of B and C: the same sums with one thread or two."""
    inputs = random_inputs(2 * T + 7, True, (2, 2), batch=3, d=8, dtype=F64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = selective_scan(*inputs, delta_softplus=True)
            results.append([out, *grads(out, inputs, torch.ones_like(out))])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert_close(a, b, F64, "one thread vs two")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_double_backward_raises_a_clear_error(dtype):
    inputs = random_inputs(6, True, dtype=dtype)
    out = selective_scan(*inputs, delta_softplus=True)
    (gu,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"selective_scan \(fused CPU kernel\): double backward.*fast_path = False"):
        gu.sum().backward()


def test_chunked_double_backward_raises_a_clear_error():
    inputs = random_inputs(6, True)
    out = selective_scan(*inputs, delta_softplus=True, chunk_size=2)
    (gu,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"selective_scan \(chunked\): double backward.*fast_path = False"):
        gu.sum().backward()


@pytest.mark.parametrize(
    ("d", "groups_b", "groups_c", "expected"),
    [(128, 1, 1, 64), (192, 1, 1, 64), (160, 4, 4, 40), (320, 4, 1, 40), (96, 2, 3, 16), (6, 2, 3, 1), (7, 1, 1, 7)],
)
def test_lanes_never_straddle_a_group(d, groups_b, groups_c, expected):
    """W divides the channels that share one group of B and one of C, and is the largest such <= MAX_LANES."""
    w = lanes(d, groups_b, groups_c)
    assert w == expected and w <= MAX_LANES
    assert (d // groups_b) % w == 0 and (d // groups_c) % w == 0


@numba.njit
def _fast_exp_array(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@pytest.mark.parametrize(("dtype", "rtol", "low"), [(np.float32, 2e-7, -87.0), (np.float64, 5e-16, -708.0)])
def test_fast_exp_accuracy_and_clamp(dtype, rtol, low):
    x = np.concatenate([np.linspace(low + 1, 80, 200_001), np.random.default_rng(0).normal(0, 5, 10_000)]).astype(dtype)
    out = np.empty_like(x)
    _fast_exp_array(x, out)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - expected) / expected) <= rtol
    tiny = np.array([low - 50, -1e30], dtype=dtype)
    _fast_exp_array(tiny, out[:2])
    floor = np.exp(np.float64(low))
    assert np.all(np.abs(out[:2] - floor) <= rtol * floor), "below the clamp: exp(low), never subnormal"
    with pytest.raises(TypeError, match="numba-compiled code only"):
        fast_exp(1.0)


@pytest.mark.slow
def test_cache_in_a_read_only_package_directory(tmp_path):
    """A package directory that cannot be written: numba caches in NUMBA_CACHE_DIR instead."""
    package = tmp_path / "site" / "ssm2d"
    shutil.copytree(Path(scan_module.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    cache = tmp_path / "numba_cache"
    env = dict(os.environ, PYTHONPATH=str(package.parent), NUMBA_CACHE_DIR=str(cache), PYTHONDONTWRITEBYTECODE="1")
    code = (
        "import torch; from ssm2d.ops import selective_scan; import ssm2d.ops.fused_scan as f; "
        "assert f.__file__.startswith(%r); x = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True); "
        "selective_scan(x, x.abs(), -torch.ones(2, 3, dtype=torch.float64), torch.randn(1, 3, 5, dtype=torch.float64), "
        "torch.randn(1, 3, 5, dtype=torch.float64)).sum().backward(); print('ok')"
    ) % str(package)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    assert any(cache.rglob("*.nbi")), "no index written to NUMBA_CACHE_DIR"


def test_a_fused_kernel_keeps_the_process_thread_count():
    """A process started with OMP_NUM_THREADS=1: the first fused kernel starts numba's thread pool
    on NUMBA_NUM_THREADS = 2 threads, and torch's ops must still run on 1 (its OpenMP layer used
    to move torch to 2: two such processes on 2 cores then ran 4 spinning threads)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    code = (
        "import torch; from ssm2d.ops import selective_scan; before = torch.get_num_threads(); "
        "x = torch.randn(1, 2, 5, requires_grad=True); "
        "selective_scan(x, x.abs(), -torch.ones(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5)).sum().backward(); "
        "a = torch.randn(64, 64); a @ a; print(before, torch.get_num_threads())"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]
