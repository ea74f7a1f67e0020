"""Mega's multi-dimensional damped EMA (Ma et al., ICLR 2023) as a spatial layer on the
row-major patch sequence (docs/math.md §12).

Glossary: B batch, H x W grid, L = H * W, C = dim channels, h = ndim expansion, D directions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import ema, ema_kernel, ema_ref
from .checks import check_grid_input, check_positive_ints
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["MegaEMA"]


class MegaEMA(TaggedModule):
    """y = EMA(x) + omega * x along the flattened (row-major) patch sequence, per channel.

    Each channel has, per direction, an h-dimensional expansion beta, damping alpha and decay
    delta (alpha = sigmoid(alpha_raw), delta = sigmoid(delta_raw)) and an output projection
    eta / sqrt(h): the kernel k_t = sum_j eta_j alpha_j beta_j (1 - alpha_j delta_j)^t / sqrt(h)
    (docs/math.md §12). The bidirectional layer, Mega's variant for images, has two independent sets
    of these four parameters, one for the forward and one for the backward pass over the
    sequence (Mega stores them as one set for 2C channels; keeping a leading direction axis is
    the same thing), and one omega. Input and output are (B, H, W, C), any H x W.

    Args:
        dim: channels C.
        ndim: h, the expansion dimension (Mega: 16 for images).
        bidirectional: forward and backward EMA (default); False is causal along the sequence.
        skip: add omega * x.

    Attributes:
        fast_path: closed-form kernel and FFT convolution when True (default); the recurrence,
            one step at a time, when False.
    """

    def __init__(self, dim: int, ndim: int = 16, bidirectional: bool = True, skip: bool = True) -> None:
        super().__init__()
        check_positive_ints(dim=dim, ndim=ndim)
        self.dim, self.ndim, self.bidirectional = dim, ndim, bidirectional
        self.fast_path = True
        directions = 2 if bidirectional else 1
        self.alpha_raw = nn.Parameter(torch.empty(directions, dim, ndim))
        self.delta_raw = nn.Parameter(torch.empty(directions, dim, ndim))
        self.beta = nn.Parameter(torch.empty(directions, dim, ndim))
        self.eta = nn.Parameter(torch.empty(directions, dim, ndim))
        self.omega = nn.Parameter(torch.empty(dim)) if skip else None
        self._tag_parameters()
        self.reset_parameters()

    def _tag_parameters(self) -> None:
        for p in self.parameters():
            p._optim = NO_WEIGHT_DECAY  # as Mega: the EMA parameters skip weight decay

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mega's initialization: alpha_raw, delta_raw ~ N(0, 0.2) (sigmoids near 1/2); beta ~
        N(0, 0.02) plus +1, -1, +1, ... over the h dimensions; eta, omega ~ N(0, 1)."""
        self.alpha_raw.normal_(0.0, 0.2)
        self.delta_raw.normal_(0.0, 0.2)
        signs = torch.ones(self.ndim)
        signs[1::2] = -1.0
        self.beta.normal_(0.0, 0.02).add_(signs)
        self.eta.normal_(0.0, 1.0)
        if self.omega is not None:
            self.omega.normal_(0.0, 1.0)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: eta = 0 (the kernels vanish) and omega = 1."""
        if self.omega is None:
            raise ValueError("reset_to_identity: expected skip=True (the EMA alone cannot be the identity), got False")
        self.eta.zero_()
        self.omega.fill_(1.0)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """alpha, delta in (0, 1), beta and eta / sqrt(h): each (D, C, h)."""
        alpha, delta = torch.sigmoid(self.alpha_raw), torch.sigmoid(self.delta_raw)
        return alpha, delta, self.beta, self.eta * self.ndim**-0.5

    def kernels(self, length: int) -> Tensor:
        """The one-sided kernel of every direction and channel: (D, C, L)."""
        return ema_kernel(*self.coefficients(), length)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        params, omega = self.coefficients(), self.omega
        if self.fast_path:  # computes in the wider of the two dtypes, at least float32
            y = ema(x.flatten(1, 2), *params, omega)
        else:
            y = ema_ref(x.flatten(1, 2), *(p.to(x.dtype) for p in params), None if omega is None else omega.to(x.dtype))
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ndim={self.ndim}, bidirectional={self.bidirectional}, fast_path={self.fast_path}"

