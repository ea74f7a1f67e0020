"""Mega's multi-dimensional damped EMA (Ma et al., ICLR 2023; docs/math.md §12).

Glossary: B batch, L sequence length, C channels, h expansion (states per channel),
D directions (1: forward only; 2: forward and backward), `...` broadcastable leading dimensions.

Each channel c expands its input into h dimensions and runs a damped EMA on each::

    u_t = beta * x_t                                  (beta in R^h)
    s_t = alpha * u_t + (1 - alpha * delta) * s_{t-1}  (alpha, delta in (0, 1)^h, s_{-1} = 0)
    y_t = eta . s_t                                   (eta in R^h)

Unrolled, y is a causal convolution of x with the kernel

    k_t = sum_j eta_j alpha_j beta_j (1 - alpha_j delta_j)^t,    t = 0 .. L-1.

The bidirectional form (Mega's variant for non-causal data) adds a second EMA with its own
(alpha, delta, beta, eta) run from the end of the sequence back to its start:
y_t = sum_s kf_s x_{t-s} + sum_s kb_s x_{t+s}, both sums over s >= 0 (so both kernels weigh
x_t itself). `omega * x` is Mega's residual term.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fftconv import _fast_length

__all__ = ["ema", "ema_kernel", "ema_ref"]


def _check_params(x: Tensor | None, alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor) -> None:
    for name, t in (("alpha", alpha), ("delta", delta), ("beta", beta), ("eta", eta)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            kind = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a real floating-point tensor, got {kind}")
        if t.shape != alpha.shape:
            raise ValueError(f"{name}: expected the shape of alpha {tuple(alpha.shape)}, got {tuple(t.shape)}")
    if x is None:
        if alpha.ndim < 2:
            raise ValueError(f"alpha: expected shape (..., C, h), got {tuple(alpha.shape)}")
        return
    if alpha.ndim != 3 or alpha.shape[0] not in (1, 2):
        raise ValueError(f"alpha: expected shape (D, C, h) with D = 1 or 2 directions, got {tuple(alpha.shape)}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != alpha.shape[1]:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a real floating-point (B, L, C) tensor with C={alpha.shape[1]}, got {shape}")
    if x.shape[1] < 1:
        raise ValueError(f"x: expected a sequence of length L >= 1, got L={x.shape[1]}")


def _check_omega(omega: Tensor | None, channels: int) -> None:
    if omega is not None and (not isinstance(omega, Tensor) or omega.shape != (channels,)):
        shape = tuple(omega.shape) if isinstance(omega, Tensor) else type(omega).__name__
        raise ValueError(f"omega: expected None or shape (C,) with C={channels}, got {shape}")


def ema_kernel(alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor, length: int) -> Tensor:
    """The EMA kernel in closed form: k_t = sum_j eta_j alpha_j beta_j (1 - alpha_j delta_j)^t.

    Args:
        alpha, delta: (..., C, h) in (0, 1) (Mega: sigmoids of the parameters).
        beta, eta: (..., C, h).
        length: L, taps, >= 1.

    Returns:
        (..., C, L) in the inputs' dtype.
    """
    _check_params(None, alpha, delta, beta, eta)
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length: expected an integer >= 1, got {length!r}")
    # q^t = exp(t log q) for the decay q = 1 - alpha delta of each state; q = 0 (alpha = delta = 1,
    # a saturated sigmoid) is clamped to the smallest normal number, whose powers t >= 1 vanish
    log_q = torch.log((1 - alpha * delta).clamp_min(torch.finfo(alpha.dtype).tiny))  # (..., C, h)
    steps = torch.arange(length, dtype=log_q.dtype, device=log_q.device)
    powers = torch.exp(log_q[..., None] * steps)  # (..., C, h, L)
    weight = (eta * alpha * beta)[..., None, :]  # (..., C, 1, h)
    return (weight @ powers)[..., 0, :]


def _circular_kernel(kernels: Tensor, size: int) -> Tensor:
    """(D, C, L) one-sided kernels -> (C, size) circular kernel of lags -(L-1)..L-1, lag 0 at index 0."""
    forward = kernels[0]
    length = forward.shape[-1]
    zeros = forward.new_zeros(forward.shape[0], size - length - (length - 1 if kernels.shape[0] == 2 else 0))
    if kernels.shape[0] == 1:
        return torch.cat([forward, zeros], -1)
    backward = kernels[1]
    # lag -s (input s steps ahead) sits at index size - s
    return torch.cat([forward[:, :1] + backward[:, :1], forward[:, 1:], zeros, backward[:, 1:].flip(-1)], -1)


class _SequenceConv(torch.autograd.Function):
    """y = irfft(rfft(x, M) * S, M)[:L] along dim 1 of (B, L, C), with a hand-written backward.

    The backward is the adjoint pipeline with conj(S) (a correlation), which costs what the
    forward costs; autograd through the zero-padded rfft would run a full complex transform.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spectrum: Tensor, size: int) -> Tensor:  # x (B, L, C), spectrum (M//2+1, C)
        xf = torch.fft.rfft(x, n=size, dim=1)
        ctx.size, ctx.length = size, x.shape[1]
        ctx.save_for_backward(spectrum, xf if spectrum.requires_grad else None)
        return torch.fft.irfft(xf * spectrum, n=size, dim=1)[:, : x.shape[1]]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        spectrum, xf = ctx.saved_tensors
        size, length = ctx.size, ctx.length
        gf = torch.fft.rfft(grad, n=size, dim=1)
        grad_x = torch.fft.irfft(gf * spectrum.conj(), n=size, dim=1)[:, :length] if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # gradient of the onesided irfft: the adjoint transform over M, the bins that stand for
            # two conjugate frequencies counted twice
            gf = gf / size
            gf[:, 1 : size - gf.shape[1] + 1] *= 2
            grad_s = (gf * xf.conj()).sum(0)
        return grad_x, grad_s, None


def ema(
    x: Tensor, alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor, omega: Tensor | None = None
) -> Tensor:
    """Multi-dimensional damped EMA by its closed-form kernel and a zero-padded FFT convolution.

    Runs in float32 for half-precision inputs (and under autocast) and returns x.dtype.

    Args:
        x: (B, L, C), L >= 1.
        alpha, delta: (D, C, h) in (0, 1); direction 0 runs forward, direction 1 (if D = 2)
            backward from the end of the sequence.
        beta, eta: (D, C, h).
        omega: None or (C,): adds omega * x.

    Returns:
        (B, L, C).
    """
    _check_params(x, alpha, delta, beta, eta)
    _check_omega(omega, x.shape[-1])
    length = x.shape[1]
    if x.shape[0] == 0:  # the FFT backends reject empty batches
        return x.clone()
    work = torch.promote_types(x.dtype, alpha.dtype)
    if work in (torch.float16, torch.bfloat16):
        work = torch.float32
    with torch.autocast(x.device.type, enabled=False):
        kernels = ema_kernel(*(t.to(work) for t in (alpha, delta, beta, eta)), length)  # (D, C, L)
        size = _fast_length(2 * length - 1)  # no wrap-around into the L outputs for lags up to L-1
        spectrum = torch.fft.rfft(_circular_kernel(kernels, size), dim=-1).transpose(0, 1)  # (size // 2 + 1, C)
        y = _SequenceConv.apply(x.to(work), spectrum, size)
        if omega is not None:
            y = y + x.to(work) * omega.to(work)
    return y.to(x.dtype)


def ema_ref(
    x: Tensor, alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor, omega: Tensor | None = None
) -> Tensor:
    """Reference: the EMA recurrence of the Mega paper, one step at a time, per direction.

    Same contract as `ema`. Slow (L Python steps per direction); for tests.
    """
    _check_params(x, alpha, delta, beta, eta)
    _check_omega(omega, x.shape[-1])
    out = torch.zeros_like(x) if omega is None else x * omega
    for direction in range(alpha.shape[0]):
        a, d, b, e = alpha[direction], delta[direction], beta[direction], eta[direction]  # (C, h)
        seq = x if direction == 0 else x.flip(1)
        state = x.new_zeros(x.shape[0], *a.shape)  # (B, C, h)
        ys = []
        for t in range(x.shape[1]):
            u = b * seq[:, t, :, None]  # the h-dimensional expansion of x_t
            state = a * u + (1 - a * d) * state
            ys.append((e * state).sum(-1))
        y = torch.stack(ys, 1)
        out = out + (y if direction == 0 else y.flip(1))
    return out
