"""Token sequences <-> patch grids, with prefix (class) tokens kept apart.

Glossary: B batch, P prefix tokens, H x W grid, L = H * W, C channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["apply_on_tokens", "grid_to_tokens", "tokens_to_grid"]


def tokens_to_grid(tokens: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Split (B, P + H*W, C) tokens into prefix (B, P, C) and grid (B, H, W, C)."""
    h, w = grid_size
    if tokens.ndim != 3 or tokens.shape[1] != num_prefix_tokens + h * w:
        raise ValueError(
            f"tokens: expected shape (B, {num_prefix_tokens} + {h}*{w}, C) for grid_size={tuple(grid_size)} "
            f"and num_prefix_tokens={num_prefix_tokens}, got {tuple(tokens.shape)}"
        )
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    return prefix, patches.unflatten(1, (h, w))


def grid_to_tokens(prefix: Tensor, grid: Tensor) -> Tensor:
    """Inverse of `tokens_to_grid`: (B, P, C) and (B, H, W, C) -> (B, P + H*W, C)."""
    return torch.cat([prefix, grid.flatten(1, 2)], dim=1)


def apply_on_tokens(
    layer: Callable[[Tensor], Tensor],
    tokens: Tensor,
    grid_size: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> Tensor:
    """Run a (B, H, W, C) spatial layer on (B, P + H*W, C) tokens; prefix tokens pass untouched."""
    prefix, grid = tokens_to_grid(tokens, grid_size, num_prefix_tokens)
    return grid_to_tokens(prefix, layer(grid))
