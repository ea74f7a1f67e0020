"""Handing torch CPU tensors to numba kernels: numpy views, the thread count, the kernels'
floating-point flags, and the position of a step in a sequence read forwards or in reverse."""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

__all__ = ["FASTMATH", "as_array", "position", "use_torch_threads"]

# The kernels' floating-point freedoms (`numba.njit(fastmath=FASTMATH)`): reassociation lets LLVM
# vectorise sums (over lanes or time steps), contraction gives FMAs. NaN and infinity keep IEEE
# semantics (no nnan/ninf).
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(inline="always")
def position(t: int, length: int, reverse: bool) -> int:
    """Inside a kernel: the position of step t of a length-L sequence, t, or L - 1 - t when the
    sequence is read in reverse (a bidirectional mixer's backward direction)."""
    return length - 1 - t if reverse else t


def as_array(t: Tensor | None, like: Tensor, ndim: int) -> np.ndarray:
    """A C-contiguous numpy view of `t` (a copy if `t` is not contiguous), or an empty array
    with `like`'s dtype and `ndim` dimensions when `t` is None (a kernel's absent argument:
    one compiled signature serves both cases)."""
    if t is None:
        return np.empty((0,) * ndim, dtype=like.detach().numpy().dtype)
    return t.detach().contiguous().numpy()


def use_torch_threads() -> int:
    """Make numba's parallel loops use `torch.get_num_threads()` threads (at most
    NUMBA_NUM_THREADS); return that count.

    The first call starts numba's thread pool. Its OpenMP layer sets the process's OpenMP thread
    count to NUMBA_NUM_THREADS (all cores), and torch, whose thread count came from
    OMP_NUM_THREADS rather than `torch.set_num_threads`, would follow it: a process started with
    OMP_NUM_THREADS=1 would run torch's ops on every core from then on. Torch's count is
    restored, and set explicitly, so that it stays."""
    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return threads
