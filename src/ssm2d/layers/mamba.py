"""Mamba's inner op (Gu & Dao 2023, arXiv 2312.00752), the part Vim and V2M repeat per scan.

Glossary: S sequences (a batch of 1-D scans), E inner channels, L sequence length, N state
size, R = dt_rank.

On the signal u and gate z that the mixer's in_proj made, along the last axis::

    u~ = silu(causal_depthwise_conv1d(u))
    [dt, B, C] = x_proj(u~);  delta = softplus(dt_proj(dt))      (`ops.step_sizes` on the CPU)
    y = (selective_scan(u~, delta, A, B, C) + D u~) * silu(z),   A = -exp(A_log)

Vim runs one per direction and V2M one per pass, between their own in_proj and out_proj. A, D
and the dt bias are used in at least float32 whatever the module's dtype, as in Mamba.
Parameter names are those of mamba-ssm's `Mamba` module: conv1d, x_proj, dt_proj, A_log, D.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from ..ops.selective_scan import selective_scan, selective_scan_ref
from ..ops.step_sizes import step_sizes
from .checks import check_positive_ints
from .mamba_init import init_dt_proj, s4d_real_a_log
from .tagged import NO_WEIGHT_DECAY, TaggedModule

__all__ = ["MambaInner", "rename_state_dict_keys"]

_LEARNED = ("B", "C", "BC")


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MambaInner(TaggedModule):
    """One Mamba inner op along the last axis: (S, E, L) signal and gate -> (S, E, L).

    Args:
        inner: channels E.
        state_dim: N.
        dt_rank: R, width of the low-rank step-size projection.
        conv_size: kernel of the causal depthwise convolution.
        learned: which of B and C come from the input: "BC" (Mamba), or "B" or "C" with the
            other held at 1 (V2M's passes); x_proj maps E -> R + N * len(learned).
    """

    def __init__(self, inner: int, state_dim: int, dt_rank: int, conv_size: int, learned: str = "BC") -> None:
        super().__init__()
        check_positive_ints(inner=inner, state_dim=state_dim, dt_rank=dt_rank, conv_size=conv_size)
        if learned not in _LEARNED:
            raise ValueError(f"learned: expected one of {_LEARNED}, got {learned!r}")
        self.state_dim, self.dt_rank, self.learned = state_dim, dt_rank, learned
        # Holds the depthwise taps (E, 1, W); applied by `causal_conv1d`, not called.
        self.conv1d = nn.Conv1d(inner, inner, conv_size, groups=inner)
        self.x_proj = nn.Linear(inner, dt_rank + len(learned) * state_dim, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.A_log = nn.Parameter(torch.empty(inner, state_dim))
        self.D = nn.Parameter(torch.empty(inner))
        self._tag_parameters()
        self.reset_parameters()

    def _tag_parameters(self) -> None:
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._optim = NO_WEIGHT_DECAY  # Mamba: A, D and the dt bias skip weight decay

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba defaults: PyTorch's conv and x_proj init, dt from logU[1e-3, 0.1], S4D-Real
        A = -(1..N), D = 1."""
        self.conv1d.reset_parameters()
        self.x_proj.reset_parameters()
        init_dt_proj(self.dt_proj, self.dt_rank)
        self.A_log.copy_(s4d_real_a_log(*self.A_log.shape))
        self.D.fill_(1.0)

    def forward(self, u: Tensor, z: Tensor, fast_path: bool = True, reverse: bool = False) -> Tensor:
        """u, z: (S, E, L) -> (S, E, L); `fast_path=False` runs the `_ref` ops.

        `reverse`: the op along the reversed sequence (conv taps reading ahead, the scan from
        L - 1 down to 0), in the input's order: the same as flipping u and z along L and the
        output back, without the copies.
        """
        s, _, length = u.shape
        conv, scan = (causal_conv1d, selective_scan) if fast_path else (causal_conv1d_ref, selective_scan_ref)
        u = conv(u, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu", reverse=reverse)  # (S, E, L)
        dt, *bc = self.x_proj(rearrange(u, "s e l -> s l e")).split(
            [self.dt_rank] + [self.state_dim] * len(self.learned), dim=-1
        )  # (S, L, R), (S, L, N) per learned projection
        A = -torch.exp(_at_least_float32(self.A_log))  # (E, N)
        D, dt_bias = _at_least_float32(self.D), _at_least_float32(self.dt_proj.bias)
        if fast_path and u.device.type == "cpu":  # dt_proj, its bias and softplus in one fused op
            delta, dt_bias, softplus = step_sizes(dt, self.dt_proj.weight, dt_bias), None, False  # (S, L, E)
        else:  # the bias and softplus applied in the scan, as mamba-ssm's kernel does
            delta, softplus = F.linear(dt, self.dt_proj.weight), True
        # (S, E, L), a view of a channels-last tensor, as u and z: the fused ops read them without a copy
        delta = rearrange(delta, "s l e -> s e l")
        learned = dict(zip(self.learned, (rearrange(t, "s l n -> s n l") for t in bc)))
        ones = u.new_ones(()).expand(s, self.state_dim, length)  # a projection held at 1
        b, c = learned.get("B", ones), learned.get("C", ones)  # (S, N, L) each
        return scan(u, delta, A, b, c, D=D, z=z, delta_bias=dt_bias, delta_softplus=softplus, reverse=reverse)

    def extra_repr(self) -> str:
        return f"learned={self.learned!r}"


def rename_state_dict_keys(renames: Mapping[str, str]):
    """A load-state-dict pre-hook that reads parameters saved under earlier names.

    `renames` maps an earlier name (relative to the module) to the current one, e.g.
    {"A_b_log": "directions.1.A_log"}; a key `<prefix><old><rest>` becomes
    `<prefix><new><rest>`. Keys already under current names pass untouched.
    """

    def hook(state_dict: dict, prefix: str, *args: object) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            for old, new in renames.items():
                if rest == old or rest.startswith(old + "."):
                    state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                    break

    return hook
