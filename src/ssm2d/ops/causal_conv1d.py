"""Causal depthwise 1-D convolution of Mamba's mixer (Gu & Dao 2023; docs/math.md §9).

Glossary: B batch, D channels, L sequence length, W kernel width.

Per channel d, with the taps ordered oldest first (as `nn.Conv1d` with W - 1 left padding)::

    y_t = bias + sum_{k < W} weight[k] x_{t - (W - 1) + k}      (x_s = 0 for s < 0)

optionally followed by SiLU. With `reverse`, the same convolution runs along the reversed
sequence, tap k reading x_{t + (W - 1) - k} (x_s = 0 for s >= L): the backward direction of a
bidirectional mixer without flipping its input and output. The signature is that of the
`causal_conv1d` package's `causal_conv1d_fn`, with weight (D, W), plus `reverse`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_conv1d import fused_causal_conv1d

__all__ = ["causal_conv1d", "causal_conv1d_ref"]

_ACTIVATIONS = (None, "silu", "swish")


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not (isinstance(t, Tensor) and t.is_floating_point()):
            raise TypeError(f"{name}: expected a floating-point torch.Tensor, got {t!r:.80}")
    if x.ndim != 3:
        raise ValueError(f"x: expected (B, D, L), got {tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"weight: expected (D, W) with D={x.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias: expected ({x.shape[1]},), got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {_ACTIVATIONS}, got {activation!r}")


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, reverse: bool = False
) -> Tensor:
    """The sum of the module docstring, one tap at a time.

    Args:
        x: input, (B, D, L).
        weight: taps, (D, W), oldest first.
        bias: (D,).
        activation: None, or "silu" / "swish" (the same function).
        reverse: convolve along the reversed sequence (see the module docstring).

    Returns:
        (B, D, L).
    """
    _check_inputs(x, weight, bias, activation)
    width, length = weight.shape[1], x.shape[-1]
    y = torch.zeros_like(x) if bias is None else bias[:, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k  # tap k reads x_{t - shift}, or x_{t + shift} in reverse
        if shift >= length:
            continue
        if reverse:
            y[..., : length - shift] += weight[:, k, None] * x[..., shift:]
        else:
            y[..., shift:] += weight[:, k, None] * x[..., : length - shift]
    return y if activation is None else F.silu(y)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None, *, reverse: bool = False
) -> Tensor:
    """`causal_conv1d_ref` computed fast (same arguments).

    CPU tensors of one dtype, float32 or float64, run the fused numba kernel
    (`ssm2d.ops.fused_conv1d`, whose backward is written out); other inputs one grouped
    `F.conv1d` on the left-padded input (right-padded, with the taps flipped, in reverse).
    """
    _check_inputs(x, weight, bias, activation)
    fused_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.shape[-1] > 0
    if fused_ok and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        return fused_causal_conv1d(x, weight, bias, activation is not None, reverse)
    width = weight.shape[1]
    padded, taps = (F.pad(x, (0, width - 1)), weight.flip(-1)) if reverse else (F.pad(x, (width - 1, 0)), weight)
    y = F.conv1d(padded, taps[:, None], bias, groups=x.shape[1])  # (B, D, L)
    return y if activation is None else F.silu(y)
