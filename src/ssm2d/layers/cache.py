"""The eval-mode cache of a tensor prepared from a layer's parameters (a kernel, a prior map).

One helper for every layer that caches: `SSM2D` (its folded kernel or spectrum) and
`SpatialPrior` (its (h, L, L) map).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

__all__ = ["ParameterCache"]


def _stamp(params: Sequence[Tensor]) -> tuple:
    """What identifies the parameters' current values without reading them (no device sync):
    each one's identity, version counter, storage, dtype, device and shape."""
    return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device, p.shape) for p in params)


class ParameterCache:
    """One tensor computed from some parameters, kept while they are unchanged.

    The entry is keyed on a caller's key (the grid size, the path, ...) and on the parameters'
    version counters, which every in-place update bumps: optimizer steps, `load_state_dict`,
    writes under `torch.no_grad()`, re-initialisation. A dtype or device move, or a parameter
    replaced by another, changes the stamp too. No value is read or compared, so a lookup
    makes no device sync.

    Writes through `.data` bypass the version counter and are not seen; `clear()` (which the
    caching layers call from `train()`) drops the entry after them.

    The caller decides when a cached value may serve (eval mode, no gradient needed); under
    torch.compile `fetch` always computes, so the compiled graph holds the computation.
    """

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.value: Tensor | None = None
        self._stamp: tuple = ()

    def fetch(self, key: Hashable, params: Sequence[Tensor], compute: Callable[[], Tensor]) -> Tensor:
        """The cached value for `key` and the current `params`, or `compute()`, kept for next time."""
        if torch.compiler.is_compiling():
            return compute()
        if self.value is not None and self.key == key and self._stamp == _stamp(params):
            return self.value
        value = compute()
        self.key, self.value, self._stamp = key, value, _stamp(params)
        return value

    def clear(self) -> None:
        """Drop the entry."""
        self.key, self.value, self._stamp = None, None, ()
