"""The V2M layer (docs/math.md §10): output against a loop oracle, fast vs ref path, receptive
fields of the four corners, the released layout against the appendix trace, init, errors."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from conftest import assert_mamba_scans_in_float32, assert_close, param_grads, rel_fro, size_id, tiny_vit

import ssm2d
from ssm2d.layers import V2M
from ssm2d.models import add_spatial_layers, spatial_layers

F64 = torch.float64
GRIDS = [(5, 7), (9, 4), (1, 6), (6, 1), (3, 3)]


def make_layer(dim=4, state_dim=3, dtype=F64, **kwargs) -> V2M:
    return V2M(dim, state_dim=state_dim, **kwargs).to(dtype)


def random_input(layer: V2M, grid, batch=2, dtype=F64) -> torch.Tensor:
    return torch.randn(batch, *grid, layer.dim, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Loop oracle: every row and column scanned as its own 1-D sequence, the corners written out.


def two_pass(layer: V2M, xz: torch.Tensor) -> torch.Tensor:
    """Pass 1 along each row, then pass 2 along each column of (B, H, W, 2E): (B, H, W, E)."""
    u, z = xz.chunk(2, dim=-1)  # (B, H, W, E) each
    h, w = u.shape[1:3]
    rows = [layer.pass1(u[:, i].mT, z[:, i].mT, False) for i in range(h)]  # (B, E, W) each, ref ops
    u1 = torch.stack(rows, dim=1)  # (B, H, E, W)
    cols = [layer.pass2(u1[..., j].mT, z[:, :, j].mT, False) for j in range(w)]  # (B, E, H) each
    return torch.stack(cols, dim=-1).permute(0, 2, 3, 1)  # (B, H, W, E)


def oracle(layer: V2M, x: torch.Tensor) -> torch.Tensor:
    xz = layer.in_proj(x)
    if not layer.official_layout:
        # top-left, top-right, bottom-left, bottom-right: flip, scan, flip back; average
        corners = [two_pass(layer, xz.flip(dims)).flip(dims) for dims in ((), (2,), (1,), (1, 2))]
        y = layer.out_proj(sum(corners) / 4)
    else:
        # Spec 3.1: fh (top-left, rows first) and fv (top-left, columns first) at (a, b) hold
        # token (b, a); bh (top-right, rows first) token (P-1-b, a); bv (bottom-left, columns
        # first) token (b, P-1-a); summed and halved.
        t = lambda g: g.transpose(1, 2)  # noqa: E731
        fh = two_pass(layer, xz)
        fv = t(two_pass(layer, t(xz)))
        bh = two_pass(layer, xz.flip(2)).flip(2)
        bv = t(two_pass(layer, t(xz.flip(1)))).flip(1)
        p = x.shape[1]
        out = torch.zeros_like(fh)
        for a in range(p):
            for b in range(p):
                out[:, a, b] = fh[:, b, a] + fv[:, b, a] + bh[:, p - 1 - b, a] + bv[:, b, p - 1 - a]
        y = layer.out_proj(out / 2)
    return x + y if layer.skip else y


@pytest.mark.parametrize("grid", GRIDS, ids=size_id)
@pytest.mark.parametrize("full_bc", [False, True], ids=["split_bc", "full_bc"])
def test_matches_loop_oracle(grid, full_bc):
    layer = make_layer(full_bc=full_bc)
    x = random_input(layer, grid)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == F64
    assert_close(y, oracle(layer, x), F64, f"V2M {grid} vs loop oracle")


@pytest.mark.parametrize("p", [1, 4, 5])
def test_official_layout_matches_loop_oracle(p):
    layer = make_layer(official_layout=True)
    x = random_input(layer, (p, p))
    assert_close(layer(x), oracle(layer, x), F64, f"official layout {p}x{p} vs loop oracle")


def test_skip_adds_input():
    layer = make_layer(skip=True)
    plain = make_layer(skip=False)
    plain.load_state_dict(layer.state_dict())
    x = random_input(layer, (4, 5))
    assert_close(layer(x), x + plain(x), F64, "skip")


def test_full_bc_projects_b_and_c():
    split, full = make_layer(dim=8, state_dim=5), make_layer(dim=8, state_dim=5, full_bc=True)
    assert split.dt_rank == full.dt_rank == 1  # ceil(8 / 16)
    assert split.pass1.x_proj.out_features == split.pass2.x_proj.out_features == 1 + 5
    assert full.pass1.x_proj.out_features == full.pass2.x_proj.out_features == 1 + 2 * 5
    assert (split.pass1.learned, split.pass2.learned, full.pass1.learned) == ("B", "C", "BC")


# ---------------------------------------------------------------------------------------------
# Fast path against the sequential reference


@pytest.mark.parametrize(
    "grid, options",
    [((5, 7), {}), ((9, 4), {}), ((1, 6), {}), ((6, 1), {}), ((5, 7), {"full_bc": True}),
     ((5, 5), {"official_layout": True}), ((4, 6), {"skip": True})],
    ids=["5x7", "9x4", "1x6", "6x1", "5x7-full_bc", "5x5-official", "4x6-skip"],
)  # fmt: skip
def test_fast_path_matches_ref(grid, options):
    fast = make_layer(dim=6, state_dim=4, dtype=torch.float32, **options)
    ref = copy.deepcopy(fast).to(F64)
    ref.fast_path = False
    x = random_input(fast, grid, dtype=torch.float32).requires_grad_()
    x_ref = x.detach().to(F64).requires_grad_()
    y_fast, y_ref = fast(x), ref(x_ref)
    assert y_fast.dtype == torch.float32
    assert_close(y_fast, y_ref, torch.float32, "fast vs ref forward")
    upstream = torch.randn_like(y_ref)
    expected = param_grads(ref, x_ref, upstream)
    actual = param_grads(fast, x, upstream.float())
    assert actual.keys() == expected.keys()
    # A pass along an axis of length 1 never decays a state: its A gets no gradient.
    dead = {"pass1.A_log"} if grid[1] == 1 else {"pass2.A_log"} if grid[0] == 1 else set()
    for name in expected:
        peak = expected[name].abs().max().item()
        assert (peak > 0) != (name in dead), f"grad {name}: max abs {peak:.3e}, expected zero: {name in dead}"
        assert_close(actual[name], expected[name], torch.float32, f"grad {name}")


def test_fast_path_flag_selects_the_ops(monkeypatch):
    import ssm2d.layers.mamba as v2m_module  # the ops are called by the shared inner module

    calls = []
    for name in ("selective_scan_ref", "causal_conv1d_ref"):
        original = getattr(v2m_module, name)
        monkeypatch.setattr(v2m_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    layer = make_layer()
    x = random_input(layer, (3, 4))
    layer(x)
    assert calls == [], f"fast path called {calls}"
    layer.fast_path = False
    layer(x)
    # one conv and one scan for pass 1, and for pass 2 forwards and in reverse along the columns
    expected = ["causal_conv1d_ref", "selective_scan_ref"] * 3
    assert calls == expected, f"ref path: expected {expected}, got {calls}"
    assert "fast_path=False" in repr(layer)


# ---------------------------------------------------------------------------------------------
# Receptive fields


def support(fn, x: torch.Tensor, branch: int | None = None) -> torch.Tensor:
    """Which input cells each output cell depends on: (H, W, H, W) bool, [i, j, i', j'].

    One backward for all cells: x (1, H, W, C) is repeated over a batch of H*W samples, and
    sample m back-propagates only from output cell m; samples are independent (checked in
    `test_output_depends_on_all_four_quadrants_and_nothing_else`). `fn(x)` gives (B, H, W, C)
    or, with `branch`, (k, B, H, W, E) from which branch `branch` is taken.
    """
    _, h, w, c = x.shape
    xs = x.detach().expand(h * w, h, w, c).clone().requires_grad_()
    out = fn(xs) if branch is None else fn(xs)[branch]  # (HW, H, W, C')
    upstream = torch.zeros_like(out)
    cells = torch.arange(h * w)
    upstream[cells, cells // w, cells % w] = torch.rand(h * w, out.shape[-1], dtype=out.dtype) + 0.5
    (g,) = torch.autograd.grad(out, xs, upstream)
    return (g.abs().sum(-1) > 0).reshape(h, w, h, w)


def quadrant(grid, corner: str) -> torch.Tensor:
    """(H, W, H, W) bool: cell (i', j') lies in the `corner` quadrant of (i, j), boundary included."""
    h, w = grid
    i, j = torch.arange(h)[:, None, None, None], torch.arange(w)[None, :, None, None]
    i2, j2 = torch.arange(h)[None, None, :, None], torch.arange(w)[None, None, None, :]
    rows = (i2 <= i) if corner[0] == "t" else (i2 >= i)
    cols = (j2 <= j) if corner[1] == "l" else (j2 >= j)
    return rows & cols


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
@pytest.mark.parametrize("grid", [(5, 7), (9, 4), (1, 6)], ids=size_id)
def test_each_corner_sees_exactly_its_quadrant(grid, fast_path):
    layer = make_layer()
    layer.fast_path = fast_path
    x = random_input(layer, grid, batch=1)
    for k, corner in enumerate(("tl", "tr", "bl", "br")):
        got, expected = support(layer.orientation_outputs, x, k), quadrant(grid, corner)
        wrong = (got != expected).nonzero().tolist()
        assert not wrong, f"corner {corner} on {grid}: {len(wrong)} wrong dependencies, e.g. [i, j, i', j'] {wrong[:3]}"


@pytest.mark.parametrize("grid", [(5, 7), (9, 4)], ids=size_id)
def test_output_depends_on_all_four_quadrants_and_nothing_else(grid):
    layer = make_layer()
    h, w = grid
    x = random_input(layer, grid, batch=3).requires_grad_()
    y = layer(x)
    # Every output cell depends on every input cell of its own image ...
    dep = support(layer, x[1:2])
    assert dep.all(), f"{int((~dep).sum())} of {dep.numel()} (output, input) cell pairs without dependence"
    # ... in particular on the strict quadrants that only one corner reaches (the released
    # code has no bottom-right corner) ...
    i, j = h // 2, w // 2
    (g,) = torch.autograd.grad(y[1, i, j].sum(), x)
    cell = g[1].abs().sum(-1)  # (H, W)
    for name, q in (("top-left", cell[:i, :j]), ("top-right", cell[:i, j + 1 :]),
                    ("bottom-left", cell[i + 1 :, :j]), ("bottom-right", cell[i + 1 :, j + 1 :])):  # fmt: skip
        assert q.numel() and (q > 0).all(), f"output ({i}, {j}) does not depend on its whole {name} quadrant"
    # ... and on nothing of the other images of the batch.
    assert g[0].abs().max() == 0 and g[2].abs().max() == 0, "the output leaks across the batch"


@pytest.mark.parametrize("corner", ["tl", "tr", "bl", "br"])
def test_corner_ignores_cells_outside_the_grid(corner):
    """Embed a 5 x 7 grid at one corner of a larger 8 x 11 grid of other values: that corner's
    branch on the embedded cells is unchanged (nothing outside its quadrant leaks in), while
    the opposite corner's branch changes (so the check can fail)."""
    layer = make_layer()
    k = ("tl", "tr", "bl", "br").index(corner)
    x = random_input(layer, (5, 7), batch=2)
    big = random_input(layer, (8, 11), batch=2)
    rows = slice(0, 5) if corner[0] == "t" else slice(3, 8)
    cols = slice(0, 7) if corner[1] == "l" else slice(4, 11)
    big[:, rows, cols] = x
    alone, embedded = layer.orientation_outputs(x), layer.orientation_outputs(big)[:, :, rows, cols]
    assert_close(embedded[k], alone[k], F64, f"corner {corner} embedded vs alone")
    assert rel_fro(embedded[3 - k], alone[3 - k]) > 1e-3, "the opposite corner did not see the surrounding cells"


# ---------------------------------------------------------------------------------------------
# The released layout against the V2M index trace of docs/math.md §10


def appendix_trace(p: int) -> list[np.ndarray]:
    """The spec appendix replica of the released `Mamba.forward` (bimamba_type "2d"), with each
    scan a cumulative OR over one-hot token ids, completed by the code's final merge
    ``out = reshape(o_fh) + transpose(o_fv); out_b = reshape(o_bh) + transpose(o_bv);
    out + out_b.flip(L)``. Returns per branch fh, fv, bh, bv an (L, L) bool array:
    [output index, token] = the output depends on the token (receptive field or gate)."""
    n = p * p
    hs = np.eye(n)[None]
    scan = lambda a: np.maximum.accumulate(a, axis=-1)  # noqa: E731
    fh = hs.reshape(p, p, n)
    fv = hs.reshape(1, p, p, n).transpose(0, 2, 1, 3).reshape(p, p, n)
    xs = np.concatenate([fh, fv, fh[:, ::-1], fv[:, ::-1]], 0).transpose(0, 2, 1)
    u = np.concatenate([scan(xs), xs], 1)  # pass 1, then the gate z carried along
    u = u.transpose(0, 2, 1).reshape(-1, p, p, 2 * n).transpose(0, 2, 1, 3).reshape(4 * p, p, 2 * n)
    u = u.transpose(0, 2, 1)
    y = scan(u[:, :n]).transpose(0, 2, 1).reshape(-1, p, p, n)  # pass 2
    gate = u[:, n:].transpose(0, 2, 1).reshape(-1, p, p, n)
    dep = np.maximum(y, gate) > 0  # (4, P, P, L)
    flat = lambda a: a.reshape(n, n)  # noqa: E731
    transposed = lambda a: a.transpose(1, 0, 2).reshape(n, n)  # noqa: E731
    return [flat(dep[0]), transposed(dep[1]), flat(dep[2])[::-1], transposed(dep[3])[::-1]]


def test_appendix_trace_reproduces_the_spec_findings():
    """The replica gives the examples of docs/math.md §10 at P = 4."""
    fh, _, bh, bv = appendix_trace(4)
    tokens = lambda row: {divmod(int(t), 4) for t in np.nonzero(row)[0]}  # noqa: E731
    assert tokens(fh[1]) == {(0, 0), (1, 0)}  # index (0, 1): top-left quadrant of token (1, 0)
    assert tokens(bh[0]) == {(r, c) for r in range(4) for c in range(4)}  # top-right of (3, 0)
    assert tokens(bh[5]) == {(r, c) for r in range(3) for c in range(1, 4)}  # (1, 1): top-right of (2, 1)
    assert tokens(bv[5]) == {(r, c) for r in range(1, 4) for c in range(3)}  # (1, 1): bottom-left of (1, 2)


@pytest.mark.parametrize("p", [4, 5])
def test_official_layout_matches_appendix_trace(p):
    layer = make_layer(official_layout=True)
    x = random_input(layer, (p, p), batch=1)
    for k, (name, expected) in enumerate(zip(("fh", "fv", "bh", "bv"), appendix_trace(p))):
        got = support(layer.orientation_outputs, x, k).reshape(p * p, p * p).numpy()
        wrong = np.argwhere(got != expected).tolist()
        assert not wrong, f"branch {name} at P={p}: {len(wrong)} (output, token) pairs differ, e.g. {wrong[:3]}"


def test_official_layout_output_misses_cells():
    """What the faithful layout fixes: the released merge sums branches at misaligned cells, so
    its output at the bottom-left cell (P-1, 0) sees only row 0 and columns 0 and P-1 (docs/math.md
    §10: fh, fv give the top-left quadrant of (0, P-1), bh the top-right of (P-1, P-1), bv the
    bottom-left of (0, 0)). Every faithful output sees the whole grid."""
    p = 5
    official, faithful = make_layer(official_layout=True), make_layer()
    faithful.load_state_dict(official.state_dict())
    x = random_input(official, (p, p), batch=1)
    seen = support(official, x)[p - 1, 0]  # (H, W)
    expected = torch.zeros(p, p, dtype=torch.bool)
    expected[0, :] = expected[:, 0] = expected[:, p - 1] = True
    assert torch.equal(seen, expected), f"official output ({p - 1}, 0) depends on\n{seen.int()}"
    assert support(faithful, x)[p - 1, 0].all()


# ---------------------------------------------------------------------------------------------
# Initialization, optimizer tags, identity, ViT placement


def test_initialization_follows_mamba():
    layer = V2M(32, state_dim=16)
    for p in (layer.pass1, layer.pass2):
        assert_close(torch.exp(p.A_log), torch.arange(1, 17.0).expand(64, 16), torch.float32, "S4D-Real A = -n")
        assert torch.equal(p.D, torch.ones(64))
        dt = torch.nn.functional.softplus(p.dt_proj.bias)
        assert 1e-3 * (1 - 1e-6) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-6), (dt.min(), dt.max())
    assert layer.dt_rank == 2 and layer.pass1.dt_proj.weight.abs().max() <= 2**-0.5
    before = copy.deepcopy(layer.state_dict())
    layer.reset_parameters()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items() if "A_log" in k or k.endswith(".D"))
    assert not torch.equal(layer.in_proj.weight, before["in_proj.weight"]), "reset_parameters did not re-draw"


def test_ssm_parameters_skip_weight_decay():
    layer = make_layer()
    expected = {f"{p}.{n}" for p in ("pass1", "pass2") for n in ("A_log", "D", "dt_proj.bias")}
    for model in (layer, copy.deepcopy(layer)):
        groups = ssm2d.param_groups(model, weight_decay=0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
        assert expected <= no_decay, f"missing from the no-decay group: {expected - no_decay}"
        assert "pass1.A_log" not in decay and "in_proj.weight" in decay and "pass1.x_proj.weight" in decay


def test_reset_to_identity():
    layer = make_layer(skip=True)
    layer.reset_to_identity()
    x = random_input(layer, (5, 7))
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError, match="skip=True"):
        make_layer().reset_to_identity()


def test_drops_into_vit_pre_attention():
    model = add_spatial_layers(tiny_vit(num_heads=2, reg_tokens=0), layer=partial(V2M, state_dim=4))
    layers = spatial_layers(model)
    assert len(layers) == 2 and all(isinstance(m, V2M) and m.dim == 24 for m in layers)
    x = torch.randn(2, 3, 28, 36)  # a non-square 7 x 9 grid
    model(x).square().mean().backward()
    for m in layers:
        assert m.pass2.A_log.grad.abs().max() > 0 and m.in_proj.weight.grad.abs().max() > 0
    # Identity insertion keeps a model's outputs.
    base = tiny_vit(num_heads=2, reg_tokens=0).eval()
    with torch.no_grad():
        expected = base(x)
        add_spatial_layers(base, layer=partial(V2M, state_dim=4, skip=True), init="identity")
        assert torch.equal(base(x), expected)
    with pytest.raises(ValueError, match="skip=True"):
        add_spatial_layers(tiny_vit(num_heads=2, reg_tokens=0), layer=V2M, init="identity")


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_input_raises():
    layer = make_layer(dim=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=4, got \(2, 5, 7, 3\)"):
        layer(torch.randn(2, 5, 7, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=4"):
        layer(torch.randn(35, 4, dtype=F64))
    for grid in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="expected a grid with H >= 1 and W >= 1"):
            layer(torch.randn(2, *grid, 4, dtype=F64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="square grid, got H x W = 4 x 5"):
        make_layer(official_layout=True)(torch.randn(1, 4, 5, 4, dtype=F64))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 0}, "dim"), ({"dim": 8, "state_dim": 2.5}, "state_dim"), ({"dim": 8, "expand": True}, "expand"),
     ({"dim": 8, "dt_rank": 0}, "dt_rank"), ({"dim": 8, "conv_size": 0}, "conv_size")],
)  # fmt: skip
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        V2M(**kwargs)


def test_misspelled_argument_raises_type_error():
    with pytest.raises(TypeError):
        V2M(8, state_size=4)


def test_extra_repr_shows_configuration():
    text = repr(V2M(8, state_dim=4, full_bc=True, official_layout=True, skip=True))
    for part in ("dim=8", "state_dim=4", "expand=2", "dt_rank=1", "conv_size=4", "full_bc=True",
                 "official_layout=True", "skip=True", "fast_path=True", "learned='BC'"):  # fmt: skip
        assert part in text, f"{part} not in {text}"


@pytest.mark.parametrize("official_layout", [False, True])
def test_batch_zero_gives_an_empty_output(official_layout):
    layer = make_layer(official_layout=official_layout)
    x = torch.randn(0, 3, 3, 4, dtype=F64)
    for fast_path in (True, False):
        layer.fast_path = fast_path
        assert layer(x).shape == x.shape
        assert layer.orientation_outputs(x).shape == (4, 0, 3, 3, 8)


# ---------------------------------------------------------------------------------------------
# Written-out oracle of the two passes (docs/math.md §10), independent of the layer's scan modules


def naive_pass(p, u: torch.Tensor, z: torch.Tensor, learned: str) -> torch.Tensor:
    """One Mamba inner op, every step by hand, from the pass's raw parameters: (S, E, L) -> (S, E, L).

    learned="B": B_t = x_proj(u~_t) and C = 1 (pass 1); learned="C": B = 1 and C_t from x_proj (pass 2).
    """
    s, e, length = u.shape
    width, rank, n = p.conv1d.weight.shape[-1], p.dt_proj.in_features, p.A_log.shape[1]
    taps = p.conv1d.weight[:, 0]  # (E, W), oldest first
    conv = []
    for t in range(length):
        acc = p.conv1d.bias.expand(s, e)
        for k in range(width):
            if t - (width - 1) + k >= 0:
                acc = acc + taps[:, k] * u[..., t - (width - 1) + k]
        conv.append(acc)
    uu = torch.stack(conv, -1)
    uu = uu * torch.sigmoid(uu)  # silu
    A = -torch.exp(p.A_log)  # (E, N)
    h = torch.zeros(s, e, n, dtype=u.dtype)
    ys = []
    for t in range(length):
        proj = uu[..., t] @ p.x_proj.weight.t()  # (S, R + N)
        delta = torch.nn.functional.softplus(proj[:, :rank] @ p.dt_proj.weight.t() + p.dt_proj.bias)  # (S, E)
        sel = proj[:, rank:]  # (S, N)
        b_t = sel if learned == "B" else torch.ones_like(sel)
        c_t = sel if learned == "C" else torch.ones_like(sel)
        h = torch.exp(delta[..., None] * A) * h + (delta * uu[..., t])[..., None] * b_t[:, None, :]
        y = (h * c_t[:, None, :]).sum(-1) + p.D * uu[..., t]
        ys.append(y * z[..., t] * torch.sigmoid(z[..., t]))
    return torch.stack(ys, -1)


def naive_v2m(layer: V2M, x: torch.Tensor) -> torch.Tensor:
    """Faithful V2M (docs/math.md §10): per corner, pass 1 (learned B, C = 1) along each row, pass 2
    (B = 1, learned C) along each column of its gated output, un-flip; average; out_proj."""
    xz = x @ layer.in_proj.weight.t()  # (B, H, W, 2E)
    corners = []
    for dims in ((), (2,), (1,), (1, 2)):
        u, z = xz.flip(dims).chunk(2, dim=-1)  # (B, H, W, E) each
        h, w = u.shape[1:3]
        rows = torch.stack([naive_pass(layer.pass1, u[:, i].mT, z[:, i].mT, "B") for i in range(h)], 1)  # (B, H, E, W)
        cols = [naive_pass(layer.pass2, rows[..., j].mT, z[:, :, j].mT, "C") for j in range(w)]  # (B, E, H) each
        corners.append(torch.stack(cols, -1).permute(0, 2, 3, 1).flip(dims))  # (B, H, W, E)
    return (sum(corners) / 4) @ layer.out_proj.weight.t()


def randomized(layer: V2M) -> V2M:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("grid", [(3, 4), (1, 5), (4, 1)], ids=size_id)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
def test_matches_the_written_out_two_pass_oracle(grid, fast_path):
    layer = randomized(make_layer())
    layer.fast_path = fast_path
    x = random_input(layer, grid)
    assert_close(layer(x), naive_v2m(layer, x), F64, "V2M vs the written-out oracle")


def test_the_oracle_tells_swapped_b_and_c_roles_apart():
    """With pass 1 learning C (B = 1) and pass 2 learning B (C = 1) the layer must leave the oracle."""
    layer = randomized(make_layer())
    x = random_input(layer, (3, 4))
    expected = naive_v2m(layer, x)
    layer.pass1.learned, layer.pass2.learned = "C", "B"  # same x_proj widths, roles swapped
    assert rel_fro(layer(x), expected) > 1e-3


# ---------------------------------------------------------------------------------------------
# Dtypes and second derivatives


def test_a_d_and_dt_bias_stay_float32_in_a_bfloat16_layer(monkeypatch):
    layer = make_layer(dtype=torch.bfloat16)
    run = lambda: layer(random_input(layer, (2, 3), dtype=torch.bfloat16))  # noqa: E731
    assert_mamba_scans_in_float32(monkeypatch, run, calls=3)  # pass 1, pass 2 forwards and in reverse

def test_reference_path_passes_gradgradcheck():
    layer = randomized(make_layer(dim=2, state_dim=2, expand=1))
    layer.fast_path = False
    x = torch.randn(1, 2, 3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: layer(t), (x,))


def test_fast_path_double_backward_raises_a_clear_error():
    layer = make_layer()
    x = random_input(layer, (2, 3)).requires_grad_()
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported.*fast_path = False"):
        g.sum().backward()
