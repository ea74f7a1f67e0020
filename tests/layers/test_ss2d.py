"""The SS2D layer (VMamba, docs/math.md SS2D): output against a cell-by-cell oracle, fast vs ref
path, the receptive field of each scan direction, double backward, init, errors."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, grads, size_id
from timm.models.vision_transformer import VisionTransformer

import ssm2d
from ssm2d.layers import SS2D
from ssm2d.models import add_spatial_layers, spatial_layers
from ssm2d.ops import cross_merge

F64 = torch.float64
DIRECTIONS = ("row-major", "column-major", "row-major reversed", "column-major reversed")


def make_layer(dim=4, state_dim=3, dtype=F64, **kwargs) -> SS2D:
    return SS2D(dim, state_dim=state_dim, **kwargs).to(dtype)


def random_input(layer: SS2D, grid, batch=2, dtype=F64) -> torch.Tensor:
    return torch.randn(batch, *grid, layer.dim, dtype=dtype)


def scan_order(direction: str, h: int, w: int) -> list[tuple[int, int]]:
    """Cells (i, j) in the order `direction` visits them (VMamba's cross-scan)."""
    if direction.startswith("row-major"):
        cells = [(i, j) for i in range(h) for j in range(w)]
    else:
        cells = [(i, j) for j in range(w) for i in range(h)]
    return cells[::-1] if direction.endswith("reversed") else cells


# ---------------------------------------------------------------------------------------------
# Oracle: the equations of the module docstring, one cell and one direction at a time.


def oracle(layer: SS2D, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    u, z = layer.in_proj(x).chunk(2, dim=-1)  # (B, H, W, E)
    conv = layer.conv2d
    u = F.silu(F.conv2d(u.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding, groups=conv.groups))
    y = torch.zeros(b, h, w, u.shape[1], dtype=x.dtype)
    for direction, d in zip(DIRECTIONS, layer.directions):
        A = -torch.exp(d.A_log)  # (E, N)
        state = torch.zeros(b, *A.shape, dtype=x.dtype)  # (B, E, N)
        for i, j in scan_order(direction, h, w):
            u_t = u[:, :, i, j]  # (B, E)
            dt, b_t, c_t = (u_t @ d.x_proj.weight.T).split([layer.dt_rank, layer.state_dim, layer.state_dim], -1)
            delta = F.softplus(dt @ d.dt_proj.weight.T + d.dt_proj.bias)  # (B, E)
            state = torch.exp(delta[..., None] * A) * state + (delta * u_t)[..., None] * b_t[:, None]
            y[:, i, j] += (state * c_t[:, None]).sum(-1) + d.D * u_t
    out = layer.out_proj(F.layer_norm(y, y.shape[-1:], layer.out_norm.weight, layer.out_norm.bias) * F.silu(z))
    return x + out if layer.skip else out


@pytest.mark.parametrize("grid", [(3, 4), (5, 2), (1, 1), (1, 5), (4, 1)], ids=size_id)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
def test_matches_cell_by_cell_oracle(grid, fast_path):
    layer = make_layer()
    layer.fast_path = fast_path
    x = random_input(layer, grid)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == F64
    assert_close(y, oracle(layer, x), F64, f"SS2D {grid} vs oracle")


def test_skip_adds_input():
    layer = make_layer(skip=True)
    plain = make_layer(skip=False)
    plain.load_state_dict(layer.state_dict())
    x = random_input(layer, (4, 5))
    assert_close(layer(x), x + plain(x), F64, "skip")


# ---------------------------------------------------------------------------------------------
# Fast path against the reference path


def param_grads(layer: SS2D, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*layer.named_parameters())
    return dict(zip(("x", *names), grads(layer(x), (x, *params), upstream)))


@pytest.mark.parametrize(
    "grid, options",
    [((5, 7), {}), ((9, 4), {}), ((1, 6), {}), ((6, 1), {}), ((3, 3), {"expand": 2, "state_dim": 1}),
     ((4, 6), {"skip": True, "conv_size": 5})],
    ids=["5x7", "9x4", "1x6", "6x1", "3x3-n1-e2", "4x6-skip-conv5"],
)  # fmt: skip
def test_fast_path_matches_ref(grid, options):
    fast = make_layer(**{"dim": 6, "state_dim": 4, "dtype": torch.float32, **options})
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
    assert sum(".A_log" in n for n in expected) == 4, "one A per direction"
    for name in expected:
        assert expected[name].abs().max() > 0, f"grad {name} is zero"
        assert_close(actual[name], expected[name], torch.float32, f"grad {name}")


def test_fast_path_flag_selects_the_ops(monkeypatch):
    import ssm2d.layers.ss2d as ss2d_module

    calls = []
    names = ("selective_scan", "selective_scan_ref", "cross_scan", "cross_scan_ref", "cross_merge", "cross_merge_ref")
    for name in names:
        original = getattr(ss2d_module, name)
        monkeypatch.setattr(ss2d_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    layer = make_layer()
    x = random_input(layer, (3, 4))
    layer(x)
    assert calls == ["cross_scan", "selective_scan", "cross_merge"], f"fast path called {calls}"
    calls.clear()
    layer.fast_path = False
    layer(x)
    expected = ["cross_scan_ref"] + ["selective_scan_ref"] * 4 + ["cross_merge_ref"]  # one scan per direction
    assert calls == expected, f"ref path: expected {expected}, got {calls}"
    assert "fast_path=False" in repr(layer)


def test_directions_have_their_own_parameters():
    """Swapping two directions' parameters changes the output: no direction shares another's."""
    layer = make_layer()
    x = random_input(layer, (4, 5))
    y = layer(x)
    swapped = copy.deepcopy(layer)
    swapped.directions[0].load_state_dict(layer.directions[1].state_dict())
    swapped.directions[1].load_state_dict(layer.directions[0].state_dict())
    assert (swapped(x) - y).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# Receptive fields


def scan_support(layer: SS2D, grid, k: int) -> torch.Tensor:
    """(L, H, W) bool: [t, i, j] = step t of direction k's scan output depends on the input cell
    (i, j) of the scanned map. One backward for all steps: the (E, H, W) map is repeated over a
    batch of L samples and sample t back-propagates only from step t."""
    h, w = grid
    e = layer.expand * layer.dim
    u = torch.randn(1, e, h, w, dtype=F64).expand(h * w, e, h, w).clone().requires_grad_()
    out = layer.scan(u)[:, k]  # (L, E, L): sample, channel, step
    upstream = torch.zeros_like(out)
    steps = torch.arange(h * w)
    upstream[steps, :, steps] = torch.rand(h * w, e, dtype=F64) + 0.5
    (g,) = torch.autograd.grad(out, u, upstream)
    return g.abs().sum(1) > 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
@pytest.mark.parametrize("grid", [(4, 5), (5, 3), (1, 6), (6, 1)], ids=size_id)
def test_each_direction_sees_exactly_the_cells_before_it(grid, fast_path):
    """An impulse at a cell reaches, in direction k's scan, exactly that cell and those after it
    in direction k's order: step t depends on cell c iff c is visited at a step <= t. The scan is
    tested apart from the 3 x 3 convolution, which spreads an impulse to its neighbours."""
    layer = make_layer()
    layer.fast_path = fast_path
    h, w = grid
    for k, direction in enumerate(DIRECTIONS):
        order = scan_order(direction, h, w)
        expected = torch.zeros(h * w, h, w, dtype=torch.bool)
        for t in range(h * w):
            for i, j in order[: t + 1]:
                expected[t, i, j] = True
        got = scan_support(layer, grid, k)
        wrong = (got != expected).nonzero().tolist()
        assert not wrong, f"{direction} on {grid}: {len(wrong)} wrong dependencies, e.g. [t, i, j] {wrong[:3]}"


def direction_output(layer: SS2D, x: torch.Tensor, k: int) -> torch.Tensor:
    """The layer's pre-norm merged map with only direction k kept: (B, H, W, E)."""
    u, _ = layer.in_proj(x).chunk(2, dim=-1)
    u = F.silu(layer.conv2d(u.permute(0, 3, 1, 2)))
    ys = layer.scan(u)
    keep = torch.zeros(4, dtype=ys.dtype)
    keep[k] = 1
    return cross_merge(ys * keep[:, None, None], tuple(x.shape[1:3])).permute(0, 2, 3, 1)


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)], ids=size_id)
def test_direction_through_the_convolution(grid):
    """With the convolution: output cell p of direction k depends on input cell q iff a cell in
    q's 3 x 3 neighbourhood is visited no later than p in direction k's order."""
    layer = make_layer()
    h, w = grid
    x = random_input(layer, grid, batch=1)
    for k, direction in enumerate(DIRECTIONS):
        position = {cell: t for t, cell in enumerate(scan_order(direction, h, w))}
        xs = x.expand(h * w, h, w, layer.dim).clone().requires_grad_()
        out = direction_output(layer, xs, k)  # (HW, H, W, E)
        upstream = torch.zeros_like(out)
        cells = torch.arange(h * w)
        upstream[cells, cells // w, cells % w] = torch.rand(h * w, out.shape[-1], dtype=F64) + 0.5
        (g,) = torch.autograd.grad(out, xs, upstream)
        got = (g.abs().sum(-1) > 0).reshape(h, w, h, w)
        for (pi, pj), tp in position.items():
            for qi, qj in position:
                near = [(qi + a, qj + b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (qi + a, qj + b) in position]
                expected = any(position[c] <= tp for c in near)
                assert bool(got[pi, pj, qi, qj]) == expected, f"{direction}: output {(pi, pj)}, input {(qi, qj)}"


def test_output_depends_on_the_whole_grid_and_nothing_else():
    layer = make_layer()
    x = random_input(layer, (5, 6), batch=3).requires_grad_()
    y = layer(x)
    for i, j in [(0, 0), (2, 3), (4, 5), (4, 0)]:
        (g,) = torch.autograd.grad(y[1, i, j].sum(), x, retain_graph=True)
        cell = g[1].abs().sum(-1)
        assert (cell > 0).all(), f"output ({i}, {j}) misses {int((cell == 0).sum())} input cells"
        assert g[0].abs().max() == 0 and g[2].abs().max() == 0, "the output leaks across the batch"


# ---------------------------------------------------------------------------------------------
# Double backward, empty batch


def test_double_backward_on_fast_path_raises_a_clear_error():
    layer = make_layer()
    x = random_input(layer, (3, 4)).requires_grad_()
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"(selective_scan|step_sizes).*double backward is not supported.*fast_path = False"):
        g.square().sum().backward()
    (g,) = torch.autograd.grad(layer(x).square().sum(), x)  # first order still works
    assert g.abs().max() > 0


def test_double_backward_on_ref_path():
    layer = make_layer(dim=2, state_dim=2)
    layer.fast_path = False
    x = random_input(layer, (2, 3), batch=1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: layer(t).square(), (x,))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "ref"])
def test_empty_batch_gives_empty_output(fast_path, skip):
    layer = make_layer(skip=skip)
    layer.fast_path = fast_path
    y = layer(random_input(layer, (3, 5), batch=0))
    assert y.shape == (0, 3, 5, 4) and y.dtype == F64


# ---------------------------------------------------------------------------------------------
# Initialization, optimizer tags, identity, ViT placement


def test_initialization_follows_mamba():
    layer = SS2D(32, state_dim=16, expand=2)
    assert layer.dt_rank == 2 and layer.conv2d.kernel_size == (3, 3) and layer.conv2d.groups == 64
    for d in layer.directions:
        assert_close(torch.exp(d.A_log), torch.arange(1, 17.0).expand(64, 16), torch.float32, "S4D-Real A = -n")
        assert torch.equal(d.D, torch.ones(64))
        dt = F.softplus(d.dt_proj.bias)
        assert 1e-3 * (1 - 1e-6) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-6), (dt.min(), dt.max())
        assert d.dt_proj.weight.abs().max() <= 2**-0.5
    first, second = layer.directions[:2]
    assert not torch.equal(first.x_proj.weight, second.x_proj.weight), "directions drew the same x_proj"
    before = copy.deepcopy(layer.state_dict())
    layer.reset_parameters()
    assert not torch.equal(layer.in_proj.weight, before["in_proj.weight"]), "reset_parameters did not re-draw"


def test_ssm_parameters_skip_weight_decay():
    layer = make_layer()
    expected = {f"directions.{k}.{n}" for k in range(4) for n in ("A_log", "D", "dt_proj.bias")}
    for model in (layer, copy.deepcopy(layer)):
        groups = ssm2d.param_groups(model, weight_decay=0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
        assert expected <= no_decay, f"missing from the no-decay group: {expected - no_decay}"
        assert not expected & decay
        assert {"in_proj.weight", "directions.0.x_proj.weight", "directions.3.dt_proj.weight"} <= decay


def test_reset_to_identity():
    layer = make_layer(skip=True)
    layer.reset_to_identity()
    x = random_input(layer, (5, 7))
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError, match="skip=True"):
        make_layer().reset_to_identity()


def tiny_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5, dynamic_img_size=True)
    return VisionTransformer(**{**args, **kwargs})


def test_drops_into_vit_pre_attention():
    model = add_spatial_layers(tiny_vit(), layer=partial(SS2D, state_dim=4))
    layers = spatial_layers(model)
    assert len(layers) == 2 and all(isinstance(m, SS2D) and m.dim == 24 for m in layers)
    x = torch.randn(2, 3, 28, 36)  # a non-square 7 x 9 grid
    model(x).square().mean().backward()
    for m in layers:
        assert m.directions[3].A_log.grad.abs().max() > 0 and m.in_proj.weight.grad.abs().max() > 0
    base = tiny_vit().eval()
    with torch.no_grad():
        expected = base(x)
        add_spatial_layers(base, layer=partial(SS2D, state_dim=4, skip=True), init="identity")
        assert torch.equal(base(x), expected)


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_input_raises():
    layer = make_layer(dim=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=4, got \(2, 5, 7, 3\)"):
        layer(torch.randn(2, 5, 7, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=4, got \(35, 4\)"):
        layer(torch.randn(35, 4, dtype=F64))
    with pytest.raises(ValueError, match="H >= 1 and W >= 1, got H=0, W=3"):
        layer(torch.randn(2, 0, 3, 4, dtype=F64))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(2, 3, 3, 4, dtype=torch.int64))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dim": 0}, "dim"), ({"dim": 8, "state_dim": 2.5}, "state_dim"), ({"dim": 8, "expand": True}, "expand"),
     ({"dim": 8, "dt_rank": 0}, "dt_rank"), ({"dim": 8, "conv_size": 0}, "conv_size"),
     ({"dim": 8, "conv_size": 4}, "conv_size: expected an odd size")],
)  # fmt: skip
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SS2D(**kwargs)


def test_misspelled_argument_raises_type_error():
    with pytest.raises(TypeError):
        SS2D(8, d_state=4)


def test_defaults_are_vmamba_final_configuration():
    layer = SS2D(96)
    assert (layer.state_dim, layer.expand, layer.dt_rank, layer.conv_size) == (1, 1, 6, 3)


def test_extra_repr_shows_configuration():
    text = repr(SS2D(8, state_dim=4, expand=2, conv_size=5, skip=True))
    for part in ("dim=8", "state_dim=4", "expand=2", "dt_rank=1", "conv_size=5", "skip=True", "fast_path=True"):
        assert part in text, f"{part} not in {text}"
