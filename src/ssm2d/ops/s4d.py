"""The S4D convolution kernel (diagonal A, zero-order hold) and the separable 2-D convolution of
S4ND (Nguyen et al., NeurIPS 2022; docs/math.md §8).

Glossary: C channels, N complex modes (a conjugate pair each), L kernel length, B batch,
H x W grid, `...` broadcastable leading dimensions.

S4D kernel. Mode n of a channel is the scalar system x' = A_n x + B_n u, y = C_n x with
complex A_n = a_real + i a_imag (a_real < 0 for a decaying kernel). Zero-order hold with step
dt = exp(log_dt) * rate gives (the reference code's `SSMKernelDiag`, disc='zoh')::

    A_bar = exp(dt A),   B_bar = (exp(dt A) - 1) / A * B,   K[l] = 2 Re sum_n C_n A_bar_n^l B_bar_n

The factor 2 and the real part add each mode's conjugate twin. K[l] is the continuous impulse
response 2 Re sum_n C_n B_n exp(A_n t) integrated over the cell t in [l dt, (l + 1) dt).

`rate` is base resolution / current resolution (docs/math.md §8): rate 0.5 samples the same continuous
kernel twice as finely, rate 2 half as finely. `bandlimit` alpha zeroes C_n for the modes whose
frequency at the base resolution, exp(log_dt) |Im A_n| / (2 pi) cycles per sample, is at least
alpha / 2 (alpha = 1 is the Nyquist cutoff). The mask does not depend on `rate`, as in the
reference code, so a model keeps the same modes at every resolution (docs/math.md §8; the S4
repository's issue #123).

S4ND convolution. The 2-D kernel of a channel is the outer product of two centered 1-D kernels,
K[c, p, q] = k_h[c, p] k_w[c, q], applied as a linear (zero-padded) depthwise convolution.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv2d import choose_conv_method, direct_conv2d
from .fftconv import _check_input, fft_conv2d, fft_shape

__all__ = ["s4d_kernel", "s4d_kernel_ref", "separable_conv2d", "separable_conv2d_ref"]


def _check_kernel_inputs(
    log_dt: Tensor, a_real: Tensor, a_imag: Tensor, c: Tensor, length: int, rate: float, bandlimit: float | None
) -> tuple[torch.dtype, torch.dtype]:
    """Validate the contract of `s4d_kernel`; return the (real, complex) working dtypes."""
    for name, t, dims, real_only in (
        ("log_dt", log_dt, "(..., C)", True),
        ("a_real", a_real, "(..., C, N)", True),
        ("a_imag", a_imag, "(..., C, N)", True),
        ("c", c, "(..., C, N)", False),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or (t.is_complex() and not real_only)):
            kind = "real floating-point" if real_only else "floating-point or complex"
            raise ValueError(f"{name}: expected a {kind} tensor, got {t.dtype}")
        if t.ndim < dims.count(","):
            raise ValueError(f"{name}: expected shape {dims}, got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes((*log_dt.shape, 1), a_real.shape, a_imag.shape, c.shape)
    except RuntimeError:
        raise ValueError(
            "log_dt, a_real, a_imag, c: expected shapes (..., C), (..., C, N), (..., C, N), (..., C, N) that "
            f"broadcast, got {tuple(log_dt.shape)}, {tuple(a_real.shape)}, {tuple(a_imag.shape)} and {tuple(c.shape)}"
        ) from None
    if not isinstance(length, numbers.Integral) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length: expected an integer >= 1, got {length!r}")
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not (0 < rate < math.inf):
        raise ValueError(f"rate: expected a finite number > 0 (base resolution / current resolution), got {rate!r}")
    if bandlimit is not None and (
        not isinstance(bandlimit, numbers.Real) or isinstance(bandlimit, bool) or not (0 < bandlimit < math.inf)
    ):
        raise ValueError(f"bandlimit: expected None or a finite number > 0, got {bandlimit!r}")
    c_real = c.real.dtype if c.is_complex() else c.dtype
    real = torch.promote_types(
        torch.promote_types(log_dt.dtype, a_real.dtype), torch.promote_types(a_imag.dtype, c_real)
    )
    return real, (torch.complex128 if real == torch.float64 else torch.complex64)


def _band_mask(log_dt: Tensor, a_imag: Tensor, bandlimit: float) -> Tensor:
    """(..., C, N): 1 where the mode's base-resolution frequency is below bandlimit / 2, else 0."""
    freqs = torch.exp(log_dt)[..., None] * a_imag.abs() / (2 * math.pi)  # cycles per sample at rate 1
    return (freqs < bandlimit / 2).to(a_imag.dtype)


def s4d_kernel(
    log_dt: Tensor,
    a_real: Tensor,
    a_imag: Tensor,
    c: Tensor,
    length: int,
    rate: float = 1.0,
    bandlimit: float | None = None,
) -> Tensor:
    """S4D kernel by one Vandermonde product (see the module docstring).

    Args:
        log_dt: (..., C) log step size at the base resolution, real.
        a_real: (..., C, N) real parts of the diagonal A (negative: decaying modes).
        a_imag: (..., C, N) imaginary parts of A.
        c: (..., C, N) C_n B_n, real or complex.
        length: L, taps of the kernel, >= 1.
        rate: base resolution / current resolution; the step becomes exp(log_dt) * rate.
        bandlimit: None, or alpha > 0: zero the modes at or above alpha / 2 cycles per sample.

    Leading dimensions broadcast: an A shared by several C (a_real of shape (..., 1, N) or
    fewer leading dimensions than c) is discretised once.

    Returns:
        K: (..., C, L) real, in the promoted dtype of the inputs.
    """
    real, cplx = _check_kernel_inputs(log_dt, a_real, a_imag, c, length, rate, bandlimit)
    log_dt, a_real, a_imag, c = log_dt.to(real), a_real.to(real), a_imag.to(real), c.to(cplx)
    a = torch.complex(a_real, a_imag)  # (..., C, N)
    dta = torch.exp(log_dt)[..., None] * rate * a  # (..., C, N)
    c_bar = c * (torch.expm1(dta) / a)  # (..., C, N): C B_bar, expm1 keeps small dt A accurate
    if bandlimit is not None:
        c_bar = c_bar * _band_mask(log_dt, a_imag, bandlimit)
    steps = torch.arange(length, dtype=real, device=dta.device)
    vandermonde = torch.exp(dta[..., None] * steps)  # (..., C, N, L): A_bar^l
    kernel = c_bar[..., None, :] @ vandermonde  # (..., C, 1, L), the Vandermonde shared across c's extra dims
    return 2 * kernel[..., 0, :].real


def s4d_kernel_ref(
    log_dt: Tensor,
    a_real: Tensor,
    a_imag: Tensor,
    c: Tensor,
    length: int,
    rate: float = 1.0,
    bandlimit: float | None = None,
) -> Tensor:
    """Reference: the ZOH recurrence x[l+1] = A_bar x[l], x[0] = B_bar (an impulse), one step at a time.

    Same contract as `s4d_kernel`. Slow (L Python steps); for tests.
    """
    real, cplx = _check_kernel_inputs(log_dt, a_real, a_imag, c, length, rate, bandlimit)
    log_dt, a_real, a_imag, c = log_dt.to(real), a_real.to(real), a_imag.to(real), c.to(cplx)
    dt = torch.exp(log_dt)[..., None] * rate  # (..., C, 1)
    a = torch.complex(a_real, a_imag)
    a_bar = torch.exp(dt * a)  # (..., C, N)
    b_bar = (a_bar - 1) / a  # integral of exp(A s) over one step; B is folded into c
    if bandlimit is not None:
        base_freqs = torch.exp(log_dt)[..., None] * a_imag.abs() / (2 * math.pi)
        c = torch.where(base_freqs < bandlimit / 2, c, torch.zeros_like(c))
    state = b_bar  # x[0]: the response to u[0] = 1
    taps = []
    for _ in range(length):
        taps.append(2 * (c * state).sum(-1).real)  # y[l] = 2 Re C x[l]
        state = a_bar * state
    return torch.stack(taps, -1)


def _check_conv_inputs(x: Tensor, k_h: Tensor, k_w: Tensor) -> None:
    for name, k in (("k_h", k_h), ("k_w", k_w)):
        if not isinstance(k, Tensor) or k.ndim != 2 or k.shape[-1] % 2 == 0:
            shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(f"{name}: expected shape (C, 2k-1), a centered kernel of odd length, got {shape}")
    if k_h.shape[0] != k_w.shape[0]:
        raise ValueError(f"k_h, k_w: expected the same channels C, got {k_h.shape[0]} and {k_w.shape[0]}")
    _check_input(x, k_h.shape[0])


def _axis_spectrum(kernel: Tensor, size: int, onesided: bool) -> Tensor:
    """(C, 2k-1) centered -> (C, size) fft or (C, size // 2 + 1) rfft, its center rolled to index 0."""
    circular = F.pad(kernel, (0, size - kernel.shape[-1])).roll(-(kernel.shape[-1] // 2), dims=-1)
    return torch.fft.rfft(circular) if onesided else torch.fft.fft(circular)


def separable_conv2d(
    x: Tensor, k_h: Tensor, k_w: Tensor, method: Literal["auto", "fft", "direct"] = "auto"
) -> Tensor:
    """Linear depthwise convolution with the separable kernel K[c, p, q] = k_h[c, p] k_w[c, q].

    The FFT path takes the kernel's spectrum as the outer product of the two 1-D spectra (as the
    reference code's `contract_version=0`); the direct path convolves with the 2-D kernel by `F.conv2d`.

    Args:
        x: (B, H, W, C).
        k_h: (C, 2kh-1) centered: entry kh-1+p weighs the input p rows up (p < 0: below).
        k_w: (C, 2kw-1) centered, along the columns.
        method: "fft", "direct", or "auto" (`choose_conv_method`, told whether autograd will
            need a backward).

    Returns:
        (B, H, W, C) in x.dtype; the FFT runs in float32 for half-precision inputs.
    """
    _check_conv_inputs(x, k_h, k_w)
    grid, ksize = (x.shape[1], x.shape[2]), ((k_h.shape[-1] + 1) // 2, (k_w.shape[-1] + 1) // 2)
    if method == "auto":
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, k_h, k_w))
        method = choose_conv_method(grid, ksize, backward=backward, device=x.device)
    if method == "direct":
        return direct_conv2d(x, k_h[:, :, None] * k_w[:, None, :])
    if method != "fft":
        raise ValueError(f"method: expected 'auto', 'fft' or 'direct', got {method!r}")
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    shape = fft_shape(grid, ksize)
    with torch.autocast(x.device.type, enabled=False):
        rows = _axis_spectrum(k_h.to(work), shape[0], onesided=False)  # (C, M1)
        cols = _axis_spectrum(k_w.to(work), shape[1], onesided=True)  # (C, M2 // 2 + 1)
        spectrum = rows[:, :, None] * cols[:, None, :]  # (C, M1, M2 // 2 + 1): the outer product
    return fft_conv2d(x, spectrum, shape)


def separable_conv2d_ref(x: Tensor, k_h: Tensor, k_w: Tensor) -> Tensor:
    """Reference for `separable_conv2d`: the outer-product kernel and a shift-and-add sum
    y[b, i, j, c] = sum over p, q of K[c, p, q] x[b, i - p, j - q, c] (zero outside the grid).

    Same arguments (without `method`) and result. Slow: (2kh-1) (2kw-1) tensor operations.
    """
    _check_conv_inputs(x, k_h, k_w)
    _, h, w, _ = x.shape
    kh, kw = (k_h.shape[-1] + 1) // 2, (k_w.shape[-1] + 1) // 2
    kernel = k_h[:, :, None] * k_w[:, None, :]  # (C, 2kh-1, 2kw-1)
    out = torch.zeros_like(x)
    for p in range(-min(kh, h) + 1, min(kh, h)):
        for q in range(-min(kw, w) + 1, min(kw, w)):
            # rows i with 0 <= i < h and 0 <= i - p < h, columns likewise
            rows, cols = slice(max(p, 0), h + min(p, 0)), slice(max(q, 0), w + min(q, 0))
            src_rows, src_cols = slice(max(-p, 0), h - max(p, 0)), slice(max(-q, 0), w - max(q, 0))
            out[:, rows, cols, :] += kernel[:, kh - 1 + p, kw - 1 + q] * x[:, src_rows, src_cols, :]
    return out
