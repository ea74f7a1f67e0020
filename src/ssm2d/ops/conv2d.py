"""Depthwise 2-D convolution with causal kernels run from several corners (docs/math.md §6).

Glossary: B batch, H x W grid, C channels, d directions, kh x kw causal kernel size.

A causal kernel k (offsets p, q >= 0) run from a corner means: flip the input so that corner
becomes the top-left, convolve causally, flip back. Direction order, so that d = 2 is a prefix
of d = 4: top-left, bottom-right, top-right, bottom-left. All directions fold into one centered
(2kh-1) x (2kw-1) kernel, applied once, by zero-padded FFT or by a direct depthwise convolution.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .fftconv import _check_input, _fast_length, correlate_sum, fft_conv2d, fft_shape, kernel_spectrum

__all__ = [
    "DIRECTION_FLIPS",
    "choose_conv_method",
    "direct_conv2d",
    "directional_conv2d",
    "directional_conv2d_ref",
    "fold_directions",
]

ConvMethod = Literal["auto", "fft", "direct"]

# Grid axes (of a (B, H, W, C) tensor) flipped to bring each corner to the top-left.
DIRECTION_FLIPS: tuple[tuple[int, ...], ...] = ((), (1, 2), (2,), (1,))

# The conv-path rule (`choose_conv_method`, docs/math.md §6.3). Its constants, per device type.
#
# CPU: r = (direct multiply-adds H W kh2 kw2) / (FFT work M1 M2 log2(M1 M2)).
# - Inference: direct up to r = 60. Measured on 2 cores, B = 8 and 64, C = 64 to 192: direct
#   wins for whole-grid kernels up to 24 x 24 (r = 49) and at 28 x 28; the FFT from 32 x 32.
# - Training (a backward follows; the direct path's kernel gradient is a correlation, see
#   `_DirectConv`): direct up to r = 4 on any grid (small truncated kernels: 0.55-0.9x the
#   FFT's time at 32 x 32 and 56 x 56), and up to r = 36 on grids of at most 400 cells
#   (whole-grid kernels up to 20 x 20: 0.7x at 16 x 16, 1.0x at 20 x 20); but not 7 x 7
#   truncations of 32 x 32 grids (r = 10: 1.2-1.8x the FFT's time).
# Re-measured in alternation on the same 2 cores under a load average of 10-14 (C = 96, d = 4,
# direct / FFT time): training 0.51 at 16 x 16 (B = 8), 1.12 / 0.95 at 20 x 20 (B = 8 / 64),
# 0.86 at 24 x 24, 0.62 for 7 x 7 truncations of 32 x 32, 0.70-0.72 for 4 x 4 truncations of
# 32 x 32 and 56 x 56; inference 0.08-0.11 from 24 x 24 to 32 x 32. Under that load the FFT
# (which allocates the most) slowed most, so these numbers favour the direct path more than
# the quiet-machine fit; the constants keep the quiet-machine values.
_CPU_DIRECT_MAX_RATIO_INFERENCE = 60.0
_CPU_DIRECT_MAX_RATIO_TRAINING = 4.0
_CPU_SMALL_GRID_AREA = 400
_CPU_DIRECT_MAX_RATIO_SMALL_GRID = 36.0
# GPUs (CUDA and any other accelerator): direct only for kernels of at most 7 x 7 taps
# (truncated kernels of 4 x 4 cells per direction, the ConvNeXt placement). Reasoning, not a
# measurement (no GPU was at hand): a depthwise convolution is memory-bound only while its
# kernel is small (cuDNN's depthwise kernels are tuned for 3 x 3 to 7 x 7), and its work grows
# with the kernel's area, while cuFFT's batched transforms cost a few passes over the padded
# map whatever the kernel size. Whole-grid kernels, (2H-1) x (2W-1) taps, therefore take the
# FFT on every grid. The GPU paths use plain autograd (`_conv2d`; `_spectral_conv` in fftconv.py).
_GPU_DIRECT_MAX_TAPS = 7
# Kernel gradient of the CPU direct path: one batched matmul over all pairs of cells
# (`_correlate_dense`, C L^2 (a B + b) work for L = H W cells) or the FFT correlation
# (`correlate_sum`, about C B M1 M2 log2(M1 M2)). Fitted on 1 CPU thread, C = 96 to 384,
# B = 8 and 64, grids 4 x 4 to 16 x 16: in FFT units a = 0.067, b = 1.17; the dense way was
# 0.2-0.7x the FFT's time at 8 x 8 to 12 x 12, 0.5-0.7x at 14 x 14 and 16 x 16 with B = 64,
# 1.2-1.6x there with B = 8. Above 256 cells the (C, L, L) product is not tried (256 KB per
# channel).
_DENSE_COST_PER_IMAGE = 0.067
_DENSE_COST_FIXED = 1.17
_DENSE_CORRELATION_MAX_AREA = 256


def _check_kernels(kernels: Tensor) -> None:
    if kernels.ndim != 4 or kernels.shape[0] not in (1, 2, 4):
        raise ValueError(f"kernels: expected shape (d, C, kh, kw) with d in (1, 2, 4), got {tuple(kernels.shape)}")


class _Fold(torch.autograd.Function):
    """`fold_directions` with a hand-written backward: the gradient of each direction is a
    (flipped) window of the folded gradient, stacked in one op. Autograd through a fold made of
    differentiable ops pads or fills a zero tensor per direction and adds them up.

    Benchmark (forward + backward of the fold alone, d = 4, 1 thread, medians of 30-40
    alternating repetitions): C = 192, 8 x 8 cells 0.24 ms here against 0.34 ms by four
    `F.pad`s and 0.40 ms by `torch.cat`s; C = 192, 14 x 14: 0.41-0.47 ms against 0.73 / 0.84 ms;
    C = 96, 32 x 32: 1.1 ms against 6.9 / 6.5 ms.

    The backward is made of differentiable ops (slices, flips, a stack): the Function has
    second derivatives, and compiles.
    """

    @staticmethod
    def forward(ctx, kernels: Tensor, center: Tensor | None) -> Tensor:  # kernels: (d, C, kh, kw), center: (C,)
        d, c, kh, kw = kernels.shape
        full = kernels.new_zeros(c, 2 * kh - 1, 2 * kw - 1)
        full[:, kh - 1 :, kw - 1 :] += kernels[0]  # top-left: offsets (p, q)
        if d > 1:
            full[:, :kh, :kw] += kernels[1].flip(-2, -1)  # bottom-right: (-p, -q)
        if d > 2:
            full[:, kh - 1 :, :kw] += kernels[2].flip(-1)  # top-right: (p, -q)
            full[:, :kh, kw - 1 :] += kernels[3].flip(-2)  # bottom-left: (-p, q)
        if center is not None:
            full[:, kh - 1, kw - 1] += center
        ctx.d, ctx.kh, ctx.kw = d, kh, kw
        return full

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        d, kh, kw = ctx.d, ctx.kh, ctx.kw
        grad_k = grad_c = None
        if ctx.needs_input_grad[0]:
            windows = [
                grad[:, kh - 1 :, kw - 1 :],
                grad[:, :kh, :kw].flip(-2, -1),
                grad[:, kh - 1 :, :kw].flip(-1),
                grad[:, :kh, kw - 1 :].flip(-2),
            ]
            grad_k = torch.stack(windows[:d])  # (d, C, kh, kw)
        if ctx.needs_input_grad[1]:
            grad_c = grad[:, kh - 1, kw - 1]  # (C,)
        return grad_k, grad_c


def fold_directions(kernels: Tensor, center: Tensor | None = None) -> Tensor:
    """Fold per-direction causal kernels into one centered kernel.

    Args:
        kernels: (d, C, kh, kw), d in (1, 2, 4), in the direction order of `DIRECTION_FLIPS`.
        center: optional (C,) added to the center tap (offset (0, 0)), in kernels.dtype; the
            layer folds its skip omega * x in this way.

    Returns:
        (C, 2kh-1, 2kw-1); entry (kh-1+p, kw-1+q) weighs the input at offset (-p, -q).
    """
    _check_kernels(kernels)
    if center is not None and center.shape != kernels.shape[1:2]:
        raise ValueError(f"center: expected shape ({kernels.shape[1]},), got {tuple(center.shape)}")
    return _Fold.apply(kernels, center)


def choose_conv_method(
    grid: tuple[int, int],
    kernel_size: tuple[int, int],
    backward: bool = True,
    device: torch.device | str = "cpu",
) -> Literal["fft", "direct"]:
    """The convolution path for a causal kernel of `kernel_size` cells per direction on `grid`.

    The one rule of docs/math.md §6.3; its constants and their measurements are at the top of
    this module. `backward`: whether a backward pass follows (training), which on a CPU
    favours the FFT. `device`: where the convolution runs; every device type but "cpu" takes
    the GPU rule. Returns "fft" or "direct" for any grid and kernel size >= 1.
    """
    taps = max(2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
    if torch.device(device).type != "cpu":
        return "direct" if taps <= _GPU_DIRECT_MAX_TAPS else "fft"
    m1, m2 = fft_shape(grid, kernel_size)
    direct = grid[0] * grid[1] * (2 * kernel_size[0] - 1) * (2 * kernel_size[1] - 1)
    ratio = direct / (m1 * m2 * math.log2(m1 * m2))
    if not backward:
        return "direct" if ratio <= _CPU_DIRECT_MAX_RATIO_INFERENCE else "fft"
    small_grid = grid[0] * grid[1] <= _CPU_SMALL_GRID_AREA and ratio <= _CPU_DIRECT_MAX_RATIO_SMALL_GRID
    return "direct" if ratio <= _CPU_DIRECT_MAX_RATIO_TRAINING or small_grid else "fft"


class _DirectConv(torch.autograd.Function):
    """Depthwise convolution by `F.conv2d` (channels-last), with a hand-written backward, for
    the CPU.

    The input gradient is the convolution's adjoint, itself a depthwise convolution. The
    kernel gradient is a correlation of the upstream gradient with the input, summed over the
    batch, by FFT or a dense matmul (`_dense_correlation_pays`): the depthwise weight gradient
    of `F.conv2d` is slow on a CPU.

    Benchmark (forward + backward, C = 192, whole-grid kernels, 2 threads, medians of 10
    alternating repetitions): B = 8, 8 x 8: 1.9 ms here against 23 ms by `F.conv2d` under
    autograd; B = 64, 8 x 8: 92 against 207 ms; B = 8, 14 x 14: 100 against 175 ms; B = 64,
    14 x 14: 361 against 1876 ms (a loaded machine: the ratios, 1.8-12x, are what counts).

    The backward is made of differentiable ops: the Function has second derivatives, and
    compiles.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel: Tensor) -> Tensor:  # x: (B, H, W, C), kernel: (C, kh2, kw2)
        ctx.save_for_backward(x, kernel)
        return _conv2d(x, kernel)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, kernel = ctx.saved_tensors
        c, kh2, kw2 = kernel.shape
        grad = grad.contiguous()  # channels-last once permuted: F.conv2d's fast layout here
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            # The adjoint of convolving with k is correlating with k: conv2d with k unflipped.
            gx = F.conv2d(grad.permute(0, 3, 1, 2), kernel[:, None], padding=(kh2 // 2, kw2 // 2), groups=c)
            grad_x = gx.permute(0, 2, 3, 1)
        if ctx.needs_input_grad[1]:
            dense = _dense_correlation_pays(x.shape[0], (x.shape[1], x.shape[2]), (kh2, kw2))
            grad_k = (_correlate_dense if dense else correlate_sum)(grad, x, (kh2, kw2))
        return grad_x, grad_k


def _dense_correlation_pays(batch: int, grid: tuple[int, int], kernel_size: tuple[int, int]) -> bool:
    """Whether `_correlate_dense` beats `correlate_sum` here (cost model above)."""
    area = grid[0] * grid[1]
    if area > _DENSE_CORRELATION_MAX_AREA:
        return False
    m1, m2 = (_fast_length(max(n + k // 2, k)) for n, k in zip(grid, kernel_size, strict=True))  # as correlate_sum
    fft = batch * m1 * m2 * math.log2(m1 * m2)
    return area**2 * (_DENSE_COST_PER_IMAGE * batch + _DENSE_COST_FIXED) <= fft


def _lag_index(h: int, w: int, device: torch.device) -> Tensor:
    """(L * L,) flat position on the (2H-1) x (2W-1) lag grid of each pair (input cell reversed,
    output cell), in the row-major order of the (L, L) product in `_correlate_dense`. Kept per
    size in eager mode; built inside the graph under torch.compile."""
    if torch.compiler.is_compiling():
        return _build_lag_index(h, w, device)
    return _cached_lag_index(h, w, device)


@functools.lru_cache(maxsize=16)
def _cached_lag_index(h: int, w: int, device: torch.device) -> Tensor:
    return _build_lag_index(h, w, device)


def _build_lag_index(h: int, w: int, device: torch.device) -> Tensor:
    cells = (torch.arange(h)[:, None] * (2 * w - 1) + torch.arange(w)).flatten()  # (L,)
    return (cells[:, None] + cells).flatten().to(device)


def _correlate_dense(g: Tensor, x: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """`correlate_sum` by a batched matmul over all pairs of cells, for small grids.

    prod[c, m, l] = sum over b of x[b, L-1-m, c] g[b, l, c] holds every product of an input
    cell and an output cell once; one index_add sums them by lag (reversing the input cells
    turns lags into sums of positions), and the lags are cropped or zero-padded to the kernel
    size. Runs in float32 for half-precision inputs.

    Args:
        g, x: (B, H, W, C).
        kernel_size: (kh2, kw2) = (2 ph + 1, 2 pw + 1).

    Returns:
        (C, kh2, kw2) in x.dtype; entry (ph + s, pw + t) is lag (s, t).
    """
    b, h, w, c = x.shape
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # contiguous (C, B, L): bmm over strided (channels-last) batches copies every matrix, 3.7x slower
    x_rev = x.to(work).flip(1, 2).permute(3, 0, 1, 2).reshape(c, b, h * w).contiguous()  # cells reversed
    g_cells = g.to(work).permute(3, 0, 1, 2).reshape(c, b, h * w).contiguous()
    prod = x_rev.mT @ g_cells  # (C, L, L)
    lags = prod.new_zeros(c, (2 * h - 1) * (2 * w - 1))
    lags.index_add_(1, _lag_index(h, w, x.device), prod.view(c, -1))
    lags = lags.view(c, 2 * h - 1, 2 * w - 1)  # lag (s, t) at (H-1+s, W-1+t)
    dh, dw = kernel_size[0] // 2 - (h - 1), kernel_size[1] // 2 - (w - 1)
    return F.pad(lags, (dw, dw, dh, dh)).to(x.dtype)  # negative padding crops


def _conv2d(x: Tensor, kernel: Tensor) -> Tensor:
    """`F.conv2d` under plain autograd, channels-last (the GPU direct path)."""
    c, kh2, kw2 = kernel.shape
    y = F.conv2d(x.permute(0, 3, 1, 2), kernel.flip(-2, -1)[:, None], padding=(kh2 // 2, kw2 // 2), groups=c)
    return y.permute(0, 2, 3, 1)


def direct_conv2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Linear depthwise convolution with a centered kernel, by `F.conv2d` (channels-last).

    Runs in x.dtype, with autocast off. On a CPU the kernel gradient is a correlation
    (`_DirectConv`); elsewhere autograd differentiates `F.conv2d`.

    Args:
        x: (B, H, W, C).
        kernel: (C, 2kh-1, 2kw-1) centered.

    Returns:
        (B, H, W, C).
    """
    _check_input(x, kernel.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        if x.device.type == "cpu":
            return _DirectConv.apply(x, kernel.to(x.dtype))
        return _conv2d(x, kernel.to(x.dtype))


def directional_conv2d(x: Tensor, kernels: Tensor, method: ConvMethod = "auto") -> Tensor:
    """Sum over directions of flip -> causal depthwise convolution -> flip back.

    Args:
        x: (B, H, W, C).
        kernels: (d, C, kh, kw) causal kernels, d in (1, 2, 4).
        method: "fft", "direct", or "auto" (`choose_conv_method`, told whether autograd will
            need a backward).

    Returns:
        (B, H, W, C).
    """
    _check_kernels(kernels)
    _check_input(x, kernels.shape[1])
    grid, ksize = (x.shape[1], x.shape[2]), (kernels.shape[2], kernels.shape[3])
    if method == "auto":
        backward = torch.is_grad_enabled() and (x.requires_grad or kernels.requires_grad)
        method = choose_conv_method(grid, ksize, backward=backward, device=x.device)
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
