"""S4ND (Nguyen et al., NeurIPS 2022) as a 2-D spatial layer: a depthwise global convolution
whose kernel is the outer product of two bidirectional S4D kernels, one per axis.

Glossary: B batch, H x W grid, C = dim channels, N states (N / 2 complex modes per axis),
G = `channels` kernels per input channel. The math is docs/math.md §8.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops import s4d_kernel, s4d_kernel_ref, separable_conv2d, separable_conv2d_ref
from .checks import check_grid_input, check_positive_ints
from .ssm2d import _pair_or_none
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["S4ND"]


def _check_rate(rate: float) -> float:
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not (0 < rate < math.inf):
        raise ValueError(f"rate: expected a finite number > 0 (base resolution / current resolution), got {rate!r}")
    return float(rate)


def _centered(forward: Tensor, backward: Tensor | None) -> Tensor:
    """(..., L) one-sided kernels -> (..., 2L-1) centered: offsets -(L-1)..L-1.

    The backward kernel's tap j weighs the input j + 1 cells ahead (docs/math.md §8, bidirectional kernels):
    y[i] = sum_j forward[j] u[i - j] + backward[j] u[i + j + 1]. Its last tap never reaches
    an L-cell grid and is dropped. Without a backward kernel the layer is causal on each axis.
    """
    length = forward.shape[-1]
    ahead = forward.new_zeros(*forward.shape[:-1], length - 1) if backward is None else backward[..., : length - 1]
    return torch.cat([ahead.flip(-1), forward], -1)


class S4ND(TaggedModule):
    """S4ND spatial layer (docs/math.md §8): y = K * x + D x per channel, with K[p, q] = k_h[p] k_w[q].

    Each axis has its own S4D kernel generator (diagonal A, ZOH): A and B are shared
    by all channels (n_ssm = 1), C and dt are per channel. With `bidirectional` each axis has a
    forward and a backward kernel, so the 2-D kernel covers all four quadrants while staying rank
    1 per channel. The kernel is applied by FFT (or, for short truncated kernels, directly).

    Input and output are (B, H, W, C), any H x W.

    Args:
        dim: channels C.
        state_dim: N states per axis, N / 2 complex modes (conjugate pairs); even. Spec default 64.
        channels: G kernels per input channel; with G > 1 the G C outputs are mixed back to C
            by the output linear (`linear=False` only).
        bidirectional: forward and backward kernel per axis (the S4ND default); False is causal.
        kernel_size: taps per axis and direction at rate 1 (int or (kh, kw)), S4ND's `l_max`: the
            kernel spans (2kh-1) x (2kw-1) cells and round(k / rate) taps at another rate
            (docs/math.md §8). None (default): the whole grid, a global kernel.
        bandlimit: None (default: training at one resolution), or alpha > 0: zero the
            modes at or above alpha / 2 cycles per sample at rate 1 (docs/math.md §8; alpha = 0.2 in the
            zero-shot resolution config).
        rate: base resolution / current resolution (docs/math.md §8): 0.5 for a model trained on G x G
            grids run on 2G x 2G. Also an attribute, and `forward(x, rate=...)` overrides it.
        dt_min, dt_max: range of the log-uniform step-size init ([0.1, 1] in the image
            configs).
        linear: True (default): a pure depthwise convolution with the D skip (ConvNeXt-S4ND),
            needs channels=1. False: GELU -> dropout -> Linear(G C -> C) after it (docs/math.md §8).
        glu: with linear=False, the output linear gives 2C and a GLU halves it (ViT-S4ND).
        dropout: with linear=False, dropout after the GELU.

    Attributes:
        fast_path: Vandermonde kernels and FFT/direct separable convolution when True (default);
            the ZOH recurrence and the shift-and-add convolution when False.
        conv_method: "auto" (cost model of `choose_conv_method`), "fft" or "direct".
        rate: see Args.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 64,
        channels: int = 1,
        bidirectional: bool = True,
        kernel_size: int | tuple[int, int] | None = None,
        bandlimit: float | None = None,
        rate: float = 1.0,
        dt_min: float = 0.1,
        dt_max: float = 1.0,
        linear: bool = True,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, channels=channels)
        if not isinstance(state_dim, int) or isinstance(state_dim, bool) or state_dim < 2 or state_dim % 2:
            raise ValueError(f"state_dim: expected an even integer >= 2 (conjugate pairs), got {state_dim!r}")
        if bandlimit is not None and (
            not isinstance(bandlimit, numbers.Real) or isinstance(bandlimit, bool) or not 0 < bandlimit < math.inf
        ):
            raise ValueError(f"bandlimit: expected None or a finite number > 0, got {bandlimit!r}")
        if not (isinstance(dt_min, numbers.Real) and isinstance(dt_max, numbers.Real) and 0 < dt_min <= dt_max):
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min!r} and {dt_max!r}")
        if not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        if linear and (channels != 1 or glu or dropout):
            raise ValueError(
                "linear=True is a pure depthwise convolution: expected channels=1, glu=False and dropout=0, got "
                f"channels={channels}, glu={glu} and dropout={dropout}"
            )
        self.dim, self.state_dim, self.channels, self.bidirectional = dim, state_dim, channels, bidirectional
        self.kernel_size = _pair_or_none(kernel_size)
        self.bandlimit = None if bandlimit is None else float(bandlimit)
        self.rate = _check_rate(rate)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.linear, self.glu = linear, glu
        self.fast_path = True
        self.conv_method: Literal["auto", "fft", "direct"] = "auto"

        modes, sides = state_dim // 2, 2 if bidirectional else 1
        # Axis 0 runs down the rows (H), axis 1 along the columns (W); complex values as (real, imag).
        self.log_dt = nn.Parameter(torch.empty(2, dim))
        self.log_A_real = nn.Parameter(torch.empty(2, 1, modes))  # A = -exp(log_A_real) + i A_imag
        self.A_imag = nn.Parameter(torch.empty(2, 1, modes))
        self.B = nn.Parameter(torch.empty(2, 1, modes, 2))
        self.C = nn.Parameter(torch.empty(2, sides * channels, dim, modes, 2))  # (axis, (side G), C, N/2, 2)
        self.D = nn.Parameter(torch.empty(channels, dim))
        self._tag_parameters()
        if linear:
            self.dropout, self.output_linear = nn.Identity(), nn.Identity()
        else:
            self.dropout = nn.Dropout(dropout)
            self.output_linear = nn.Linear(channels * dim, (2 if glu else 1) * dim)
        self.reset_parameters()

    def _tag_parameters(self) -> None:
        # Spec 1.1: A, B and dt get no weight decay (S4 convention); so does the skip D. C decays.
        for p in (self.log_dt, self.log_A_real, self.A_imag, self.B, self.D):
            p._optim = NO_WEIGHT_DECAY

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of docs/math.md §8: S4D-Lin A, B = 1, log-uniform dt, complex normal C, normal D."""
        modes = self.state_dim // 2
        self.log_dt.uniform_(math.log(self.dt_min), math.log(self.dt_max))
        self.log_A_real.fill_(math.log(0.5))  # S4D-Lin (`diag-lin`): A_n = -1/2 + i pi n
        self.A_imag.copy_(math.pi * torch.arange(modes, dtype=self.A_imag.dtype).expand_as(self.A_imag))
        self.B.zero_()[..., 0] = 1.0
        self.C.normal_(0.0, math.sqrt(0.5))  # complex randn: E|C|^2 = 1
        self.D.normal_(0.0, 1.0)
        if isinstance(self.output_linear, nn.Linear):
            self.output_linear.reset_parameters()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: D = 1 and C = 0 (the kernels vanish).

        Used to insert layers into a trained model without changing its outputs; A, B and dt keep
        their initialization, so fine-tuning moves C away from zero.
        """
        if not self.linear:
            raise ValueError("reset_to_identity: expected linear=True (GELU and the output linear are not identities)")
        self.C.zero_()
        self.D.fill_(1.0)

    def kernel_grid(self, grid: tuple[int, int], rate: float | None = None) -> tuple[int, int]:
        """Taps (kh, kw) per axis and direction on an H x W grid: min(grid, round(kernel_size / rate))."""
        if self.kernel_size is None:
            return grid
        rate = self.rate if rate is None else _check_rate(rate)
        return tuple(min(g, max(1, round(k / rate))) for g, k in zip(grid, self.kernel_size))

    def axis_kernels(self, grid: tuple[int, int], rate: float | None = None) -> tuple[Tensor, Tensor]:
        """Centered 1-D kernels k_h: (G C, 2kh-1) and k_w: (G C, 2kw-1), (kh, kw) = `kernel_grid`.

        Row g C + c is kernel g of channel c. Computed in at least float32, with autocast off.
        """
        rate = self.rate if rate is None else _check_rate(rate)
        taps = self.kernel_grid(grid, rate)
        with torch.autocast(self.C.device.type, enabled=False):
            params = (self.log_dt, self.log_A_real, self.A_imag, self.B, self.C)
            if self.C.dtype in (torch.float16, torch.bfloat16):
                params = tuple(p.float() for p in params)
            log_dt, log_a_real, a_imag, b, c = params
            kernel_fn = s4d_kernel if self.fast_path else s4d_kernel_ref
            cb = torch.view_as_complex(c) * torch.view_as_complex(b)[:, None]  # (2, sides G, C, N/2): C_n B_n
            k = kernel_fn(
                log_dt[:, None], -torch.exp(log_a_real)[:, None], a_imag[:, None], cb, max(taps), rate, self.bandlimit
            )  # (2, sides G, C, L)
        axes = []
        for axis, length in enumerate(taps):
            one_sided = k[axis, ..., :length]  # (sides G, C, length)
            backward = one_sided[self.channels :] if self.bidirectional else None
            axes.append(_centered(one_sided[: self.channels], backward).flatten(0, 1))  # (G C, 2 length - 1)
        return axes[0], axes[1]

    def kernel(self, grid: tuple[int, int], rate: float | None = None) -> Tensor:
        """The 2-D kernel K[g C + c, p, q] = k_h[g C + c, p] k_w[g C + c, q]: (G C, 2kh-1, 2kw-1), centered."""
        k_h, k_w = self.axis_kernels(grid, rate)
        return k_h[:, :, None] * k_w[:, None, :]

    def forward(self, x: Tensor, rate: float | None = None) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C). `rate` overrides the `rate` attribute for this call."""
        check_grid_input(x, self.dim)
        if self.fast_path and self.conv_method not in ("auto", "fft", "direct"):
            raise ValueError(f"conv_method: expected 'auto', 'fft' or 'direct', got {self.conv_method!r}")
        k_h, k_w = self.axis_kernels((x.shape[1], x.shape[2]), rate)  # the convolution casts them
        u = x.repeat(1, 1, 1, self.channels) if self.channels > 1 else x  # (B, H, W, G C), channel g C + c
        if self.fast_path:
            y = separable_conv2d(u, k_h, k_w, self.conv_method)
        else:
            y = separable_conv2d_ref(u, k_h, k_w)
        y = y + u * self.D.flatten().to(x.dtype)  # (B, H, W, G C)
        if self.linear:
            return y
        y = self.output_linear(self.dropout(F.gelu(y)))  # (B, H, W, C or 2C)
        return F.glu(y, dim=-1) if self.glu else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, channels={self.channels}, "
            f"bidirectional={self.bidirectional}, kernel_size={self.kernel_size}, bandlimit={self.bandlimit}, "
            f"rate={self.rate}, dt_min={self.dt_min}, dt_max={self.dt_max}, linear={self.linear}, glu={self.glu}, "
            f"fast_path={self.fast_path}, conv_method={self.conv_method!r}"
        )
