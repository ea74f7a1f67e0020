"""spatial_prior and sp_attention against their refs, and the prior's geometry (docs/math.md §11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, grads, size_id

from ssm2d.ops import sp_attention, sp_attention_ref, spatial_prior, spatial_prior_ref

F64 = torch.float64
# Odd, non-square and degenerate grids small enough for the per-pair reference.
GRIDS = [(1, 1), (1, 7), (6, 1), (5, 7), (9, 4)]
PRIOR_FNS = [spatial_prior, spatial_prior_ref]


def random_prior_params(heads=3, hidden=5, dtype=F64) -> list[torch.Tensor]:
    """(w1, b1, w2, b2) with w2 != 0, so the prior varies with the offset."""
    shapes = [(heads, hidden, 2), (heads, hidden), (heads, hidden), (heads,)]
    return [(0.5 * torch.randn(*s, dtype=F64)).to(dtype).requires_grad_() for s in shapes]


def random_qkv(batch=2, heads=3, length=12, dim=4, dim_v=6, dtype=F64) -> list[torch.Tensor]:
    shapes = [(batch, heads, length, dim), (batch, heads, length, dim), (batch, heads, length, dim_v)]
    return [torch.randn(*s, dtype=F64).to(dtype).requires_grad_() for s in shapes]


def as_grid(prior: torch.Tensor, grid) -> torch.Tensor:
    """(h, L, L) -> (h, H, W, H, W): [h, y, x, y', x'] is the prior from (y, x) to (y', x')."""
    return prior.unflatten(-1, grid).unflatten(1, grid)


def f32_leaves(tensors) -> list[torch.Tensor]:
    return [t.detach().float().requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------
# Fast against ref


@pytest.mark.parametrize("grid", GRIDS, ids=size_id)
def test_prior_fast_float32_matches_ref_float64(grid):
    params = random_prior_params()
    ref = spatial_prior_ref(*params, grid)
    length = grid[0] * grid[1]
    assert ref.shape == (3, length, length) and ref.dtype == F64
    params32 = f32_leaves(params)
    fast = spatial_prior(*params32, grid)
    assert fast.dtype == torch.float32
    assert_close(fast, ref, torch.float32, f"prior {grid}")
    upstream = torch.randn_like(ref)
    g_fast, g_ref = grads(fast, params32, upstream.float()), grads(ref, params, upstream)
    for name, g_f, g_r in zip(("w1", "b1", "w2", "b2"), g_fast, g_ref):
        if name != "w1" or length > 1:  # one token: the only offset is r = 0
            assert g_r.abs().max() > 0, f"grad {name} is zero: the comparison proves nothing"
        assert_close(g_f, g_r, torch.float32, f"prior grad {name} {grid}")


@pytest.mark.parametrize("grid", GRIDS, ids=size_id)
def test_prior_fast_matches_ref_float64(grid):
    params = random_prior_params()
    assert_close(spatial_prior(*params, grid), spatial_prior_ref(*params, grid), F64, f"prior {grid}")


@pytest.mark.parametrize("batch_prior", [False, True], ids=["shared_prior", "batch_prior"])
@pytest.mark.parametrize("grid", [(1, 1), (5, 7), (9, 4), (3, 2)], ids=size_id)
def test_attention_fast_float32_matches_ref_float64(grid, batch_prior):
    length = grid[0] * grid[1]
    q, k, v = random_qkv(length=length)
    prior = spatial_prior(*random_prior_params(), grid).detach()  # (h, L, L)
    if batch_prior:
        prior = prior * (1 + 0.3 * torch.randn(2, *prior.shape, dtype=F64))  # (B, h, L, L)
    prior.requires_grad_()
    inputs = [q, k, v, prior]
    ref = sp_attention_ref(*inputs)
    assert ref.shape == (2, 3, length, 6) and ref.dtype == F64
    inputs32 = f32_leaves(inputs)
    fast = sp_attention(*inputs32)
    assert_close(fast, ref, torch.float32, f"attention {grid}")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip("qkvp", grads(fast, inputs32, upstream.float()), grads(ref, inputs, upstream)):
        if length > 1:  # one token: the softmax is constant, only v matters
            assert g_ref.abs().max() > 0, f"grad {name} is zero: the comparison proves nothing"
        assert_close(g_fast, g_ref, torch.float32, f"attention grad {name} {grid}")


def test_attention_scale_argument():
    q, k, v = random_qkv()
    prior = 1 + torch.rand(3, 12, 12, dtype=F64)
    fast, ref = sp_attention(q, k, v, prior, scale=0.7), sp_attention_ref(q, k, v, prior, scale=0.7)
    assert_close(fast, ref, F64, "scale 0.7")
    # The scale and the prior both multiply the logits.
    assert_close(sp_attention(q, k, v, 0.7 * prior, scale=1.0), fast, F64, "scale folded into the prior")
    assert (fast - sp_attention(q, k, v, prior)).abs().max() > 1e-3


@pytest.mark.parametrize("fn", [sp_attention, sp_attention_ref], ids=["fast", "ref"])
def test_unit_prior_is_plain_attention(fn):
    q, k, v = random_qkv(length=10)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert_close(fn(q, k, v, torch.ones(3, 10, 10, dtype=F64)), expected, F64, "SP == 1 vs SDPA")


# ---------------------------------------------------------------------------------------------
# Geometry of the prior


@pytest.mark.parametrize("fn", PRIOR_FNS, ids=["fast", "ref"])
@pytest.mark.parametrize("grid", [(5, 7), (4, 3)], ids=size_id)
def test_prior_depends_on_relative_offset_only(fn, grid):
    prior = as_grid(fn(*random_prior_params(), grid).detach(), grid)  # (h, H, W, H, W)
    # Translating both tokens by one row or one column leaves the prior unchanged ...
    assert torch.equal(prior[:, 1:, :, 1:, :], prior[:, :-1, :, :-1, :])
    assert torch.equal(prior[:, :, 1:, :, 1:], prior[:, :, :-1, :, :-1])
    # ... but moving one of them changes it, and the prior is not symmetric: SP(r) != SP(-r).
    assert (prior[:, 0, 0, 1:, :] - prior[:, 0, 0, :-1, :]).abs().max() > 1e-3
    assert (prior[:, 0, 0, :, 1:] - prior[:, 0, 0, :, :-1]).abs().max() > 1e-3
    assert (prior - prior.permute(0, 3, 4, 1, 2)).abs().max() > 1e-3


@pytest.mark.parametrize("fn", PRIOR_FNS, ids=["fast", "ref"])
def test_prior_offsets_are_dx_dy_in_patch_steps(fn):
    """r_ij = (x_j - x_i, y_j - y_i), unnormalised (docs/math.md §11): a one-unit MLP reads them back."""
    grid = (3, 4)
    zero = torch.zeros(1, 1, dtype=F64)
    for axis in (0, 1):  # 0: dx, 1: dy
        w1 = torch.zeros(1, 1, 2, dtype=F64)
        w1[0, 0, axis] = 1.0
        b1 = torch.full((1, 1), 10.0, dtype=F64)  # ReLU(r + 10) = r + 10 on these grids
        prior = as_grid(fn(w1, b1, torch.ones(1, 1, dtype=F64), torch.full((1,), -10.0, dtype=F64), grid), grid)[0]
        y, x = torch.meshgrid(torch.arange(3.0, dtype=F64), torch.arange(4.0, dtype=F64), indexing="ij")
        coord = x if axis == 0 else y  # (H, W)
        expected = coord[None, None, :, :] - coord[:, :, None, None]  # (H, W, H, W)
        assert torch.equal(prior, expected), f"axis {axis}"
    constant = fn(torch.zeros(1, 1, 2, dtype=F64), zero, zero, torch.ones(1, dtype=F64), grid)
    assert torch.equal(constant, torch.ones(1, 12, 12, dtype=F64)), "w2 = 0, b2 = 1 must give SP == 1"


@pytest.mark.parametrize("fn", PRIOR_FNS, ids=["fast", "ref"])
def test_prior_extends_to_larger_non_square_grids(fn):
    """The MLP takes raw offsets: on a larger grid, the tokens of a smaller window see the same prior."""
    params = random_prior_params()
    small = as_grid(fn(*params, (3, 2)), (3, 2))
    large = as_grid(fn(*params, (4, 6)), (4, 6))
    assert_close(large[:, :3, :2, :3, :2], small, F64, "top-left window")
    assert_close(large[:, 1:, 4:, 1:, 4:], small, F64, "bottom-right window")
    assert (large.abs().amax((1, 2, 3, 4)) > 0).all()


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("fn", PRIOR_FNS, ids=["fast", "ref"])
def test_prior_bad_input(fn):
    w1, b1, w2, b2 = (p.detach() for p in random_prior_params())
    with pytest.raises(ValueError, match=r"grid: expected \(H, W\)"):
        fn(w1, b1, w2, b2, (0, 3))
    with pytest.raises(ValueError, match="grid"):
        fn(w1, b1, w2, b2, (3,))
    with pytest.raises(ValueError, match="grid"):
        fn(w1, b1, w2, b2, (2.5, 3))
    with pytest.raises(ValueError, match=r"w1: expected shape \(h, k, 2\)"):
        fn(w1[..., :1], b1, w2, b2, (2, 3))
    with pytest.raises(ValueError, match=r"w2: expected shape \(3, 5\)"):
        fn(w1, b1, w2[:, :4], b2, (2, 3))
    with pytest.raises(ValueError, match=r"b2: expected shape \(3,\)"):
        fn(w1, b1, w2, b2[:2], (2, 3))
    with pytest.raises(ValueError, match="b1: expected a floating-point tensor"):
        fn(w1, b1.long(), w2, b2, (2, 3))
    with pytest.raises(TypeError, match="w2: expected a torch.Tensor"):
        fn(w1, b1, [1.0], b2, (2, 3))


@pytest.mark.parametrize("fn", [sp_attention, sp_attention_ref], ids=["fast", "ref"])
def test_attention_bad_input(fn):
    q, k, v = (t.detach() for t in random_qkv())
    prior = torch.ones(3, 12, 12, dtype=F64)
    with pytest.raises(ValueError, match=r"q: expected shape \(B, h, L, d\)"):
        fn(q[0], k, v, prior)
    with pytest.raises(ValueError, match="k: expected shape"):
        fn(q, k[..., :3], v, prior)
    with pytest.raises(ValueError, match="v: expected shape"):
        fn(q, k, v[:, :, :11], prior)
    with pytest.raises(ValueError, match=r"prior: expected shape \(3, 12, 12\) or \(2, 3, 12, 12\)"):
        fn(q, k, v, prior[:, :11])
    with pytest.raises(ValueError, match="prior: expected shape"):
        fn(q, k, v, torch.ones(1, 12, 12, dtype=F64))
    with pytest.raises(ValueError, match="q: expected a floating-point tensor"):
        fn(q.long(), k, v, prior)
    with pytest.raises(TypeError, match="prior: expected a torch.Tensor"):
        fn(q, k, v, 1.0)
