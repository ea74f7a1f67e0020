"""roesser_kernel (closed form) and roesser_kernel_ref (recurrence): docs/math.md §1-3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZES, assert_close, grads, random_coefficients, size_id

from ssm2d.ops import roesser_kernel, roesser_kernel_ref

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "ssm2d_kernels.json").read_text())["groups"]
KINDS = ["signed", "sigmoid", "complex"]
KERNEL_FNS = [roesser_kernel, roesser_kernel_ref]
FN_IDS = ["fast", "ref"]


def _golden_tensor(value, complex_: bool) -> torch.Tensor:
    if complex_:
        return torch.complex(
            torch.tensor(value["real"], dtype=torch.float64), torch.tensor(value["imag"], dtype=torch.float64)
        )
    return torch.tensor(value, dtype=torch.float64)


def _group_id(group) -> str:
    h, w = group["size"]
    return f"{h}x{w}-N{group['state_dim']}-{'complex' if group['complex'] else 'real'}"


@pytest.mark.parametrize("kernel_fn", KERNEL_FNS, ids=FN_IDS)
@pytest.mark.parametrize("group", GOLDEN, ids=_group_id)
def test_matches_golden_kernels(group, kernel_fn):
    size, n = tuple(group["size"]), group["state_dim"]
    assert group["cases"], "golden group without cases"
    for i, case in enumerate(group["cases"]):
        a, b, c = (_golden_tensor(case[k], group["complex"]) for k in "abc")
        assert a.shape == (4, n) and b.shape == (2, n) and c.shape == (2, n)
        kernel = kernel_fn(a, b, c, size)
        assert kernel.dtype == torch.float64
        assert_close(kernel, _golden_tensor(case["kernel"], False), "golden", f"{_group_id(group)} case {i}")


def _leaves(tensors, real_dtype=torch.float64):
    """Detached copies requiring grad; real tensors cast to real_dtype, complex to its complex twin."""
    cplx = torch.complex64 if real_dtype == torch.float32 else torch.complex128
    return [t.detach().to(cplx if t.is_complex() else real_dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_matches_ref_float64(kind, size):
    params = _leaves(random_coefficients(kind, (2,), 3))
    ref = roesser_kernel_ref(*params, size)
    fast = roesser_kernel(*params, size)
    assert fast.dtype == torch.float64 and fast.shape == (2, *size)
    assert_close(fast, ref, torch.float64, "kernel")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip("abc", grads(fast, params, upstream), grads(ref, params, upstream)):
        assert_close(g_fast, g_ref, torch.float64, f"grad {name}")


@pytest.mark.parametrize("size", SIZES, ids=size_id)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_float32_matches_ref_float64(kind, size):
    params32 = _leaves(random_coefficients(kind, (2,), 3), torch.float32)
    params64 = _leaves(params32)  # the same (rounded) values, in float64
    fast = roesser_kernel(*params32, size)
    ref = roesser_kernel_ref(*params64, size)
    assert fast.dtype == torch.float32
    assert_close(fast, ref, torch.float32, "kernel")
    upstream = torch.randn_like(ref)
    g32 = grads(fast, params32, upstream.float())
    for name, g_fast, g_ref in zip("abc", g32, grads(ref, params64, upstream)):
        assert_close(g_fast, g_ref, torch.float32, f"grad {name}")


@pytest.mark.parametrize("kernel_fn", KERNEL_FNS, ids=FN_IDS)
@pytest.mark.parametrize("kind", ["signed", "complex"])
def test_broadcasting_matches_per_set(kind, kernel_fn):
    sets, groups, n, size = 3, 2, 4, (5, 6)
    a, b, _ = random_coefficients(kind, (sets,), n)
    _, _, c = random_coefficients(kind, (groups, sets), n)
    kernel = kernel_fn(a, b, c, size)
    assert kernel.shape == (groups, sets, *size)
    for g in range(groups):
        for s in range(sets):
            single = roesser_kernel(a[s], b[s], c[g, s], size)
            assert_close(kernel[g, s], single, torch.float64, f"kernel[{g}, {s}]")


@pytest.mark.parametrize("small, large", [((5, 7), (12, 10)), ((1, 7), (6, 9)), ((6, 1), (8, 3))], ids=size_id)
@pytest.mark.parametrize("kind", ["signed", "complex"])
def test_kernel_is_crop_of_larger_grid(kind, small, large):
    a, b, c = random_coefficients(kind, (2,), 5)
    big = roesser_kernel(a, b, c, large)
    assert_close(roesser_kernel(a, b, c, small), big[..., : small[0], : small[1]], torch.float64, "crop")


@pytest.mark.parametrize("kernel_fn", KERNEL_FNS, ids=FN_IDS)
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (5, 9), (1, 6), (7, 1)], ids=size_id)
def test_all_ones_gives_two_everywhere(size, kernel_fn):
    ones = [torch.ones(rows, 1, dtype=torch.float64) for rows in (4, 2, 2)]
    kernel = kernel_fn(*ones, size)
    assert_close(kernel, torch.full(size, 2.0, dtype=torch.float64), dict(rtol=0.0, atol=1e-12), "kernel")


@pytest.mark.parametrize("kernel_fn", KERNEL_FNS, ids=FN_IDS)
@pytest.mark.parametrize("kind", ["signed", "complex"])
def test_first_cells_by_hand(kind, kernel_fn):
    """Cells (0,0), (0,1), (0,2), (1,0), (1,1) from the recurrence with halving and weights."""
    a, b, c = random_coefficients(kind, (), 1)
    (a1, a2, a3, a4), (b1, b2), (c1, c2) = (t[:, 0] for t in (a, b, c))
    right, down = a1 * b1 + a2 * b2, a3 * b1 + a4 * b2  # halved at the origin, x2 on the rays
    expected = torch.zeros(3, 3, dtype=a.dtype)
    expected[0, 0] = c1 * b1 + c2 * b2
    expected[0, 1] = c1 * right
    expected[0, 2] = c1 * a1 * right
    expected[1, 0] = c2 * down
    expected[2, 0] = c2 * a4 * down
    expected[1, 1] = (c1 * a2 * down + c2 * a3 * right) / 2
    kernel = kernel_fn(a, b, c, (3, 3))
    cells = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (1, 1)]
    for i, j in cells:
        assert_close(kernel[i, j], expected[i, j].real, torch.float64, f"K[{i}, {j}]")


@pytest.mark.parametrize("kind", ["signed", "complex"])
def test_gradcheck(kind):
    params = _leaves(random_coefficients(kind, (), 2))
    assert torch.autograd.gradcheck(lambda a, b, c: roesser_kernel(a, b, c, (3, 4)), params)


N = 3
BAD_INPUTS = {
    "a rows": (dict(a=(3, N)), r"a: expected shape \(\.\.\., 4, N\), got \(3, 3\)"),
    "a 1-D": (dict(a=(4 * N,)), r"a: expected shape \(\.\.\., 4, N\)"),
    "b N": (dict(b=(2, N + 1)), r"b: expected shape \(\.\.\., 2, N\) with N=3 as in a, got \(2, 4\)"),
    "c N": (dict(c=(2, N - 1)), r"c: expected shape \(\.\.\., 2, N\) with N=3 as in a, got \(2, 2\)"),
    "b rows": (dict(b=(4, N)), r"b: expected shape \(\.\.\., 2, N\), got \(4, 3\)"),
    "leading": (
        dict(a=(3, 4, N), c=(2, 2, N)),
        r"a, b, c: expected broadcastable leading dimensions, got \(3,\), \(\) and \(2,\)",
    ),
    "size 0": (dict(size=(0, 3)), r"size: expected \(H, W\) with integers H, W >= 1, got \(0, 3\)"),
    "size len": (dict(size=(2,)), r"size: expected \(H, W\) with integers H, W >= 1, got \(2,\)"),
    "size float": (dict(size=(2.0, 3)), r"size: expected \(H, W\) with integers H, W >= 1, got \(2\.0, 3\)"),
    "size bool": (dict(size=(True, 3)), r"size: expected \(H, W\) with integers H, W >= 1, got \(True, 3\)"),
    "size int": (dict(size=5), r"size: expected \(H, W\) with integers H, W >= 1, got 5"),
}
# Values are checked on the reference path only: the fast path reads no value (no device sync).
NON_FINITE = {
    "a nan": (dict(a_value=math.nan), r"a: expected finite values, got 1 non-finite"),
    "b inf": (dict(b_value=math.inf), r"b: expected finite values, got 1 non-finite"),
}


@pytest.mark.parametrize(
    "kernel_fn, case",
    [(fn, case) for fn in KERNEL_FNS for case in BAD_INPUTS] + [(roesser_kernel_ref, case) for case in NON_FINITE],
    ids=[f"{fid}-{case}" for fid in FN_IDS for case in BAD_INPUTS] + [f"ref-{case}" for case in NON_FINITE],
)
def test_invalid_inputs_raise(case, kernel_fn):
    spec, pattern = {**BAD_INPUTS, **NON_FINITE}[case]
    a, b, c = (torch.rand(spec.get(name, (rows, N)), dtype=torch.float64) for name, rows in zip("abc", (4, 2, 2)))
    for name, t in zip("ab", (a, b)):
        if f"{name}_value" in spec:
            t[0, 1] = spec[f"{name}_value"]
    with pytest.raises(ValueError, match=pattern):
        kernel_fn(a, b, c, spec.get("size", (3, 4)))


@pytest.mark.parametrize("kernel_fn", KERNEL_FNS, ids=FN_IDS)
def test_size_accepts_integer_likes(kernel_fn):
    """numpy integers and torch.Size are sizes too."""
    a, b, c = random_coefficients("sigmoid", (), N)
    expected = kernel_fn(a, b, c, (3, 4))
    for size in ((np.int64(3), np.int32(4)), torch.Size([3, 4]), [3, 4]):
        assert_close(kernel_fn(a, b, c, size), expected, torch.float64, f"size {size!r}")
