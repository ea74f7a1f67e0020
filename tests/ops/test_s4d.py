"""s4d_kernel (Vandermonde) and s4d_kernel_ref (ZOH recurrence); separable_conv2d and its ref:
docs/math.md §8."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SIZES, assert_close, grads, size_id

from ssm2d.ops import s4d_kernel, s4d_kernel_ref, separable_conv2d, separable_conv2d_ref

F64 = torch.float64
LENGTHS = [1, 2, 7, 16, 33]
RATES = [1.0, 0.5, 2.7]


def random_params(lead=(2,), h=3, n=4, shared_a=False, dtype=F64) -> list[torch.Tensor]:
    """log_dt (C,), a_real / a_imag (C or 1, N), c (*lead, C, N) complex; leaves requiring grad.

    dt in [0.01, 1] and |Im A| up to 8: phases up to ~700 rad over 33 taps at rate 2.7, the
    aliased regime of the image configs (docs/math.md §8).
    """
    rows = 1 if shared_a else h
    log_dt = torch.empty(h, dtype=F64).uniform_(math.log(0.01), 0.0)
    a_real = -torch.empty(rows, n, dtype=F64).uniform_(0.05, 1.0)
    a_imag = torch.empty(rows, n, dtype=F64).uniform_(-8.0, 8.0)
    c = torch.randn(*lead, h, n, dtype=torch.complex128)
    cplx = torch.complex64 if dtype == torch.float32 else torch.complex128
    return [t.to(cplx if t.is_complex() else dtype).requires_grad_() for t in (log_dt, a_real, a_imag, c)]


def widen(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same (rounded) values in float64 / complex128, as fresh leaves."""
    return [t.detach().to(torch.complex128 if t.is_complex() else F64).requires_grad_() for t in params]


def continuous_kernel(log_dt, a_real, a_imag, c, t: torch.Tensor) -> torch.Tensor:
    """2 Re sum_n c_n exp(A_n t) at times t: (..., C, T)."""
    a = torch.complex(a_real, a_imag)[..., None]  # (..., C, N, 1)
    return 2 * (c[..., None] * torch.exp(a * t)).sum(-2).real


# ---------------------------------------------------------------------------------------------
# s4d_kernel against its reference and against the continuous kernel


@pytest.mark.parametrize("bandlimit", [None, 0.5])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("length", LENGTHS)
def test_fast_float32_matches_ref_float64(length, rate, bandlimit):
    p32 = random_params(dtype=torch.float32)
    p64 = widen(p32)
    fast = s4d_kernel(*p32, length, rate, bandlimit)
    ref = s4d_kernel_ref(*p64, length, rate, bandlimit)
    assert fast.dtype == torch.float32 and fast.shape == (2, 3, length)
    assert ref.abs().max().item() > 1e-3, "a vanishing kernel proves nothing"
    assert_close(fast, ref, torch.float32, "kernel")
    upstream = torch.randn_like(ref)
    names = ("log_dt", "a_real", "a_imag", "c")
    for name, g_fast, g_ref in zip(names, grads(fast, p32, upstream.float()), grads(ref, p64, upstream)):
        assert_close(g_fast, g_ref, torch.float32, f"grad {name}")


@pytest.mark.parametrize("shared_a", [False, True], ids=["per_channel_a", "shared_a"])
@pytest.mark.parametrize("length", [1, 8, 19])
def test_fast_matches_ref_float64(length, shared_a):
    params = random_params(lead=(3, 2), shared_a=shared_a)
    fast = s4d_kernel(*params, length, 0.7, 0.8)
    ref = s4d_kernel_ref(*params, length, 0.7, 0.8)
    assert fast.dtype == F64 and fast.shape == (3, 2, 3, length)
    assert_close(fast, ref, F64, "kernel")
    upstream = torch.randn_like(ref)
    names = ("log_dt", "a_real", "a_imag", "c")
    for name, g_fast, g_ref in zip(names, grads(fast, params, upstream), grads(ref, params, upstream)):
        assert_close(g_fast, g_ref, F64, f"grad {name}")


@pytest.mark.parametrize("kernel_fn", [s4d_kernel, s4d_kernel_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("rate", RATES)
def test_tap_is_cell_integral_of_continuous_kernel(rate, kernel_fn):
    """ZOH: K[l] = integral over t in [l dt, (l + 1) dt) of 2 Re sum_n C_n B_n exp(A_n t), dt = exp(log_dt) rate.

    Oracle: Simpson's rule on 2001 points per cell (error below 1e-9 relative here).
    """
    log_dt, a_real, a_imag, c = (t.detach() for t in random_params(lead=(), h=2, n=3))
    length = 6
    kernel = kernel_fn(log_dt, a_real, a_imag, c, length, rate)
    dt = torch.exp(log_dt) * rate  # (C,)
    fraction = torch.linspace(0, 1, 2001, dtype=F64)
    simpson = torch.ones(2001, dtype=F64)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    expected = torch.empty_like(kernel)
    for l in range(length):
        t = (l + fraction) * dt[:, None]  # (C, T)
        values = continuous_kernel(log_dt, a_real, a_imag, c, t[:, None, :])  # (C, T)
        expected[:, l] = (values * simpson).sum(-1) * dt / (3 * 2000)
    assert_close(kernel, expected, dict(rtol=1e-6, atol=1e-9), "taps vs cell integrals")


@pytest.mark.parametrize("bandlimit", [None, 0.4])
@pytest.mark.parametrize("factor", [2, 3])
def test_rate_divides_cells_exactly(factor, bandlimit):
    """At rate 1 / m the same continuous kernel is sampled on cells m times smaller: every m
    consecutive fine taps add up to one coarse tap (the band mask does not depend on rate)."""
    params = [t.detach() for t in random_params()]
    coarse = s4d_kernel(*params, 9, 1.0, bandlimit)
    fine = s4d_kernel(*params, 9 * factor, 1.0 / factor, bandlimit)
    assert_close(fine.unflatten(-1, (9, factor)).sum(-1), coarse, F64, f"sum of {factor} fine taps")
    assert (fine.unflatten(-1, (9, factor))[..., 0] - coarse).abs().max().item() > 1e-2, "rate had no effect"


@pytest.mark.parametrize("kernel_fn", [s4d_kernel, s4d_kernel_ref], ids=["fast", "ref"])
@pytest.mark.parametrize("rate", [1.0, 0.5, 3.0])
def test_bandlimit_keeps_modes_below_half_alpha(rate, kernel_fn):
    """Mode n has exp(log_dt) |Im A_n| / (2 pi) cycles per sample at rate 1; bandlimit alpha
    keeps the modes strictly below alpha / 2, at every rate (docs/math.md §8)."""
    dt = 0.25
    log_dt = torch.full((1,), math.log(dt), dtype=F64)
    freqs = torch.tensor([[0.0, 0.05, 0.12, 0.2, 0.35, 0.6]], dtype=F64)  # cycles per sample
    a_imag = -2 * math.pi * freqs / dt  # the sign of Im A does not matter
    a_real = torch.full_like(a_imag, -0.3)
    c = torch.randn(1, 6, dtype=torch.complex128)
    for alpha, kept in ((0.3, 3), (0.5, 4), (1.0, 5), (2.0, 6)):
        masked = c.clone()
        masked[:, kept:] = 0
        expected = kernel_fn(log_dt, a_real, a_imag, masked, 11, rate)
        actual = kernel_fn(log_dt, a_real, a_imag, c, 11, rate, alpha)
        assert_close(actual, expected, F64, f"alpha {alpha}: keeps the first {kept} modes")
    assert kernel_fn(log_dt, a_real, a_imag[:, 5:], c[:, 5:], 11, rate, 1.0).abs().max().item() == 0.0


def test_shared_a_broadcasts_like_repeated_a():
    log_dt, a_real, a_imag, c = (t.detach() for t in random_params(lead=(2,), h=3, n=5, shared_a=True))
    kernel = s4d_kernel(log_dt, a_real, a_imag, c, 10, 1.3)
    repeated = s4d_kernel(log_dt, a_real.expand(3, 5), a_imag.expand(3, 5), c, 10, 1.3)
    assert kernel.shape == (2, 3, 10)
    assert_close(kernel, repeated, F64, "shared vs repeated A")
    for h in range(3):
        single = s4d_kernel_ref(log_dt[h : h + 1], a_real, a_imag, c[:, h : h + 1], 10, 1.3)
        assert_close(kernel[:, h : h + 1], single, F64, f"channel {h}")


def test_real_c_is_taken_as_complex():
    log_dt, a_real, a_imag, c = (t.detach() for t in random_params(lead=()))
    real_c = s4d_kernel(log_dt, a_real, a_imag, c.real, 7)
    assert_close(real_c, s4d_kernel(log_dt, a_real, a_imag, c.real + 0j, 7), F64, "real c")


@pytest.mark.parametrize("kernel_fn", [s4d_kernel, s4d_kernel_ref], ids=["fast", "ref"])
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(length=0), ValueError, "length"),
        (dict(length=2.0), ValueError, "length"),
        (dict(rate=0.0), ValueError, "rate"),
        (dict(rate=-1.0), ValueError, "rate"),
        (dict(rate=math.inf), ValueError, "rate"),
        (dict(rate=True), ValueError, "rate"),
        (dict(bandlimit=0.0), ValueError, "bandlimit"),
        (dict(bandlimit=math.nan), ValueError, "bandlimit"),
        (dict(log_dt=torch.zeros(3, dtype=torch.complex128)), ValueError, "log_dt"),
        (dict(a_imag=torch.zeros(3, 4, dtype=torch.int64)), ValueError, "a_imag"),
        (dict(a_real=torch.zeros(4, dtype=F64)), ValueError, "a_real"),
        (dict(c=torch.zeros(2, 5, 4, dtype=F64)), ValueError, "broadcast"),
        (dict(c=[[1.0]]), TypeError, "c"),
    ],
)
def test_bad_inputs(change, error, match, kernel_fn):
    log_dt, a_real, a_imag, c = (t.detach() for t in random_params())
    args = dict(log_dt=log_dt, a_real=a_real, a_imag=a_imag, c=c, length=5, rate=1.0, bandlimit=None) | change
    with pytest.raises(error, match=match):
        kernel_fn(**args)


# ---------------------------------------------------------------------------------------------
# separable_conv2d


def conv_oracle(x: torch.Tensor, k_h: torch.Tensor, k_w: torch.Tensor) -> torch.Tensor:
    """F.conv2d with the outer-product kernel on a zero-padded input (conv2d correlates: flip)."""
    kernel = (k_h[:, :, None] * k_w[:, None, :]).flip(-2, -1)[:, None]  # (C, 1, 2kh-1, 2kw-1)
    ph, pw = k_h.shape[-1] // 2, k_w.shape[-1] // 2
    y = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (pw, pw, ph, ph)), kernel, groups=x.shape[-1])
    return y.permute(0, 2, 3, 1)


def kernel_lengths(grid):
    """Whole-grid, truncated and longer-than-the-grid centered lengths."""
    h, w = grid
    return [(2 * h - 1, 2 * w - 1), (3, 5), (2 * h + 3, 1)]


@pytest.mark.parametrize("method", ["fft", "direct", "auto"])
@pytest.mark.parametrize("grid", SIZES, ids=size_id)
def test_separable_conv_float32_matches_ref_float64(grid, method):
    for lh, lw in kernel_lengths(grid):
        x32 = torch.randn(2, *grid, 3).requires_grad_()
        k_h32, k_w32 = torch.randn(3, lh).requires_grad_(), torch.randn(3, lw).requires_grad_()
        x64, k_h64, k_w64 = widen([x32, k_h32, k_w32])
        fast = separable_conv2d(x32, k_h32, k_w32, method)
        ref = separable_conv2d_ref(x64, k_h64, k_w64)
        what = f"{method} kernel {lh}x{lw}"
        assert fast.dtype == torch.float32
        assert_close(ref, conv_oracle(x64, k_h64, k_w64), F64, f"ref vs F.conv2d, {what}")
        assert_close(fast, ref, torch.float32, what)
        upstream = torch.randn_like(ref)
        g32 = grads(fast, (x32, k_h32, k_w32), upstream.float())
        for name, g_fast, g_ref in zip(("x", "k_h", "k_w"), g32, grads(ref, (x64, k_h64, k_w64), upstream)):
            assert_close(g_fast, g_ref, torch.float32, f"grad {name}, {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_separable_conv_half_precision_runs_fft_in_float32(dtype):
    x = torch.randn(2, 9, 6, 4)
    k_h, k_w = torch.randn(4, 17), torch.randn(4, 11)
    y = separable_conv2d(x.to(dtype), k_h, k_w, "fft")
    assert y.dtype == dtype
    assert_close(y, separable_conv2d_ref(x.double(), k_h.double(), k_w.double()), dtype, "half precision")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 5, 7, 3), (3, 4), (3, 5)), "k_h"),
        (((2, 5, 7, 3), (3, 5), (3, 5, 1)), "k_w"),
        (((2, 5, 7, 3), (3, 5), (2, 5)), "same channels"),
        (((2, 5, 7, 4), (3, 5), (3, 5)), "x"),
        (((5, 7, 3), (3, 5), (3, 5)), "x"),
    ],
)
def test_separable_conv_bad_inputs(shapes, match):
    x, k_h, k_w = (torch.randn(*s) for s in shapes)
    for fn in (separable_conv2d, separable_conv2d_ref):
        with pytest.raises(ValueError, match=match):
            fn(x, k_h, k_w)


def test_separable_conv_bad_method():
    with pytest.raises(ValueError, match="method"):
        separable_conv2d(torch.randn(1, 3, 3, 2), torch.randn(2, 3), torch.randn(2, 3), "spectral")
