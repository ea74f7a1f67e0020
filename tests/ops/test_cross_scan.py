"""VMamba's cross-scan and cross-merge (ssm2d.ops.cross_scan): the four scan orders written out
cell by cell, fast against ref, merge as the inverse permutation and the adjoint, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import SIZES, size_id

from ssm2d.ops import SCAN_DIRECTIONS, cross_merge, cross_merge_ref, cross_scan, cross_scan_ref, scan_orders

F64 = torch.float64


def expected_order(direction: str, h: int, w: int) -> list[tuple[int, int]]:
    """Cells (i, j) in the order `direction` visits them."""
    if direction.startswith("row-major"):
        cells = [(i, j) for i in range(h) for j in range(w)]
    else:
        cells = [(i, j) for j in range(w) for i in range(h)]
    return cells[::-1] if direction.endswith("reversed") else cells


@pytest.mark.parametrize("grid", SIZES, ids=size_id)
def test_each_sequence_visits_the_cells_in_its_direction_order(grid):
    h, w = grid
    x = torch.randn(2, 3, h, w, dtype=F64)
    for fn in (cross_scan, cross_scan_ref):
        seqs = fn(x)
        assert seqs.shape == (2, 4, 3, h * w), f"{fn.__name__}: shape {tuple(seqs.shape)}"
        for k, direction in enumerate(SCAN_DIRECTIONS):
            expected = torch.stack([x[:, :, i, j] for i, j in expected_order(direction, h, w)], dim=-1)
            assert torch.equal(seqs[:, k], expected), f"{fn.__name__}: direction {k} ({direction}) on {grid}"
    orders = scan_orders(grid)
    for k, direction in enumerate(SCAN_DIRECTIONS):
        assert orders[k].tolist() == [i * w + j for i, j in expected_order(direction, h, w)]


@pytest.mark.parametrize("grid", SIZES, ids=size_id)
def test_merge_is_the_inverse_permutation_of_each_direction(grid):
    """Cross-merge of direction k of cross_scan(x) alone gives x back; of all four, 4 x."""
    h, w = grid
    x = torch.randn(2, 3, h, w, dtype=F64)
    seqs = cross_scan(x)
    for merge in (cross_merge, cross_merge_ref):
        for k in range(4):
            alone = torch.zeros_like(seqs)
            alone[:, k] = seqs[:, k]
            assert torch.equal(merge(alone, grid), x), f"{merge.__name__}: direction {k} on {grid}"
        assert torch.equal(merge(seqs, grid), 4 * x), f"{merge.__name__} of all four on {grid}"


@pytest.mark.parametrize("grid", [(5, 7), (9, 4), (1, 6), (6, 1), (3, 3)], ids=size_id)
def test_fast_matches_ref_and_merge_is_the_adjoint(grid):
    h, w = grid
    x = torch.randn(2, 3, h, w, dtype=F64, requires_grad=True)
    y = torch.randn(2, 4, 3, h * w, dtype=F64, requires_grad=True)
    assert torch.equal(cross_scan(x), cross_scan_ref(x))
    merged, merged_ref = cross_merge(y, grid), cross_merge_ref(y, grid)
    assert merged.shape == (2, 3, h, w)
    torch.testing.assert_close(merged, merged_ref, rtol=0, atol=1e-12)
    # <cross_scan(x), y> = <x, cross_merge(y)>: the gradient of one is the other.
    lhs, rhs = (cross_scan(x) * y).sum(), (x * merged).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
    (gx,) = torch.autograd.grad(lhs, x)
    torch.testing.assert_close(gx, merged.detach(), rtol=0, atol=1e-12)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"x: expected a \(B, C, H, W\) tensor, got \(3, 4, 5\)"):
        cross_scan(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"x: expected a \(B, C, H, W\)"):
        cross_scan_ref(torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(ValueError, match=r"y: expected \(B, 4, C, L\) with L = H \* W = 12, got \(1, 4, 2, 13\)"):
        cross_merge(torch.randn(1, 4, 2, 13), (3, 4))
    with pytest.raises(ValueError, match=r"y: expected \(B, 4, C, L\)"):
        cross_merge_ref(torch.randn(1, 2, 2, 12), (3, 4))
    for grid in [(0, 4), (3,), (2.0, 6), "3x4"]:
        with pytest.raises(ValueError, match="grid: expected"):
            scan_orders(grid)
