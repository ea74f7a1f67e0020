"""The 2-D state-space layer of Baron, Zimerman & Wolf (ICLR 2024); the math is docs/math.md §1-6.

Glossary: B batch, H x W grid, C = dim channels, N state size, d directions,
S = d * n_ssm (A, B) parameter sets.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import (
    choose_conv_method,
    direct_conv2d,
    directional_conv2d_ref,
    fft_conv2d,
    fft_shape,
    fold_directions,
    kernel_spectrum,
    roesser_kernel,
    roesser_kernel_ref,
)
from .cache import ParameterCache
from .checks import check_grid_input, check_positive_ints
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["SSM2D"]


def _pair_or_none(kernel_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if kernel_size is None:
        return None
    pair = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in pair)
    ):
        raise ValueError(f"kernel_size: expected None, an integer >= 1 or a pair of them, got {kernel_size!r}")
    return tuple(pair)


class SSM2D(TaggedModule):
    """2-D SSM spatial layer: a learned global kernel per channel, from d corners.

    Input and output are (B, H, W, C), any H x W. The kernels of all directions are folded
    into one (2H-1) x (2W-1) kernel and applied once, by FFT or, on small grids, by a direct
    depthwise convolution. In eval mode the prepared kernel is cached per grid size.

    Args:
        dim: channels C.
        state_dim: states N per (A, B) set.
        n_ssm: (A, B) parameter sets per direction (docs/math.md §5).
        directions: 1 (top-left), 2 (+ bottom-right) or 4 (+ top-right, bottom-left).
        variant: "real" (sigmoid-activated A, B) or "complex" (polar A); docs/math.md §4.
        c_per_channel: one C per channel and direction (2024 release); False shares one C per
            (A, B) set (2023 code).
        per_direction_sets: with c_per_channel, give each direction its own (A, B) sets: channel
            f of direction r uses set r * n_ssm + f mod n_ssm. The default keeps the reference
            layout (docs/math.md §5): kernel channel r * C + f (direction-major) uses set
            (r * C + f) mod S. When S divides C every direction of channel f uses the same set,
            f mod S; otherwise they differ (C = 6, S = 12: channel 0 uses sets 0, 6, 0, 6).
        skip: add omega * x (the D term).
        out_norm: LayerNorm on the output.
        kernel_size: truncate each direction's causal kernel to this many cells per axis (int or
            (kh, kw)); the folded kernel then spans (2kh-1) x (2kw-1). None (default) keeps the
            whole grid: a global kernel. Used where the layer replaces a small depthwise
            convolution (ConvNeXt, docs/math.md §7).

    Attributes:
        fast_path: closed-form kernel and folded convolution when True (default); the
            per-cell recurrence and per-direction shift-and-add convolution when False.
        conv_method: "auto" (`choose_conv_method`: by device, grid and kernel size, and whether
            autograd will need a backward), "fft" or "direct", for the fast path.

    The fast path has no second derivative: a double backward through it (a gradient penalty)
    raises an error; set `fast_path = False` for one.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int = 16,
        n_ssm: int = 2,
        directions: int = 4,
        variant: Literal["real", "complex"] = "real",
        c_per_channel: bool = True,
        skip: bool = True,
        out_norm: bool = False,
        per_direction_sets: bool = False,
        kernel_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(dim=dim, state_dim=state_dim, n_ssm=n_ssm)
        if directions not in (1, 2, 4):
            raise ValueError(f"directions: expected 1, 2 or 4, got {directions!r}")
        if variant not in ("real", "complex"):
            raise ValueError(f"variant: expected 'real' or 'complex', got {variant!r}")
        if c_per_channel and dim % n_ssm:
            raise ValueError(f"dim: expected a multiple of n_ssm={n_ssm} with c_per_channel=True, got {dim}")
        if per_direction_sets and not c_per_channel:
            raise ValueError(
                "per_direction_sets: expected c_per_channel=True (with shared C every direction already "
                "has its own sets), got c_per_channel=False"
            )
        self.kernel_size = _pair_or_none(kernel_size)
        self.dim, self.state_dim, self.n_ssm, self.directions = dim, state_dim, n_ssm, directions
        self.variant, self.c_per_channel, self.out_norm = variant, c_per_channel, out_norm
        self.per_direction_sets = per_direction_sets
        self.fast_path = True
        self.conv_method: Literal["auto", "fft", "direct"] = "auto"

        sets = directions * n_ssm
        pair = (2,) if variant == "complex" else ()  # (real, imag) of complex parameters
        c_rows = directions * dim if c_per_channel else sets
        if variant == "real":
            self.a_raw = nn.Parameter(torch.empty(sets, 4, state_dim))
        else:
            self.a_radius_raw = nn.Parameter(torch.empty(sets, 4, state_dim))
            self.a_angle_raw = nn.Parameter(torch.empty(sets, 4, state_dim))
        self.b_raw = nn.Parameter(torch.empty(sets, 2, state_dim, *pair))
        self.c_raw = nn.Parameter(torch.empty(c_rows, 2, state_dim, *pair))
        self.omega = nn.Parameter(torch.empty(dim)) if skip else None
        self._tag_parameters()
        self.norm = nn.LayerNorm(dim) if out_norm else nn.Identity()
        self._cache = ParameterCache()  # the prepared kernel, in eval mode
        self.reset_parameters()

    def _tag_parameters(self) -> None:
        for p in self._ssm_parameters():
            p._optim = NO_WEIGHT_DECAY  # docs/math.md §4: A, B, C and omega skip weight decay

    def _ssm_parameters(self) -> list[nn.Parameter]:
        names = ("a_raw", "a_radius_raw", "a_angle_raw", "b_raw", "c_raw", "omega")
        params = (getattr(self, n, None) for n in names)
        return [p for p in params if p is not None]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization of docs/math.md §4."""
        if self.variant == "real":
            self.a_raw.normal_(0.0, 0.2)  # a = sigmoid(a_raw) near 1/2: stable
        else:
            self.a_radius_raw.uniform_(0.5, 3.0)
            self.a_angle_raw.uniform_(0.5, 3.0)
        self.b_raw.normal_(0.0, 0.2)
        self.c_raw.normal_(0.0, 1.0)
        if self.omega is not None:
            self.omega.normal_(0.0, 1.0)
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: skip omega = 1 and C = 0 (kernels vanish).

        Used to insert layers into a trained model without changing its outputs; A and B keep
        their initialization, so fine-tuning moves C away from zero.
        """
        if self.omega is None or self.out_norm:
            raise ValueError(
                f"reset_to_identity: expected skip=True and out_norm=False, got skip={self.omega is not None} "
                f"and out_norm={self.out_norm}"
            )
        self.c_raw.zero_()
        self.omega.fill_(1.0)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """Activated coefficients: a (S, 4, N), b (S, 2, N), c (rows, 2, N), rows = d*C or S."""
        if self.variant == "real":
            a, b = torch.sigmoid(self.a_raw), torch.sigmoid(self.b_raw)
            c = self.c_raw
        else:
            a = torch.polar(torch.sigmoid(self.a_radius_raw), 2 * math.pi * torch.sigmoid(self.a_angle_raw))
            b = torch.view_as_complex(torch.sigmoid(self.b_raw))
            c = torch.view_as_complex(self.c_raw)
        return a, b, c * self.state_dim**-0.5

    def kernels(self, grid: tuple[int, int]) -> Tensor:
        """Causal kernel of every direction and channel: (d, C, H, W), direction-major.

        Computed in at least float32, with autocast off: powers of the coefficients lose
        their accuracy in half precision.
        """
        with torch.autocast(self.c_raw.device.type, enabled=False):
            return self._kernels(grid)

    def _kernels(self, grid: tuple[int, int]) -> Tensor:
        a, b, c = self.coefficients()
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b, c = a.float(), b.float(), c.float()
        kernel_fn = roesser_kernel if self.fast_path else roesser_kernel_ref
        d, n, sets = self.directions, self.state_dim, a.shape[0]
        if self.c_per_channel and self.per_direction_sets:
            # channel f of direction r uses set r * n_ssm + f mod n_ssm
            split = (d, 1, self.n_ssm)
            k = kernel_fn(a.reshape(*split, 4, n), b.reshape(*split, 2, n), c.reshape(d, -1, self.n_ssm, 2, n), grid)
            return k.reshape(d, self.dim, *grid)  # from (d, C/n_ssm, n_ssm, H, W)
        if self.c_per_channel:
            # 2024 layout: kernel channel k (direction-major) uses (A, B) set k mod S.
            k = kernel_fn(a, b, c.reshape(-1, sets, 2, n), grid)  # (d*C/S, S, H, W)
            return k.reshape(d, self.dim, *grid)
        # 2023 layout: feature f of direction r uses set r * n_ssm + f mod n_ssm, with its C.
        k = kernel_fn(a, b, c, grid).reshape(d, self.n_ssm, *grid)  # (d, n_ssm, H, W)
        return k[:, torch.arange(self.dim, device=k.device) % self.n_ssm]

    def kernel_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Causal kernel size used on an H x W grid: the grid, truncated to `kernel_size`."""
        if self.kernel_size is None:
            return grid
        return (min(grid[0], self.kernel_size[0]), min(grid[1], self.kernel_size[1]))

    def _prepared_kernel(self, grid: tuple[int, int], method: str, params_need_grad: bool) -> Tensor:
        """Folded kernel (direct) or its spectrum (fft); cached in eval mode.

        For the direct path the skip omega * x is folded in as the kernel's center tap, which
        saves a multiply and an add (and their backward) over the whole input and stays exact
        (an identity layer returns x bit for bit). The FFT path adds the skip separately: its
        round-off would blur that.

        The cache (`ParameterCache`) serves only in eval mode where no autograd graph through
        the parameters is needed (`params_need_grad` False). It is keyed on the grid, the
        method and the parameters' version counters: any in-place update (optimizer step,
        load_state_dict, re-initialisation) and any device or dtype move invalidates it, and
        `train()` drops it (also after writes through `.data`, which the counters do not see).
        """

        def prepare() -> Tensor:
            ksize = self.kernel_grid(grid)
            kernels = self.kernels(ksize)  # (d, C, kh, kw)
            skip = self.omega.to(kernels.dtype) if self.omega is not None and method == "direct" else None
            full = fold_directions(kernels, skip)  # (C, 2kh-1, 2kw-1)
            return kernel_spectrum(full, fft_shape(grid, ksize)) if method == "fft" else full

        if self.training or params_need_grad:
            return prepare()
        return self._cache.fetch((grid, method), self._ssm_parameters(), prepare)

    def train(self, mode: bool = True) -> SSM2D:
        self._cache.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        grid = (x.shape[1], x.shape[2])
        ksize = self.kernel_grid(grid)
        params_need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self._ssm_parameters())
        if self.fast_path and self.conv_method not in ("auto", "fft", "direct"):
            raise ValueError(f"conv_method: expected 'auto', 'fft' or 'direct', got {self.conv_method!r}")
        method = self.conv_method if self.fast_path else "ref"
        if method == "auto":
            backward = params_need_grad or (torch.is_grad_enabled() and x.requires_grad)
            method = choose_conv_method(grid, ksize, backward=backward, device=x.device)
        if method == "ref":
            y = directional_conv2d_ref(x, self.kernels(ksize).to(x.dtype))
        elif method == "direct":
            y = direct_conv2d(x, self._prepared_kernel(grid, method, params_need_grad))  # skip included
        else:
            y = fft_conv2d(x, self._prepared_kernel(grid, method, params_need_grad), fft_shape(grid, ksize))
        if self.omega is not None and method != "direct":
            y = y + x * self.omega.to(x.dtype)
        return self.norm(y)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, state_dim={self.state_dim}, n_ssm={self.n_ssm}, directions={self.directions}, "
            f"variant={self.variant!r}, c_per_channel={self.c_per_channel}, skip={self.omega is not None}, "
            f"out_norm={self.out_norm}, per_direction_sets={self.per_direction_sets}, "
            f"kernel_size={self.kernel_size}, "
            f"fast_path={self.fast_path}, conv_method={self.conv_method!r}"
        )
