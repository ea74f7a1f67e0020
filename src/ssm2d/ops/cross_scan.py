"""VMamba's cross-scan and cross-merge (Liu et al., NeurIPS 2024; docs/math.md §13).

Glossary: B batch, C channels, H x W grid, L = H * W cells, K = 4 scan directions.

Cross-scan unfolds a grid into K = 4 sequences of its L cells, one per direction::

    k = 0  row-major                (0, 0), (0, 1), ..., (0, W-1), (1, 0), ..., (H-1, W-1)
    k = 1  column-major             (0, 0), (1, 0), ..., (H-1, 0), (0, 1), ..., (H-1, W-1)
    k = 2  row-major, reversed      (H-1, W-1), (H-1, W-2), ..., (0, 0)
    k = 3  column-major, reversed   (H-1, W-1), (H-2, W-1), ..., (0, 0)

Cross-merge puts every sequence back in grid order and sums the four grids. Each direction is
a permutation of the cells, so cross-merge is the adjoint of cross-scan, and on one direction
alone its inverse: cross_merge(cross_scan(x)) = 4 x.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCAN_DIRECTIONS", "cross_merge", "cross_merge_ref", "cross_scan", "cross_scan_ref", "scan_orders"]

SCAN_DIRECTIONS = ("row-major", "column-major", "row-major reversed", "column-major reversed")


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list, torch.Size))
        or len(grid) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in grid)
    ):
        raise ValueError(f"grid: expected (H, W) with integers >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_maps(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got {shape}")


def _check_sequences(y: Tensor, grid: tuple[int, int]) -> None:
    h, w = grid
    if not isinstance(y, Tensor) or y.ndim != 4 or y.shape[1] != 4 or y.shape[-1] != h * w:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y: expected (B, 4, C, L) with L = H * W = {h * w}, got {shape}")


def scan_orders(grid: tuple[int, int]) -> Tensor:
    """The cells in each direction's scan order, (K, L) int64.

    orders[k, t] is the row-major index i * W + j of the cell (i, j) visited at step t of
    direction k (see the module docstring), listed cell by cell.
    """
    h, w = _check_grid(grid)
    rows = [i * w + j for i in range(h) for j in range(w)]
    cols = [i * w + j for j in range(w) for i in range(h)]
    return torch.tensor([rows, cols, rows[::-1], cols[::-1]], dtype=torch.int64)


def cross_scan(x: Tensor) -> Tensor:
    """Cross-scan: (B, C, H, W) grid -> (B, K, C, L), sequence k in direction k's order.

    Two layouts (the grid and its transpose, flattened) and their reversal: three copies.
    """
    _check_maps(x)
    forward = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)  # (B, 2, C, L)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def cross_merge(y: Tensor, grid: tuple[int, int]) -> Tensor:
    """Cross-merge: (B, K, C, L) sequences in scan order -> (B, C, H, W), the sum over k of
    each sequence put back in grid order. The adjoint of `cross_scan`."""
    h, w = _check_grid(grid)
    _check_sequences(y, grid)
    y = y[:, :2] + y[:, 2:].flip(-1)  # (B, 2, C, L): the reversed directions back in forward order
    return y[:, 0].unflatten(-1, (h, w)) + y[:, 1].unflatten(-1, (w, h)).transpose(-2, -1)


def cross_scan_ref(x: Tensor) -> Tensor:
    """`cross_scan` by gathering the cells in the order listed by `scan_orders`."""
    _check_maps(x)
    orders = scan_orders(tuple(x.shape[-2:])).to(x.device)
    cells = x.flatten(2)  # (B, C, L), row-major
    return torch.stack([cells[..., order] for order in orders], dim=1)


def cross_merge_ref(y: Tensor, grid: tuple[int, int]) -> Tensor:
    """`cross_merge` by adding step t of direction k into the cell `scan_orders` lists for it."""
    h, w = _check_grid(grid)
    _check_sequences(y, grid)
    orders = scan_orders(grid).to(y.device)
    out = y.new_zeros(y.shape[0], y.shape[2], h * w)  # (B, C, L), row-major
    for k, order in enumerate(orders):
        out = out.index_add(-1, order, y[:, k])
    return out.unflatten(-1, (h, w))
