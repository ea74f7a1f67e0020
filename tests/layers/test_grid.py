"""Token sequences <-> patch grids around a spatial layer (docs/math.md §7)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, size_id

from ssm2d import SSM2D
from ssm2d.layers import apply_on_tokens, grid_to_tokens, tokens_to_grid


@pytest.mark.parametrize("grid", [(5, 7), (1, 6), (4, 4)], ids=size_id)
@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_apply_on_tokens_matches_grid_layer(prefix, grid):
    layer = SSM2D(8, state_dim=4).double()
    h, w = grid
    tokens = torch.randn(3, prefix + h * w, 8, dtype=torch.float64)
    out = apply_on_tokens(layer, tokens, grid, num_prefix_tokens=prefix)
    assert out.shape == tokens.shape
    assert torch.equal(out[:, :prefix], tokens[:, :prefix]), "prefix tokens must pass bit-identical"
    # row-major patch order: token prefix + i * W + j is cell (i, j)
    expected = layer(tokens[:, prefix:].reshape(3, h, w, 8)).reshape(3, h * w, 8)
    assert_close(out[:, prefix:], expected, torch.float64, "patch tokens")
    assert not torch.allclose(out[:, prefix:], tokens[:, prefix:])


@pytest.mark.parametrize("count", [4 + 5 * 7 - 1, 4 + 5 * 7 + 1, 5 * 7])
def test_wrong_token_count_raises(count):
    layer = SSM2D(8, state_dim=4)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, 4 \+ 5\*7, C\)"):
        apply_on_tokens(layer, torch.randn(2, count, 8), (5, 7), num_prefix_tokens=4)


def test_tokens_must_be_3d():
    with pytest.raises(ValueError, match=r"tokens: expected shape"):
        tokens_to_grid(torch.randn(2, 1, 12, 8), (3, 4))


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_round_trip_is_exact(prefix):
    tokens = torch.randn(2, prefix + 9 * 4, 5)
    head, grid = tokens_to_grid(tokens, (9, 4), num_prefix_tokens=prefix)
    assert head.shape == (2, prefix, 5) and grid.shape == (2, 9, 4, 5)
    assert torch.equal(grid[:, 2, 3], tokens[:, prefix + 2 * 4 + 3])
    assert torch.equal(grid_to_tokens(head, grid), tokens)
