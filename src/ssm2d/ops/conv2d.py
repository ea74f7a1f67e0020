"""Depthwise 2-D convolution with causal kernels run from several corners (spec sections 6-7).

Glossary: B batch, H x W grid, C channels, d directions, kh x kw causal kernel size.

A causal kernel k (offsets p, q >= 0) run from a corner means: flip the input so that corner
becomes the top-left, convolve causally, flip back. Direction order, so that d = 2 is a prefix
of d = 4: top-left, bottom-right, top-right, bottom-left. All directions fold into one centered
(2kh-1) x (2kw-1) kernel, applied once, by zero-padded FFT or by a direct depthwise convolution.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "DIRECTION_FLIPS",
    "choose_conv_method",
    "direct_conv2d",
    "directional_conv2d",
    "directional_conv2d_ref",
    "fft_conv2d",
    "fft_shape",
    "fold_directions",
    "kernel_spectrum",
]

ConvMethod = Literal["auto", "fft", "direct"]

# Grid axes (of a (B, H, W, C) tensor) flipped to bring each corner to the top-left.
DIRECTION_FLIPS: tuple[tuple[int, ...], ...] = ((), (1, 2), (2,), (1,))

# The direct depthwise convolution wins while its multiply count is below this multiple of
# M1 * M2 * log2(M1 * M2). With a backward (layer forward+backward at B=64, C=192 on 2 CPU
# cores) direct is faster up to 5 x 5 and 2 x 16, the FFT from 6 x 6 and 4 x 12 on: the
# depthwise weight gradient is slow. Forward only (B = 8 and 64, C = 64 and 192), direct is
# faster up to 24 x 24 with a whole-grid kernel, even at 28 x 28, and slower from 32 x 32.
_DIRECT_COST_RATIO = {True: 3.5, False: 60.0}  # keyed on "a backward follows"

# Spectrum bytes per channel block of the FFT convolution (see `_SpectralConv`). At B=64 on
# 2 CPU cores, 2 MB blocks made forward+backward 3-4x faster than whole-tensor transforms.
_BLOCK_BYTES = 2 << 20


def _check_kernels(kernels: Tensor) -> None:
    if kernels.ndim != 4 or kernels.shape[0] not in (1, 2, 4):
        raise ValueError(f"kernels: expected shape (d, C, kh, kw) with d in (1, 2, 4), got {tuple(kernels.shape)}")


def _check_input(x: Tensor, channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"x: expected shape (B, H, W, C) with C={channels}, got {tuple(x.shape)}")


def fold_directions(kernels: Tensor) -> Tensor:
    """Fold per-direction causal kernels into one centered kernel.

    Args:
        kernels: (d, C, kh, kw), d in (1, 2, 4), in the direction order of `DIRECTION_FLIPS`.

    Returns:
        (C, 2kh-1, 2kw-1); entry (kh-1+p, kw-1+q) weighs the input at offset (-p, -q).
    """
    _check_kernels(kernels)
    d, c, kh, kw = kernels.shape
    full = kernels.new_zeros(c, 2 * kh - 1, 2 * kw - 1)
    full[:, kh - 1 :, kw - 1 :] += kernels[0]  # top-left: offsets (p, q)
    if d > 1:
        full[:, :kh, :kw] += kernels[1].flip(-2, -1)  # bottom-right: (-p, -q)
    if d > 2:
        full[:, kh - 1 :, :kw] += kernels[2].flip(-1)  # top-right: (p, -q)
        full[:, :kh, kw - 1 :] += kernels[3].flip(-2)  # bottom-left: (-p, q)
    return full


def _fast_length(n: int) -> int:
    """Smallest even 7-smooth integer >= n (sizes pocketfft handles fastest)."""
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def fft_shape(grid: tuple[int, int], kernel_size: tuple[int, int]) -> tuple[int, int]:
    """FFT size for a linear (non-circular) convolution of an H x W grid with a centered kernel.

    A centered kernel of radius kh-1 needs at least H + kh - 1 points (2H - 1 for kh = H).
    """
    return _fast_length(grid[0] + kernel_size[0] - 1), _fast_length(grid[1] + kernel_size[1] - 1)


def choose_conv_method(
    grid: tuple[int, int], kernel_size: tuple[int, int], backward: bool = True
) -> Literal["fft", "direct"]:
    """The faster convolution path for this grid and causal kernel size, from a cost model.

    `backward`: whether a backward pass follows (training); inference favours the direct path.
    """
    m1, m2 = fft_shape(grid, kernel_size)
    direct = grid[0] * grid[1] * (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    fft = m1 * m2 * math.log2(m1 * m2)
    return "direct" if direct <= _DIRECT_COST_RATIO[bool(backward)] * fft else "fft"


def kernel_spectrum(kernel: Tensor, shape: tuple[int, int]) -> Tensor:
    """Spectrum of a centered kernel for `fft_conv2d`.

    Args:
        kernel: (C, 2kh-1, 2kw-1) centered, real.
        shape: (M1, M2) from `fft_shape`.

    Returns:
        (C, M1, M2 // 2 + 1) complex, with the kernel center rolled to index (0, 0).
    """
    _, kh2, kw2 = kernel.shape
    m1, m2 = shape
    padded = F.pad(kernel, (0, m2 - kw2, 0, m1 - kh2))
    circular = padded.roll((-(kh2 // 2), -(kw2 // 2)), dims=(-2, -1))
    return torch.fft.rfft2(circular)


def _forward_transform(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """(B, C, H, W) real -> (B, C, M1, M2//2+1): zero-padded rfft2, skipping the zero rows."""
    return torch.fft.fft(torch.fft.rfft(x, n=shape[1], dim=-1), n=shape[0], dim=-2)


def _inverse_transform(z: Tensor, grid: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """(B, C, M1, M2//2+1) -> (B, C, H, W): irfft2 cropped, inverting only the kept rows."""
    return torch.fft.irfft(torch.fft.ifft(z, dim=-2)[..., : grid[0], :], n=shape[1], dim=-1)[..., : grid[1]]


def _channel_blocks(batch: int, channels: int, shape: tuple[int, int]) -> list[slice]:
    """Channel slices whose spectra take about `_BLOCK_BYTES` each."""
    per_channel = batch * shape[0] * (shape[1] // 2 + 1) * 8
    step = max(1, _BLOCK_BYTES // per_channel)
    return [slice(c, min(c + step, channels)) for c in range(0, channels, step)]


class _SpectralConv(torch.autograd.Function):
    """y = crop(irfft2(rfft2(pad(x)) * S)), a block of channels at a time, with a hand-written
    backward.

    Blocks keep every temporary small enough to be reused from the heap and to stay in
    cache; whole-tensor transforms spend most of their time faulting in fresh pages. The
    backward is the adjoint pipeline with conj(S) (a correlation), which costs what the
    forward costs; autograd through rfft2 would instead run a full complex transform of a
    zero-filled tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spectrum: Tensor, shape: tuple[int, int]) -> Tensor:  # x: (B, H, W, C)
        b, h, w, c = x.shape
        out = torch.empty_like(x)
        saved = []
        for blk in _channel_blocks(b, c, shape):
            xf = _forward_transform(x[..., blk].permute(0, 3, 1, 2).contiguous(), shape)  # (B, c, M1, M2//2+1)
            if spectrum.requires_grad:
                saved.append(xf)
            out[..., blk] = _inverse_transform(xf * spectrum[blk], (h, w), shape).permute(0, 2, 3, 1)
        ctx.shape = shape
        ctx.save_for_backward(spectrum, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        spectrum, *saved = ctx.saved_tensors
        b, h, w, c = grad.shape
        m1, m2 = ctx.shape
        need_x, need_s = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(grad) if need_x else None
        grad_s = torch.empty_like(spectrum) if need_s else None
        for i, blk in enumerate(_channel_blocks(b, c, ctx.shape)):
            gf = _forward_transform(grad[..., blk].permute(0, 3, 1, 2).contiguous(), ctx.shape)
            if need_x:
                grad_x[..., blk] = _inverse_transform(gf * spectrum[blk].conj(), (h, w), ctx.shape).permute(0, 2, 3, 1)
            if need_s:
                # Gradient of the onesided irfft2: the adjoint transform scaled by 1/(M1 M2),
                # with the columns that stand for two conjugate frequencies counted twice.
                gf = gf / (m1 * m2)
                gf[..., 1 : m2 - gf.shape[-1] + 1] *= 2
                grad_s[blk] = (gf * saved[i].conj()).sum(0)
        return grad_x, grad_s, None


def fft_conv2d(x: Tensor, spectrum: Tensor, shape: tuple[int, int]) -> Tensor:
    """Linear depthwise convolution by zero-padded FFT.

    Runs in float32 for half-precision inputs (and under autocast) and returns x.dtype.

    Args:
        x: (B, H, W, C).
        spectrum: (C, M1, M2 // 2 + 1) from `kernel_spectrum`.
        shape: (M1, M2).

    Returns:
        (B, H, W, C).
    """
    _check_input(x, spectrum.shape[0])
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        y = _SpectralConv.apply(x.to(work), spectrum, shape)
    return y.to(x.dtype)


def direct_conv2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Linear depthwise convolution with a centered kernel, by `F.conv2d` (channels-last).

    Args:
        x: (B, H, W, C).
        kernel: (C, 2kh-1, 2kw-1) centered.

    Returns:
        (B, H, W, C).
    """
    c, kh2, kw2 = kernel.shape
    _check_input(x, c)
    weight = kernel.flip(-2, -1)[:, None].to(x.dtype)  # conv2d correlates: flip to convolve
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=(kh2 // 2, kw2 // 2), groups=c)
    return y.permute(0, 2, 3, 1)


def directional_conv2d(x: Tensor, kernels: Tensor, method: ConvMethod = "auto") -> Tensor:
    """Sum over directions of flip -> causal depthwise convolution -> flip back.

    Args:
        x: (B, H, W, C).
        kernels: (d, C, kh, kw) causal kernels, d in (1, 2, 4).
        method: "fft", "direct", or "auto" (`choose_conv_method`).

    Returns:
        (B, H, W, C).
    """
    _check_kernels(kernels)
    _check_input(x, kernels.shape[1])
    grid, ksize = (x.shape[1], x.shape[2]), (kernels.shape[2], kernels.shape[3])
    if method == "auto":
        method = choose_conv_method(grid, ksize)
    full = fold_directions(kernels)
    if method == "fft":
        shape = fft_shape(grid, ksize)
        return fft_conv2d(x, kernel_spectrum(full, shape), shape)
    if method == "direct":
        return direct_conv2d(x, full)
    raise ValueError(f"method: expected 'auto', 'fft' or 'direct', got {method!r}")


def directional_conv2d_ref(x: Tensor, kernels: Tensor) -> Tensor:
    """Reference for `directional_conv2d`: explicit flips and a shift-and-add causal sum.

    Same arguments (without `method`) and result. Slow: d * kh * kw tensor operations.
    """
    _check_kernels(kernels)
    _check_input(x, kernels.shape[1])
    _, h, w, _ = x.shape
    out = torch.zeros_like(x)
    for k, dims in zip(kernels, DIRECTION_FLIPS[: len(kernels)], strict=True):
        xf = x.flip(dims) if dims else x
        y = torch.zeros_like(x)
        for p in range(min(k.shape[1], h)):
            for q in range(min(k.shape[2], w)):
                # y(i, j) += k(p, q) x(i - p, j - q)
                y[:, p:, q:, :] += k[:, p, q] * xf[:, : h - p, : w - q, :]
        out = out + (y.flip(dims) if dims else y)
    return out
