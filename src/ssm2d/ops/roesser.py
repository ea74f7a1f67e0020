"""Impulse response of the normalized 2-D Roesser SSM (Baron, Zimerman & Wolf, ICLR 2024).

Glossary: N states, H x W grid, `...` any broadcastable leading dimensions.

Every state coordinate n is an independent scalar system (docs/math.md §1)::

    x_h(i,j) = s(i,j-1) [a1 x_h(i,j-1) + a2 x_v(i,j-1)] + b1 u(i,j)
    x_v(i,j) = s(i-1,j) [a3 x_h(i-1,j) + a4 x_v(i-1,j)] + b2 u(i,j)
    K(i,j)   = w(i,j) sum_n c1 x_h + c2 x_v            (u = impulse at the origin)

with s = 1/2 at the origin and in the interior, 1 on row 0 and column 0, and the boundary
weight w = 2 on row 0 and column 0 except the origin (docs/math.md §2).

Fast path (docs/math.md §3, which derives it). A state value is a sum over monotone lattice paths from the
origin. A path whose first straight run has length m weighs
``beta * prod(a over the later steps) * 2^(m - i - j + 1)``, where beta = (a1 b1 + a2 b2) / 2
if it starts rightwards and (a3 b1 + a4 b2) / 2 if it starts downwards. Grouping paths by their
number k of vertical runs turns the sum into binomial counts. With

    P(n, k) = 2^-n C(n-1, k-1)   (P(0, 0) = 1),      Q(n, k) = 2 sum_{u<n} P(u, k)
    RP(i,k) = P(i,k) a4^(i-k) a3^k,   RQ(i,k) = Q(i,k) a4^(i-1-k) a3^k      (rows)
    CP(j,k) = P(j,k) a1^(j-k) a2^k,   CQ(j,k) = Q(j,k) a1^(j-1-k) a2^k      (columns)

the states are two matrix products over k, boundary weight included::

    x_h = beta_r sum_k RP(i,k) CQ(j,k)   + beta_d sum_k RQ(i,k-1) CP(j,k)
    x_v = beta_r sum_k RP(i,k) CQ(j,k-1) + beta_d sum_k RQ(i,k)   CP(j,k)

plus b at the origin. The tables are built per call from small cached binomial counts (no
symbolic precompute), and their entries are bounded by 1 for |a| <= 1, so float32 neither
overflows nor underflows.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["roesser_kernel", "roesser_kernel_ref"]


def _check_inputs(a: Tensor, b: Tensor, c: Tensor, size: Sequence[int]) -> tuple[int, int]:
    """Validate the shapes, dtypes and size of the kernel's contract and return (H, W).

    Checks only what is known without reading the values, so that the fast path makes no
    device sync and compiles; `_check_finite` (on the reference path) reads them.
    """
    for name, t, rows in (("a", a, 4), ("b", b, 2), ("c", c, 2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"{name}: expected a floating-point or complex tensor, got {t.dtype}")
        if t.ndim < 2 or t.shape[-2] != rows:
            raise ValueError(f"{name}: expected shape (..., {rows}, N), got {tuple(t.shape)}")
    n = a.shape[-1]
    for name, t, rows in (("b", b, 2), ("c", c, 2)):
        if t.shape[-1] != n:
            raise ValueError(f"{name}: expected shape (..., {rows}, N) with N={n} as in a, got {tuple(t.shape)}")
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], c.shape[:-2])
    except RuntimeError:
        raise ValueError(
            "a, b, c: expected broadcastable leading dimensions, got "
            f"{tuple(a.shape[:-2])}, {tuple(b.shape[:-2])} and {tuple(c.shape[:-2])}"
        ) from None
    try:
        h, w = (operator.index(s) for s in size if not isinstance(s, bool))
    except (TypeError, ValueError):
        h = w = 0
    if isinstance(size, (str, bytes)) or min(h, w) < 1:
        raise ValueError(f"size: expected (H, W) with integers H, W >= 1, got {size!r}")
    return h, w


def _check_finite(a: Tensor, b: Tensor, c: Tensor) -> None:
    """Raise ValueError naming the first of a, b, c with non-finite entries (reads the values)."""
    for name, t in (("a", a), ("b", b), ("c", c)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{name}: expected finite values, got {bad} non-finite entries")


def _common_dtype(a: Tensor, b: Tensor, c: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), c.dtype)


def _path_counts(length: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """Binomial path counts along one axis.

    Returns P and Q of the module docstring, both (length, k), and the exponent tables
    n - k (clamped at 0) and k, as `dtype` tensors on `device`. In eager mode they are kept for
    the next call with the same sizes (`_cached_path_counts`); under torch.compile they are
    built inside the graph, where they become constants.
    """
    if torch.compiler.is_compiling():
        return _build_path_counts(length, k, dtype, device)
    return _cached_path_counts(length, k, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_path_counts(length: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """`_build_path_counts`, kept per size (4 * length * k numbers; they do not depend on the
    parameters). Made outside inference mode, so that autograd can save them after an
    inference-mode call."""
    with torch.inference_mode(False):
        return _build_path_counts(length, k, dtype, device)


def _build_path_counts(length: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
    """P, Q and the exponent tables, built in float64 on the CPU (some accelerators have no
    float64) and moved to `device` once."""
    n = torch.arange(length, dtype=torch.float64)[:, None]  # (length, 1)
    kk = torch.arange(k, dtype=torch.float64)[None, :]  # (1, k)
    log_p = (
        torch.lgamma(n.clamp(min=1))
        - torch.lgamma(kk.clamp(min=1))
        - torch.lgamma((n - kk + 1).clamp(min=1))
        - n * math.log(2.0)
    )
    p = torch.where((kk >= 1) & (n >= kk), log_p.exp(), torch.zeros((), dtype=torch.float64))
    p[0, 0] = 1.0
    q = 2.0 * (torch.cumsum(p, 0) - p)  # exclusive prefix sum over n
    return tuple(t.to(device=device, dtype=dtype) for t in (p, q, (n - kk).clamp(min=0), kk))


def _axis_factors(run: Tensor, switch: Tensor, length: int, k: int) -> tuple[Tensor, Tensor]:
    """P- and Q-weighted power tables of one axis: RP, RQ (run=a4, switch=a3) for the rows,
    CP, CQ (run=a1, switch=a2) for the columns.

    run, switch: (..., N). Returns two (..., N, length, k) tensors.
    """
    real = run.real.dtype if run.is_complex() else run.dtype
    p, q, e, kk = _path_counts(length, k, real, run.device)
    powers = torch.pow(run[..., None, None], e) * torch.pow(switch[..., None, None], kk)  # run^(n-k) switch^k
    # Q goes with run^(n-1-k): the table one row down (Q vanishes where that exponent is < 0).
    shifted = torch.cat([powers[..., :1, :], powers[..., :-1, :]], -2)
    return p * powers, q * shifted


def roesser_kernel(a: Tensor, b: Tensor, c: Tensor, size: Sequence[int]) -> Tensor:
    """Normalized 2-D SSM kernel, loop-free closed form (see the module docstring).

    Args:
        a: (..., 4, N) diagonals of A1..A4, already activated; real or complex.
        b: (..., 2, N) B1, B2, already activated.
        c: (..., 2, N) C1, C2, already scaled.
        size: (H, W), any integers >= 1.

    Leading dimensions broadcast. The states are computed once per (a, b) set, so passing
    a: (S, 4, N) and c: (G, S, 2, N) costs S state tables, not G * S.

    Returns:
        K: (..., H, W) real; the real part for complex inputs.
    """
    h, w = _check_inputs(a, b, c, size)
    dtype = _common_dtype(a, b, c)
    a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
    a1, a2, a3, a4 = a.unbind(-2)  # (..., N)
    b1, b2 = b.unbind(-2)  # (..., N)
    k = min(h, w)
    # Rows (run a4, switch a3) and columns (run a1, switch a2) in one batch, on max(H, W) points.
    p_tab, q_tab = _axis_factors(torch.stack([a4, a1]), torch.stack([a3, a2]), max(h, w), k + 1)
    rp, rq = p_tab[0, ..., :h, :], q_tab[0, ..., :h, :]  # (..., N, H, k+1)
    cp, cq = p_tab[1, ..., :w, :], q_tab[1, ..., :w, :]  # (..., N, W, k+1)
    beta_r = ((a1 * b1 + a2 * b2) / 2)[..., None, None]  # (..., N, 1, 1)
    beta_d = ((a3 * b1 + a4 * b2) / 2)[..., None, None]
    rq_d = beta_d * rq[..., :k]  # (..., N, H, k)
    rp_r = beta_r * rp
    left = torch.stack([torch.cat([rp_r[..., :k], rq_d], -1), torch.cat([rp_r[..., 1:], rq_d], -1)])
    right = torch.stack([torch.cat([cq[..., :k], cp[..., 1:]], -1), torch.cat([cq[..., :k], cp[..., :k]], -1)])
    states = left @ right.mT  # (2, ..., N, H, W): x_h, x_v without the origin
    origin = torch.zeros(h, w, dtype=states.dtype, device=states.device)
    origin[0, 0] = 1.0
    states = states + torch.stack([b1, b2])[..., None, None] * origin
    kernel = torch.einsum("...tn,t...nhw->...hw", c, states)  # (..., H, W)
    return kernel.real if kernel.is_complex() else kernel


def roesser_kernel_ref(a: Tensor, b: Tensor, c: Tensor, size: Sequence[int]) -> Tensor:
    """Reference: the recurrence of docs/math.md §1-2, one grid cell at a time.

    Same contract as `roesser_kernel`, and raises ValueError on non-finite coefficients (the
    fast path does not read the values: it makes no device sync). Slow (H * W Python steps);
    for tests and benchmarks.
    """
    h, w = _check_inputs(a, b, c, size)
    _check_finite(a, b, c)
    dtype = _common_dtype(a, b, c)
    a, b, c = a.to(dtype), b.to(dtype), c.to(dtype)
    a1, a2, a3, a4 = a.unbind(-2)
    b1, b2 = b.unbind(-2)
    zero = torch.zeros_like(a1 * b1)  # (..., N)

    def halve(p: int, q: int) -> float:
        """s(p, q): 1/2 where both states of the source cell are non-zero."""
        return 0.5 if (p == 0 and q == 0) or (p >= 1 and q >= 1) else 1.0

    x_h: list[list[Tensor]] = [[zero] * w for _ in range(h)]
    x_v: list[list[Tensor]] = [[zero] * w for _ in range(h)]
    for i in range(h):
        for j in range(w):
            if i == 0 and j == 0:  # the impulse u(0, 0) = 1
                x_h[0][0], x_v[0][0] = b1 + zero, b2 + zero
            if j > 0:
                x_h[i][j] = halve(i, j - 1) * (a1 * x_h[i][j - 1] + a2 * x_v[i][j - 1])
            if i > 0:
                x_v[i][j] = halve(i - 1, j) * (a3 * x_h[i - 1][j] + a4 * x_v[i - 1][j])
    states_h = torch.stack([torch.stack(row, -1) for row in x_h], -2)  # (..., N, H, W)
    states_v = torch.stack([torch.stack(row, -1) for row in x_v], -2)
    c1, c2 = c.unbind(-2)
    kernel = torch.einsum("...n,...nhw->...hw", c1, states_h) + torch.einsum("...n,...nhw->...hw", c2, states_v)
    kernel = kernel.real if kernel.is_complex() else kernel
    weight = torch.full((h, w), 2.0, dtype=kernel.dtype, device=kernel.device)
    weight[1:, 1:] = 1.0
    weight[0, 0] = 1.0
    return kernel * weight
