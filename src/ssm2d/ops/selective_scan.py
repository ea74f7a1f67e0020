"""Selective scan of Mamba (Gu & Dao 2023, arXiv 2312.00752, section 3; docs/math.md §9).

Glossary: B batch, D channels, L sequence length, N state size, G groups of B/C.

Per channel d and state n, with the input-dependent step delta (docs/math.md §9, "ZOH for A, Euler
for B")::

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,     y_t = C_t . h_t + D u_t,
    out = y * silu(z)                                      (when z is given)

where delta = softplus(delta + delta_bias) when `delta_softplus`. B and C are shared by the
D / G channels of a group. The signature and shapes are those of mamba-ssm's
`selective_scan_fn` with a real A.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked_scan import chunked_scan, default_chunk_size
from .fused_scan import fused_scan
from .fused_softplus import fused_softplus

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except ImportError:
    _mamba_selective_scan_fn = None

__all__ = ["default_chunk_size", "selective_scan", "selective_scan_ref"]


def _check_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Validate shapes and dtypes against the contract in the module docstring."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a real floating-point tensor, got {t.dtype}")
    if u.ndim != 3 or min(u.shape[1:]) < 1:
        raise ValueError(f"u: expected (B, D, L) with D, L >= 1 (B may be 0), got {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected (B, D, L) = {tuple(u.shape)} as u, got {tuple(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A: expected (D, N) with D={d}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.ndim == 3:
            ok = t.shape == (b, n, length)
        elif t.ndim == 4:
            ok = t.shape[0] == b and t.shape[2:] == (n, length) and t.shape[1] >= 1 and d % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name}: expected (B, N, L) = {(b, n, length)} or (B, G, N, L) with D={d} divisible by G, "
                f"got {tuple(t.shape)}"
            )
    if B.ndim == 4 and C.ndim == 4 and 1 < B.shape[1] != C.shape[1] > 1:
        raise ValueError(f"B, C: expected the same number of groups (or one), got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name}: expected ({d},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z: expected (B, D, L) = {tuple(u.shape)} as u, got {tuple(z.shape)}")


def _grouped(t: Tensor) -> Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, G, N, L)."""
    return t.unsqueeze(1) if t.ndim == 3 else t


def _step_sizes(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, fused: bool = False) -> Tensor:
    """delta (+ bias) (-> softplus); `fused`: the numba softplus (CPU, float32/float64)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if not delta_softplus:
        return delta
    return fused_softplus(delta) if fused else F.softplus(delta)


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Skip connection and gate: (y + D u) * silu(z), all (B, D, L)."""
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    reverse: bool = False,
) -> Tensor:
    """The recurrence of the module docstring, one step at a time (a loop over L).

    Computes in the promoted dtype of the inputs, at least float32 (float64 inputs stay float64).

    Args:
        u: input, (B, D, L).
        delta: step sizes before bias and softplus, (B, D, L).
        A: real state matrix diagonal, (D, N); negative for a stable scan.
        B: input projection, (B, N, L) or (B, G, N, L) with D divisible by G.
        C: output projection, same layouts as B (one group may serve all groups of the other).
        D: skip weight, (D,).
        z: gate, (B, D, L); the output is multiplied by silu(z).
        delta_bias: added to delta, (D,).
        delta_softplus: apply softplus to delta (after the bias).
        reverse: run the recurrence from t = L - 1 down to 0, h_t = exp(delta_t A) h_{t+1} +
            delta_t B_t u_t (the backward direction of a bidirectional scan, without flips).

    Returns:
        (B, D, L), in the dtype of u.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = torch.promote_types(torch.promote_types(u.dtype, A.dtype), torch.float32)
    dt = _step_sizes(delta.to(dtype), None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    bsz, d, length = u.shape
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    rep_b, rep_c = d // Bg.shape[1], d // Cg.shape[1]
    uf, Af = u.to(dtype), A.to(dtype)
    h = u.new_zeros(bsz, d, A.shape[1], dtype=dtype)  # (B, D, N)
    ys = []
    # unbind along L: indexing one step of a (.., L) tensor would cost a full-size gradient per step
    steps = list(zip(dt.unbind(-1), uf.unbind(-1), Bg.unbind(-1), Cg.unbind(-1)))
    for dt_t, u_t, b_t, c_t in reversed(steps) if reverse else steps:
        b_t = b_t.repeat_interleave(rep_b, dim=1)  # (B, D, N): channel d uses group d // (D / G)
        c_t = c_t.repeat_interleave(rep_c, dim=1)  # (B, D, N)
        h = torch.exp(dt_t[..., None] * Af) * h + (dt_t * u_t)[..., None] * b_t  # (B, D, N)
        ys.append((h * c_t).sum(-1))  # (B, D)
    y = torch.stack(ys[::-1] if reverse else ys, dim=-1)  # (B, D, L)
    return _finish(y, uf, None if D is None else D.to(dtype), None if z is None else z.to(dtype)).to(u.dtype)


_KERNEL_OK: dict[torch.device, bool] = {}
# What mamba-ssm's kernel computes: these dtypes, and B and C with the same number of groups.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _smoke_test(fn, device: torch.device) -> bool:
    """Whether `fn` (selective_scan_fn's signature) runs on `device` and matches the ref there.

    A tiny float32 problem with every optional argument. Raising RuntimeError (no kernel image
    for the GPU, s4 #17 / mamba #867), TypeError (a build with other argument lists, Vim #41) or
    ValueError counts as failing.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = ((1, 2, 5), (1, 2, 5), (2, 3), (1, 3, 5), (1, 3, 5), (2,), (1, 2, 5), (2,))
    args = [torch.randn(shape, generator=gen).to(device) for shape in shapes]  # u, delta, A, B, C, D, z, bias
    args[2] = -args[2].abs()
    try:
        out = fn(*args, delta_softplus=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    expected = selective_scan_ref(*args, delta_softplus=True)
    return (
        isinstance(out, Tensor)
        and out.shape == expected.shape
        and out.dtype == expected.dtype
        and torch.allclose(out, expected, rtol=1e-3, atol=1e-3)
    )


def _cuda_kernel(device: torch.device):
    """mamba-ssm's `selective_scan_fn` if it imports and passes `_smoke_test` on `device`, else None.

    The smoke call runs once per device; on CUDA without a working kernel, warn once.
    """
    if device.type != "cuda":
        return None
    if device not in _KERNEL_OK:
        ok = _mamba_selective_scan_fn is not None and _smoke_test(_mamba_selective_scan_fn, device)
        if not ok:
            warnings.warn(
                f"selective_scan: mamba-ssm's CUDA kernel is unavailable or failed its smoke test on {device}; "
                "using the chunked torch scan",
                stacklevel=3,
            )
        _KERNEL_OK[device] = ok
    return _mamba_selective_scan_fn if _KERNEL_OK[device] else None


def _kernel_supports(u: Tensor, B: Tensor, C: Tensor) -> bool:
    """The CUDA kernel takes no float64, and B and C with different numbers of groups."""
    return u.dtype in _KERNEL_DTYPES and _grouped(B).shape[1] == _grouped(C).shape[1]


def _last_state(dt: Tensor, u: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """h_{L-1} = sum_t exp(A (S_{L-1} - S_t)) delta_t u_t B_t with S the cumulative sum of delta.

    dt, u (B, D, L); A (D, N); B (B, G, N, L). Returns (B, D, N). For the torch path, which
    keeps no state: it builds one (B, D, N, L) tensor. Only factors exp(<= 0) appear.
    """
    s = dt.cumsum(-1)  # (B, D, L)
    decay = torch.exp((s[..., -1:] - s)[:, :, None] * A[..., None])  # (B, D, N, L)
    Bd = B.repeat_interleave(u.shape[1] // B.shape[1], dim=1)  # (B, D, N, L)
    return (decay * Bd * (dt * u)[:, :, None]).sum(-1)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    reverse: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """`selective_scan_ref` computed by a fast path: fused on CPU, mamba-ssm's kernel or chunked on CUDA.

    Same arguments, shapes and result as `selective_scan_ref`, plus:

    Args:
        return_last_state: also return the last state of the scan, (B, D, N), in the compute
            dtype (as mamba-ssm's `selective_scan_fn`): h_{L-1}, or h_0 when `reverse`.
        reverse: as `selective_scan_ref`. The fused CPU kernel walks the steps backwards; the
            CUDA paths flip the inputs along L and the output back.
        chunk_size: steps per chunk T of the chunked torch path (`ssm2d.ops.chunked_scan`);
            default `default_chunk_size(L)`. Giving it selects the chunked path on any device.

    Paths. CPU tensors run the fused numba kernel (`ssm2d.ops.fused_scan`; float32, or float64
    for float64 inputs): one pass over the inputs, states kept every `CHECKPOINT_STEPS` steps
    and recomputed in the backward pass; its first call in a fresh environment compiles (see
    the README), later ones load the on-disk cache. On CUDA, mamba-ssm's `selective_scan_fn`
    is used when it imports and passes a smoke call (checked once per device); otherwise the
    chunked torch scan runs, with one warning. Inputs the kernel does not take (float64; B and
    C with different group counts) use the chunked scan without the check. The torch paths
    compute in float32 (float64 for float64 inputs) and return the dtype of u. The chunked scan
    saves the inputs and the states at chunk starts, O(B D L N / T), where the sequential ref
    keeps O(B D L N) for its backward pass.

    Returns:
        out (B, D, L), or (out, last_state) when `return_last_state`.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    fused = u.device.type == "cpu" and chunk_size is None
    if reverse and not fused:  # the CUDA kernel and the chunked scan run forwards: flip along L
        u, delta, B, C, z = (None if t is None else t.flip(-1) for t in (u, delta, B, C, z))
        out = selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=chunk_size
        )
        return (out[0].flip(-1), out[1]) if return_last_state else out.flip(-1)
    kernel = _cuda_kernel(u.device) if chunk_size is None and _kernel_supports(u, B, C) else None
    if kernel is not None:
        if return_last_state:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = torch.promote_types(torch.promote_types(u.dtype, A.dtype), torch.float32)
    uf, Af = u.to(dtype), A.to(dtype)
    Df, zf, bias = (None if t is None else t.to(dtype) for t in (D, z, delta_bias))
    Bg, Cg = _grouped(B).to(dtype), _grouped(C).to(dtype)
    dt = _step_sizes(delta.to(dtype), bias, delta_softplus, fused)
    if fused:
        Bt, Ct = (t.transpose(-1, -2).contiguous() for t in (Bg, Cg))  # (B, G, L, N): a step's states adjacent
        Dc = None if Df is None else Df.contiguous()
        y, last = fused_scan(uf, dt, Af.contiguous(), Bt, Ct, Dc, zf, reverse, return_last_state)  # any strides
        y = y.to(u.dtype)
        return (y, last) if return_last_state else y
    length = u.shape[-1]
    chunk = min(length, chunk_size or default_chunk_size(length))
    groups = max(Bg.shape[1], Cg.shape[1])  # a single group is shared by all groups of the other
    y = chunked_scan(uf, dt, Af, *(t.expand(-1, groups, -1, -1) for t in (Bg, Cg)), chunk)
    y = _finish(y, uf, Df, zf).to(u.dtype)
    return (y, _last_state(dt, uf, Af, Bg)) if return_last_state else y
