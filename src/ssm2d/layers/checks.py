"""Argument checks shared by the layer and model constructors, and the layers' input check."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_grid_input", "check_positive_ints"]


def check_positive_ints(**values: object) -> None:
    """Raise ValueError naming the first argument that is not an integer >= 1 (bools are not)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def check_grid_input(x: Tensor, dim: int, name: str = "x") -> None:
    """Check a spatial layer's input: a floating-point (B, H, W, C) tensor with C = `dim`.

    Batch 0 is allowed (the layer returns an empty output); H or W = 0 is not. Raises TypeError
    for a non-tensor or a non-floating dtype, ValueError for a wrong shape or an empty grid.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape (B, H, W, C) with C={dim}, got {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name}: expected a grid with H >= 1 and W >= 1, got H={x.shape[1]}, W={x.shape[2]}")
