"""Directional depthwise convolution: fold, FFT and direct paths (docs/math.md §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, causal_conv_oracle, grads, size_id

import ssm2d.ops.conv2d as conv2d_module
import ssm2d.ops.fftconv as fftconv_module
from ssm2d.ops import (
    DIRECTION_FLIPS,
    choose_conv_method,
    direct_conv2d,
    directional_conv2d,
    directional_conv2d_ref,
    fft_conv2d,
    fft_shape,
    fold_directions,
    kernel_spectrum,
)

# (grid, kernel size): kernel = grid, truncated kernels, and a kernel larger than the grid.
GRID_KERNEL = [
    ((1, 1), (1, 1)),
    ((1, 7), (1, 7)),
    ((6, 1), (6, 1)),
    ((5, 7), (5, 7)),
    ((9, 4), (9, 4)),
    ((13, 13), (13, 13)),
    ((9, 7), (3, 5)),
    ((16, 11), (4, 2)),
    ((3, 4), (5, 6)),
]


def _data(grid, ksize, d, channels=3, batch=2, dtype=torch.float64):
    x = torch.randn(batch, *grid, channels, dtype=dtype)
    kernels = torch.randn(d, channels, *ksize, dtype=dtype)
    return x, kernels


def test_direction_flips_order():
    """d = 2 is a prefix of d = 4: top-left, bottom-right, top-right, bottom-left."""
    assert DIRECTION_FLIPS == ((), (1, 2), (2,), (1,))


@pytest.mark.parametrize("grid, ksize", GRID_KERNEL, ids=size_id)
@pytest.mark.parametrize("d", [1, 2, 4])
def test_methods_match_ref_and_oracle(d, grid, ksize):
    x, kernels = _data(grid, ksize, d)
    x.requires_grad_()
    kernels.requires_grad_()
    oracle = causal_conv_oracle(x, kernels)
    ref = directional_conv2d_ref(x, kernels)
    assert_close(ref, oracle, torch.float64, "ref vs oracle")
    upstream = torch.randn_like(ref)
    ref_grads = grads(ref, (x, kernels), upstream)
    for name, g_ref, g in zip(("x", "kernels"), ref_grads, grads(oracle, (x, kernels), upstream)):
        assert_close(g_ref, g, torch.float64, f"ref grad {name}")
    for method in ("fft", "direct", "auto"):
        y = directional_conv2d(x, kernels, method=method)
        assert y.dtype == torch.float64
        assert_close(y, oracle, torch.float64, f"{method} vs oracle")
        for name, g, g_ref in zip(("x", "kernels"), grads(y, (x, kernels), upstream), ref_grads):
            assert_close(g, g_ref, torch.float64, f"{method} grad {name}")


@pytest.mark.parametrize("block_bytes", [1, 3000], ids=["one-channel-blocks", "uneven-blocks"])
def test_fft_channel_blocks_match_ref(monkeypatch, block_bytes):
    """The FFT path runs a block of channels at a time; many and uneven blocks change nothing."""
    grid = (5, 7)
    x, kernels = _data(grid, grid, 4, channels=7)
    x.requires_grad_()
    kernels.requires_grad_()
    monkeypatch.setattr(fftconv_module, "_BLOCK_BYTES", block_bytes)
    shape = fft_shape(grid, grid)
    assert len(fftconv_module._channel_blocks(x.shape[0], 7, shape)) > 1
    y = directional_conv2d(x, kernels, method="fft")
    ref = directional_conv2d_ref(x, kernels)
    assert_close(y, ref, torch.float64, "blocked fft vs ref")
    upstream = torch.randn_like(ref)
    for name, g, g_ref in zip(("x", "kernels"), grads(y, (x, kernels), upstream), grads(ref, (x, kernels), upstream)):
        assert_close(g, g_ref, torch.float64, f"blocked fft grad {name}")


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("grid, ksize", [((5, 7), (5, 7)), ((14, 14), (14, 14)), ((9, 7), (3, 5))], ids=size_id)
def test_float32_matches_float64_ref(grid, ksize, method):
    x, kernels = _data(grid, ksize, 4, dtype=torch.float32)
    y = directional_conv2d(x, kernels, method=method)
    assert y.dtype == torch.float32
    assert_close(y, directional_conv2d_ref(x.double(), kernels.double()), torch.float32, method)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_fft_conv2d_half_inputs_run_in_float32(dtype):
    grid = (6, 9)
    x, kernels = _data(grid, grid, 4, channels=5, dtype=torch.float32)
    shape = fft_shape(grid, grid)
    spectrum = kernel_spectrum(fold_directions(kernels), shape)
    y = fft_conv2d(x.to(dtype), spectrum, shape)
    assert y.dtype == dtype and y.is_contiguous()
    # computed in float32 from the rounded input, then rounded once: bit-identical
    assert torch.equal(y, fft_conv2d(x.to(dtype).float(), spectrum, shape).to(dtype))
    assert_close(y, fft_conv2d(x, spectrum, shape), dtype, "half vs float32")


@pytest.mark.parametrize("grid, ksize", GRID_KERNEL + [((7, 7), (1, 1)), ((10, 3), (2, 8))], ids=size_id)
def test_fft_shape_is_even_and_large_enough(grid, ksize):
    for m, n, k in zip(fft_shape(grid, ksize), grid, ksize):
        assert m >= n + k - 1 and m % 2 == 0
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        assert r == 1, f"{m} is not 7-smooth"


@pytest.mark.parametrize("d", [1, 2, 4])
def test_fold_directions_layout(d):
    channels, kh, kw = 3, 4, 6
    kernels = torch.randn(d, channels, kh, kw, dtype=torch.float64)
    full = fold_directions(kernels)
    assert full.shape == (channels, 2 * kh - 1, 2 * kw - 1)
    # convolving a unit impulse in the middle of a large grid reproduces the folded kernel
    x = torch.zeros(1, 2 * kh - 1, 2 * kw - 1, channels, dtype=torch.float64)
    x[0, kh - 1, kw - 1] = 1.0
    assert_close(full, causal_conv_oracle(x, kernels)[0].permute(2, 0, 1), torch.float64, "folded kernel")


@pytest.mark.parametrize("d", [1, 2, 4])
def test_fold_directions_center_and_gradients(d):
    """The center tap adds to offset (0, 0); the hand-written backward is autograd's of the plain sum."""
    channels, kh, kw = 3, 4, 5
    kernels = torch.randn(d, channels, kh, kw, dtype=torch.float64, requires_grad=True)
    center = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    full = fold_directions(kernels, center)
    expected = torch.zeros(channels, 2 * kh - 1, 2 * kw - 1, dtype=torch.float64)
    expected = expected + F.pad(kernels[0], (kw - 1, 0, kh - 1, 0))
    flips = [(-2, -1), (-1,), (-2,)]
    pads = [(0, kw - 1, 0, kh - 1), (0, kw - 1, kh - 1, 0), (kw - 1, 0, 0, kh - 1)]
    for k, dims, pad in zip(kernels[1:], flips, pads):
        expected = expected + F.pad(k.flip(dims), pad)
    expected = expected + F.pad(center[:, None, None], (kw - 1, kw - 1, kh - 1, kh - 1))
    assert_close(full, expected, torch.float64, "folded kernel with center")
    upstream = torch.randn_like(full)
    for name, g, g_ref in zip(("kernels", "center"), grads(full, (kernels, center), upstream),
                              grads(expected, (kernels, center), upstream)):  # fmt: skip
        assert_close(g, g_ref, torch.float64, f"fold grad {name}")


def test_direct_conv2d_and_fft_agree_on_a_centered_kernel():
    grid, kernel = (7, 5), torch.randn(3, 5, 9, dtype=torch.float64)
    x = torch.randn(2, *grid, 3, dtype=torch.float64)
    shape = fft_shape(grid, (3, 5))
    assert_close(fft_conv2d(x, kernel_spectrum(kernel, shape), shape), direct_conv2d(x, kernel), torch.float64, "fft")


def _correlate_loop(g, x, kernel_size):
    """r[c, ph + s, pw + t] = sum over b, i, j of g[b, i, j, c] x[b, i - s, j - t, c], written out."""
    (kh2, kw2), (_, h, w, _) = kernel_size, x.shape
    out = torch.zeros(x.shape[-1], kh2, kw2, dtype=x.dtype)
    for s in range(-(kh2 // 2), kh2 // 2 + 1):
        for t in range(-(kw2 // 2), kw2 // 2 + 1):
            if abs(s) >= h or abs(t) >= w:
                continue  # no pair of cells that far apart
            gi, xi = slice(max(s, 0), h + min(s, 0)), slice(max(-s, 0), h - max(s, 0))
            gj, xj = slice(max(t, 0), w + min(t, 0)), slice(max(-t, 0), w - max(t, 0))
            out[:, kh2 // 2 + s, kw2 // 2 + t] = (g[:, gi, gj] * x[:, xi, xj]).sum((0, 1, 2))
    return out


@pytest.mark.parametrize("grid, ksize", GRID_KERNEL, ids=size_id)
def test_dense_correlation_matches_loop_and_fft(grid, ksize):
    """The direct path's kernel gradient on small grids (a matmul over cell pairs) is the FFT's."""
    g, x = torch.randn(2, 3, *grid, 4, dtype=torch.float64).unbind(0)
    kernel_size = (2 * ksize[0] - 1, 2 * ksize[1] - 1)
    expected = _correlate_loop(g, x, kernel_size)
    assert_close(conv2d_module._correlate_dense(g, x, kernel_size), expected, torch.float64, "dense vs loop")
    assert_close(fftconv_module.correlate_sum(g, x, kernel_size), expected, torch.float64, "fft vs loop")
    dense32 = conv2d_module._correlate_dense(g.float(), x.float(), kernel_size)
    assert dense32.dtype == torch.float32
    assert_close(dense32, expected, torch.float32, "dense float32 vs loop")


@pytest.mark.parametrize("dense", [False, True], ids=["fft-kernel-grad", "dense-kernel-grad"])
@pytest.mark.parametrize("grid, ksize", [((5, 7), (5, 7)), ((9, 7), (3, 5)), ((3, 4), (5, 6))], ids=size_id)
def test_direct_kernel_gradient_either_way_matches_ref(monkeypatch, grid, ksize, dense):
    monkeypatch.setattr(conv2d_module, "_dense_correlation_pays", lambda *args: dense)
    x, kernels = _data(grid, ksize, 4)
    x.requires_grad_()
    kernels.requires_grad_()
    y, ref = directional_conv2d(x, kernels, method="direct"), directional_conv2d_ref(x, kernels)
    upstream = torch.randn_like(ref)
    for name, g, g_ref in zip(("x", "kernels"), grads(y, (x, kernels), upstream), grads(ref, (x, kernels), upstream)):
        assert_close(g, g_ref, torch.float64, f"direct grad {name}")


BAD_CALLS = {
    "kernels 3-D": (lambda x, k: directional_conv2d(x, k[0]), r"kernels: expected shape \(d, C, kh, kw\)"),
    "kernels d=3": (lambda x, k: directional_conv2d(x, k.expand(3, -1, -1, -1)), r"kernels: .*d in \(1, 2, 4\)"),
    "fold d=3": (lambda x, k: fold_directions(k.expand(3, -1, -1, -1)), r"kernels: expected shape"),
    "fold center": (lambda x, k: fold_directions(k, k.new_zeros(2)), r"center: expected shape \(3,\)"),
    "ref d=3": (lambda x, k: directional_conv2d_ref(x, k.expand(3, -1, -1, -1)), r"kernels: expected shape"),
    "x channels": (lambda x, k: directional_conv2d(x[..., :2], k), r"x: expected shape \(B, H, W, C\) with C=3"),
    "x 3-D": (lambda x, k: directional_conv2d(x[0], k), r"x: expected shape \(B, H, W, C\) with C=3"),
    "ref x": (lambda x, k: directional_conv2d_ref(x[0], k), r"x: expected shape \(B, H, W, C\) with C=3"),
    "direct x": (lambda x, k: direct_conv2d(x[..., :2], fold_directions(k)), r"x: expected shape"),
    "method": (lambda x, k: directional_conv2d(x, k, method="fast"), r"method: expected 'auto', 'fft' or 'direct'"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_arguments_raise(case):
    call, pattern = BAD_CALLS[case]
    x, kernels = _data((4, 5), (4, 5), 1)
    with pytest.raises(ValueError, match=pattern):
        call(x, kernels)


RULE_GRIDS = [(1, 1), (1, 9), (7, 1), (5, 7), (14, 14), (16, 11), (32, 32), (56, 56), (3, 200)]


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("backward", [True, False], ids=["training", "inference"])
def test_choose_conv_method_returns_a_path_for_any_grid(backward, device):
    """The rule answers for every grid and kernel size, on every device type, without running
    anything on the device (so it can be tested here for GPUs too)."""
    for grid in RULE_GRIDS:
        for ksize in {grid, (1, 1), (min(grid[0], 4), min(grid[1], 4)), (min(grid[0], 7), min(grid[1], 2))}:
            method = choose_conv_method(grid, ksize, backward=backward, device=device)
            assert method in ("fft", "direct"), f"{grid} {ksize}: {method!r}"


@pytest.mark.parametrize("backward", [True, False], ids=["training", "inference"])
def test_auto_path_matches_ref_on_both_sides_of_the_rule(backward):
    """Whatever "auto" picks, on grids where the rule picks each path, the result is the reference."""
    picked = set()
    for grid in [(4, 5), (33, 30)]:
        x, kernels = _data(grid, grid, 4, channels=2)
        x.requires_grad_(backward)
        kernels.requires_grad_(backward)
        picked.add(choose_conv_method(grid, grid, backward=backward))
        y, ref = directional_conv2d(x, kernels, method="auto"), directional_conv2d_ref(x, kernels)
        assert_close(y, ref, torch.float64, f"auto on {grid}")
        if backward:
            upstream = torch.randn_like(ref)
            pairs = zip(grads(y, (x, kernels), upstream), grads(ref, (x, kernels), upstream))
            for name, (g, g_ref) in zip(("x", "kernels"), pairs):
                assert_close(g, g_ref, torch.float64, f"auto grad {name} on {grid}")
    assert picked == {"fft", "direct"}, f"the two grids should fall on both sides of the rule, got {picked}"


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("dense", [False, True], ids=["fft-kernel-grad", "dense-kernel-grad"])
def test_second_derivatives_match_gradgradcheck(monkeypatch, method, dense):
    """The fast paths' hand-written backwards are differentiable: double backward is exact."""
    monkeypatch.setattr(conv2d_module, "_dense_correlation_pays", lambda *args: dense)
    x, kernels = _data((3, 2), (2, 2), 4, batch=1, channels=2)
    x.requires_grad_()
    kernels.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, k: directional_conv2d(a, k, method=method), (x, kernels))
