"""The SSM2D layer: output, layouts, init, cache, precision, errors (docs/math.md §4-6)."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, causal_conv_oracle, param_grads, rel_fro, size_id
from torch.func import functional_call

from ssm2d import SSM2D
from ssm2d.ops import roesser_kernel, roesser_kernel_ref

LAYER_MODULE = importlib.import_module("ssm2d.layers.ssm2d")
GRIDS = [(5, 7), (9, 4), (3, 3), (1, 6), (16, 11)]


def make_layer(dim=6, state_dim=3, dtype=torch.float64, conv_method="auto", **kwargs) -> SSM2D:
    layer = SSM2D(dim, state_dim=state_dim, **kwargs).to(dtype)
    layer.conv_method = conv_method
    return layer


def random_input(layer: SSM2D, grid, batch=2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, *grid, layer.dim, dtype=dtype)


def naive_forward(layer: SSM2D, x: torch.Tensor) -> torch.Tensor:
    """Per-direction flip -> causal F.conv2d -> flip back, summed, plus omega * x, then the norm."""
    y = causal_conv_oracle(x, layer.kernels((x.shape[1], x.shape[2])))
    if layer.omega is not None:
        y = y + layer.omega * x
    return layer.norm(y)


def assert_same_grads(actual: dict, expected: dict, dtype) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], dtype, f"grad {name}")


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """Grid sizes of every roesser_kernel call made by the layer."""
    calls = []

    def counting(a, b, c, size):
        calls.append(tuple(size))
        return roesser_kernel(a, b, c, size)

    monkeypatch.setattr(LAYER_MODULE, "roesser_kernel", counting)
    return calls


# ---------------------------------------------------------------------------------------------
# Output against independent references


@pytest.mark.parametrize("conv_method", ["fft", "direct", "auto"])
@pytest.mark.parametrize("grid", GRIDS, ids=size_id)
@pytest.mark.parametrize("c_per_channel", [True, False], ids=["c_per_channel", "c_per_set"])
@pytest.mark.parametrize("variant", ["real", "complex"])
@pytest.mark.parametrize("directions", [1, 2, 4])
def test_matches_naive_reference(directions, variant, c_per_channel, grid, conv_method):
    layer = make_layer(directions=directions, variant=variant, c_per_channel=c_per_channel, conv_method=conv_method)
    x = random_input(layer, grid)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert_close(y, naive_forward(layer, x), torch.float64, "layer vs naive")


def test_skip_false_has_no_omega_and_is_pure_convolution():
    layer = make_layer(skip=False)
    assert layer.omega is None and "omega" not in dict(layer.named_parameters())
    x = random_input(layer, (5, 7))
    assert_close(layer(x), causal_conv_oracle(x, layer.kernels((5, 7))), torch.float64, "no skip")


def test_out_norm_is_layer_norm_of_plain_output():
    layer = make_layer(dim=8, out_norm=True)
    plain = make_layer(dim=8)
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"norm.weight", "norm.bias"}
    x = random_input(layer, (4, 6))
    y = layer(x)
    assert_close(y, F.layer_norm(plain(x), (8,)), torch.float64, "out_norm")
    assert y.mean(-1).abs().max().item() < 1e-12
    assert_close(y.var(-1, unbiased=False), torch.ones(y.shape[:-1], dtype=y.dtype), dict(rtol=0, atol=1e-3), "var")


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("c_per_channel", [True, False], ids=["c_per_channel", "c_per_set"])
@pytest.mark.parametrize("variant", ["real", "complex"])
@pytest.mark.parametrize("directions", [2, 4])
def test_ref_path_matches_fast_path(directions, variant, c_per_channel, conv_method):
    fast = make_layer(directions=directions, variant=variant, c_per_channel=c_per_channel, conv_method=conv_method)
    ref = copy.deepcopy(fast)
    ref.fast_path = False
    x = random_input(fast, (5, 7)).requires_grad_()
    y_fast, y_ref = fast(x), ref(x)
    assert_close(y_fast, y_ref, torch.float64, "fast vs ref path")
    upstream = torch.randn_like(y_ref)
    assert_same_grads(param_grads(fast, x, upstream), param_grads(ref, x, upstream), torch.float64)


def test_ref_path_kernels_use_recurrence(monkeypatch, kernel_calls):
    ref_calls = []

    def counting_ref(a, b, c, size):
        ref_calls.append(tuple(size))
        return roesser_kernel_ref(a, b, c, size)

    monkeypatch.setattr(LAYER_MODULE, "roesser_kernel_ref", counting_ref)
    layer = make_layer()
    layer.fast_path = False
    layer(random_input(layer, (3, 4)))
    assert ref_calls == [(3, 4)] and kernel_calls == []


# ---------------------------------------------------------------------------------------------
# Parameters, layouts and initialization


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(dim=192, directions=2), 6 * 2 * 2 * 16 + 2 * 2 * 192 * 16 + 192),
        (dict(dim=192, directions=2), 12864),
        (dict(dim=192, directions=4), 25536),
        (dict(dim=192, directions=4, c_per_channel=False), 6 * 8 * 16 + 2 * 8 * 16 + 192),
        (dict(dim=10, directions=1, n_ssm=5, state_dim=3, c_per_channel=False), 6 * 5 * 3 + 2 * 5 * 3 + 10),
        (dict(dim=192, directions=4, skip=False), 25536 - 192),
        (dict(dim=192, directions=4, out_norm=True), 25536 + 2 * 192),
    ],
)
def test_parameter_count(kwargs, expected):
    layer = SSM2D(**{"state_dim": 16, **kwargs})
    assert sum(p.numel() for p in layer.parameters()) == expected


def test_real_init_statistics():
    layer = SSM2D(512, state_dim=64)
    sets, n = 8, 64
    assert layer.a_raw.shape == (sets, 4, n) and layer.b_raw.shape == (sets, 2, n)
    assert layer.c_raw.shape == (4 * 512, 2, n) and layer.omega.shape == (512,)
    for name, std in (("a_raw", 0.2), ("b_raw", 0.2), ("c_raw", 1.0), ("omega", 1.0)):
        p = getattr(layer, name).detach()
        assert abs(p.std().item() / std - 1) < 0.1, f"{name} std {p.std().item()}"
        assert abs(p.mean().item()) < 0.15 * std, f"{name} mean {p.mean().item()}"
    a, b, c = layer.coefficients()
    assert 0 < a.min().item() and a.max().item() < 1
    assert_close(a, torch.sigmoid(layer.a_raw), torch.float32, "a")
    assert_close(b, torch.sigmoid(layer.b_raw), torch.float32, "b")
    assert_close(c, layer.c_raw / 8.0, dict(rtol=1e-6, atol=0.0), "c = c_raw / sqrt(N)")


def test_complex_init_statistics():
    layer = SSM2D(512, state_dim=64, variant="complex")
    n = 64
    assert layer.b_raw.shape == (8, 2, n, 2) and layer.c_raw.shape == (4 * 512, 2, n, 2)
    for raw in (layer.a_radius_raw, layer.a_angle_raw):
        assert 0.5 <= raw.min().item() and raw.max().item() <= 3.0
        assert abs(raw.mean().item() - 1.75) < 0.1 and abs(raw.std().item() - 2.5 / math.sqrt(12)) < 0.07
    a, b, c = layer.coefficients()
    assert a.is_complex() and b.is_complex() and c.is_complex()
    assert_close(a.abs(), torch.sigmoid(layer.a_radius_raw), torch.float32, "|a|")
    angle = 2 * math.pi * torch.sigmoid(layer.a_angle_raw)
    assert_close(a, torch.polar(torch.ones_like(angle), angle) * a.abs(), torch.float32, "arg a")
    assert_close(b, torch.view_as_complex(torch.sigmoid(layer.b_raw)), torch.float32, "b")
    assert_close(c, torch.view_as_complex(layer.c_raw) * n**-0.5, dict(rtol=1e-6, atol=0.0), "c")
    assert a.abs().max().item() < 1


def test_channel_layout_c_per_channel():
    dim, n_ssm, directions, grid = 6, 3, 4, (4, 5)
    layer = make_layer(dim=dim, n_ssm=n_ssm, directions=directions)
    a, b, c = layer.coefficients()
    sets = directions * n_ssm
    assert a.shape[0] == sets and c.shape[0] == directions * dim
    kernels = layer.kernels(grid)
    assert kernels.shape == (directions, dim, *grid)
    for r in range(directions):
        for f in range(dim):
            row = r * dim + f
            s = row % sets
            expected = roesser_kernel_ref(a[s], b[s], c[row], grid)
            assert_close(kernels[r, f], expected, torch.float64, f"direction {r} channel {f} (set {s})")


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_channel_layout_per_direction_sets(variant):
    dim, n_ssm, directions, grid = 6, 3, 4, (4, 5)
    layer = make_layer(dim=dim, n_ssm=n_ssm, directions=directions, variant=variant, per_direction_sets=True)
    a, b, c = layer.coefficients()
    kernels = layer.kernels(grid)
    assert kernels.shape == (directions, dim, *grid)
    for r in range(directions):
        for f in range(dim):
            s = r * n_ssm + f % n_ssm
            expected = roesser_kernel_ref(a[s], b[s], c[r * dim + f], grid)
            assert_close(kernels[r, f], expected, torch.float64, f"direction {r} channel {f} (set {s})")
    x = random_input(layer, (5, 7))
    assert_close(layer(x), naive_forward(layer, x), torch.float64, "per_direction_sets layer vs naive")


@pytest.mark.parametrize("variant", ["real", "complex"])
def test_channel_layout_c_per_set(variant):
    dim, n_ssm, directions, grid = 5, 2, 4, (4, 5)
    layer = make_layer(dim=dim, n_ssm=n_ssm, directions=directions, c_per_channel=False, variant=variant)
    a, b, c = layer.coefficients()
    assert c.shape[0] == directions * n_ssm
    kernels = layer.kernels(grid)
    assert kernels.shape == (directions, dim, *grid)
    for r in range(directions):
        for f in range(dim):
            s = r * n_ssm + f % n_ssm
            expected = roesser_kernel_ref(a[s], b[s], c[s], grid)
            assert_close(kernels[r, f], expected, torch.float64, f"direction {r} channel {f} (set {s})")


# ---------------------------------------------------------------------------------------------
# Eval-mode kernel cache


def fresh_output(layer: SSM2D, x: torch.Tensor) -> torch.Tensor:
    """Output of an uncached copy (train mode never caches; there is no dropout)."""
    with torch.no_grad():
        return copy.deepcopy(layer).train()(x)


def _inplace(layer, x):
    with torch.no_grad():
        layer.c_raw.add_(0.1)
    return x


def _optimizer_step(layer, x):
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    layer.eval()
    return x


def _load_state_dict(layer, x):
    other = make_layer(dim=layer.dim, conv_method=layer.conv_method)
    layer.load_state_dict(other.state_dict())
    return x


def _train_eval(layer, x):
    layer.train()
    layer.eval()
    return x


def _new_grid(layer, x):
    return random_input(layer, (x.shape[1] + 2, x.shape[2] - 1))


def _new_method(layer, x):
    layer.conv_method = "direct" if layer.conv_method == "fft" else "fft"
    return x


# (mutation, whether the output must change)
MUTATIONS = {
    "inplace": (_inplace, True),
    "optimizer": (_optimizer_step, True),
    "load_state_dict": (_load_state_dict, True),
    "train_eval": (_train_eval, False),
    "grid": (_new_grid, True),
    "conv_method": (_new_method, False),
}


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_cache_invalidation(kernel_calls, mutation, conv_method):
    mutate, changes = MUTATIONS[mutation]
    layer = make_layer(conv_method=conv_method).eval()
    x = random_input(layer, (5, 7))
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0)
    assert len(kernel_calls) == 1, "eval + no_grad: the kernel must be computed once"
    x1 = mutate(layer, x)
    before = len(kernel_calls)
    with torch.no_grad():
        y1 = layer(x1)
        assert len(kernel_calls) == before + 1, f"{mutation}: the kernel was not recomputed"
        assert torch.equal(layer(x1), y1)
    assert len(kernel_calls) == before + 1, f"{mutation}: the new kernel was not cached"
    assert_close(y1, fresh_output(layer, x1), torch.float64, f"after {mutation}")
    if changes:
        assert y1.shape != y0.shape or rel_fro(y1, y0) > 1e-3, f"{mutation} did not change the output"


def test_train_mode_recomputes_every_forward(kernel_calls):
    layer = make_layer()
    x = random_input(layer, (5, 7))
    for i in range(1, 4):
        with torch.no_grad():
            layer(x)
        assert len(kernel_calls) == i


def test_eval_with_grad_gives_parameter_gradients(kernel_calls):
    layer = make_layer().eval()
    x = random_input(layer, (5, 7)).requires_grad_()
    with torch.no_grad():
        layer(x)  # fills the cache
    upstream = torch.randn_like(x)
    eval_grads = param_grads(layer, x, upstream)
    assert len(kernel_calls) == 2, "eval with grad enabled must not use the graph-less cache"
    train_grads = param_grads(copy.deepcopy(layer).train(), x, upstream)
    assert_same_grads(eval_grads, train_grads, torch.float64)
    assert all(g.abs().sum() > 0 for g in eval_grads.values())


def test_cache_not_shared_between_autocast_and_float32():
    layer = make_layer(dim=16, state_dim=4, dtype=torch.float32, conv_method="fft").eval()
    x = random_input(layer, (6, 5), dtype=torch.float32)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        y = layer(x)
    assert_close(y, fresh_output(layer, x), torch.float32, "float32 forward after an autocast forward")


def test_cache_after_writes_through_data_is_dropped_by_train():
    """Writes through `.data` bypass the version counters the cache is keyed on (no value is
    read, so no device sync); `train()` drops the cache, as documented."""
    layer = make_layer().eval()
    x = random_input(layer, (5, 7))
    with torch.no_grad():
        layer(x)
        layer.c_raw.data.add_(0.5)
        layer.train().eval()
        y = layer(x)
    assert_close(y, fresh_output(layer, x), torch.float64, "after c_raw.data.add_ and train()")


@pytest.mark.parametrize("move", ["float32", "replace"])
def test_cache_sees_dtype_moves_and_replaced_parameters(kernel_calls, move):
    layer = make_layer().eval()
    x = random_input(layer, (5, 7))
    with torch.no_grad():
        layer(x)
        if move == "float32":
            layer.float()
            x = x.float()
        else:
            layer.c_raw = torch.nn.Parameter(layer.c_raw.detach() + 0.5)
        y = layer(x)
    assert len(kernel_calls) == 2, f"{move}: the kernel was not recomputed"
    assert_close(y, fresh_output(layer, x), torch.float32, f"after {move}")


# ---------------------------------------------------------------------------------------------
# Gradients and precision


@pytest.mark.parametrize("variant", ["real", "complex"])
@pytest.mark.parametrize("conv_method", ["fft", "direct"])
def test_gradcheck_input_and_parameters(conv_method, variant):
    layer = make_layer(dim=4, state_dim=2, conv_method=conv_method, variant=variant)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = random_input(layer, (3, 4)).requires_grad_()

    def forward(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *params))


@pytest.mark.parametrize("variant", ["real", "complex"])
@pytest.mark.parametrize("conv_method", ["fft", "direct"])
def test_float32_matches_float64(conv_method, variant):
    layer = make_layer(dim=16, state_dim=8, dtype=torch.float32, conv_method=conv_method, variant=variant)
    double = copy.deepcopy(layer).double()
    x = random_input(layer, (14, 14), dtype=torch.float32)
    y = layer(x)
    assert y.dtype == torch.float32
    assert_close(y, double(x.double()), torch.float32, "float32 vs float64 layer")


@pytest.mark.parametrize("conv_method", ["fft", "direct", "auto"])
@pytest.mark.parametrize("grid", [(14, 14), (5, 7)], ids=size_id)
def test_autocast_bfloat16(grid, conv_method):
    layer = make_layer(dim=16, state_dim=8, dtype=torch.float32, conv_method=conv_method)
    x = random_input(layer, grid, dtype=torch.float32)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape
    assert_close(y, expected, torch.bfloat16, "autocast vs float32")


# ---------------------------------------------------------------------------------------------
# Representation and errors


def test_extra_repr_lists_every_setting():
    layer = SSM2D(8, state_dim=4, n_ssm=4, directions=2, variant="complex", c_per_channel=False, skip=False,
                  out_norm=True)
    text = repr(layer)
    for part in ("dim=8", "state_dim=4", "n_ssm=4", "directions=2", "variant='complex'", "c_per_channel=False",
                 "skip=False", "out_norm=True", "fast_path=True", "conv_method='auto'"):
        assert part in text, f"{part} missing from {text}"
    assert "per_direction_sets=True" in repr(SSM2D(8, per_direction_sets=True))
    default = repr(SSM2D(6))
    for part in ("dim=6", "state_dim=16", "n_ssm=2", "directions=4", "variant='real'", "c_per_channel=True",
                 "skip=True", "out_norm=False", "per_direction_sets=False"):
        assert part in default, f"{part} missing from {default}"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(dim=0), r"dim: expected an integer >= 1, got 0"),
        (dict(dim=8, state_dim=0), r"state_dim: expected an integer >= 1"),
        (dict(dim=8, n_ssm=0), r"n_ssm: expected an integer >= 1"),
        (dict(dim=8.0), r"dim: expected an integer >= 1"),
        (dict(dim=8, directions=3), r"directions: expected 1, 2 or 4, got 3"),
        (dict(dim=8, variant="foo"), r"variant: expected 'real' or 'complex', got 'foo'"),
        (dict(dim=5, n_ssm=2), r"dim: expected a multiple of n_ssm=2 with c_per_channel=True, got 5"),
        (dict(dim=8, c_per_channel=False, per_direction_sets=True), r"per_direction_sets: expected c_per_channel=True"),
    ],
    ids=["dim=0", "state_dim=0", "n_ssm=0", "dim=8.0", "directions=3", "variant=foo", "dim=5,n_ssm=2", "sets-shared-c"],
)
def test_constructor_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SSM2D(**kwargs)


def test_misspelled_keyword_is_type_error():
    with pytest.raises(TypeError, match="stat_dim"):
        SSM2D(8, stat_dim=4)


def re_shape(shape) -> str:
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (4, 5, 8), (2, 4, 5, 8, 1)], ids=size_id)
def test_forward_rejects_bad_input(shape):
    layer = SSM2D(8, state_dim=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=8, got " + re_shape(shape)):
        layer(torch.randn(shape))


def test_bad_conv_method_raises():
    layer = SSM2D(8, state_dim=4)
    layer.conv_method = "fast"
    with pytest.raises(ValueError, match=r"conv_method: expected 'auto', 'fft' or 'direct', got 'fast'"):
        layer(torch.randn(1, 3, 3, 8))


# ---------------------------------------------------------------------------------------------
# Truncated kernels (kernel_size) and identity initialization

KERNEL_SIZES = [1, 3, (2, 5)]


def truncated_forward(layer: SSM2D, x: torch.Tensor) -> torch.Tensor:
    """Oracle: causal F.conv2d with each direction's kernel cut to `kernel_grid`, plus omega * x."""
    y = causal_conv_oracle(x, layer.kernels(layer.kernel_grid((x.shape[1], x.shape[2]))))
    return layer.norm(y + layer.omega * x)


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("grid", [(5, 7), (9, 4), (7, 11)], ids=size_id)
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
def test_kernel_size_fast_path_matches_ref_path(kernel_size, grid, conv_method):
    fast = make_layer(kernel_size=kernel_size, conv_method=conv_method)
    ref = copy.deepcopy(fast)
    ref.fast_path = False
    x = random_input(fast, grid).requires_grad_()
    y_fast, y_ref = fast(x), ref(x)
    assert_close(y_fast, y_ref, torch.float64, f"kernel_size={kernel_size}: fast vs ref path")
    assert_close(y_fast, truncated_forward(fast, x), torch.float64, f"kernel_size={kernel_size}: fast vs oracle")
    upstream = torch.randn_like(y_ref)
    fast_grads, ref_grads = param_grads(fast, x, upstream), param_grads(ref, x, upstream)
    assert_same_grads(fast_grads, ref_grads, torch.float64)
    # A 1 x 1 causal kernel is C B at offset (0, 0): no state transition, so A is unused.
    unused = {"a_raw"} if fast.kernel_grid(grid) == (1, 1) else set()
    for name, g in fast_grads.items():
        assert (g.abs().max().item() == 0) == (name in unused), f"grad {name}: max abs {g.abs().max().item():.3e}"


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("grid", [(5, 7), (9, 4), (7, 11)], ids=size_id)
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
def test_kernel_size_bounds_the_reach(kernel_size, grid, conv_method):
    """The output differs from the global-kernel layer exactly when the grid exceeds the kernel."""
    layer = make_layer(kernel_size=kernel_size, conv_method=conv_method)
    full = make_layer(conv_method=conv_method)
    full.load_state_dict(layer.state_dict())
    x = random_input(layer, grid)
    with torch.no_grad():
        change = rel_fro(layer(x), full(x))
    assert layer.kernel_grid(grid) != grid and change > 1e-3, f"kernel_size={kernel_size}: change {change:.3e}"


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("kernel_size", [50, (5, 7), (6, 7), (5, 30)], ids=str)
def test_kernel_size_at_least_grid_equals_global_kernel(kernel_size, conv_method):
    grid = (5, 7)
    layer = make_layer(kernel_size=kernel_size, conv_method=conv_method)
    full = make_layer(conv_method=conv_method)
    full.load_state_dict(layer.state_dict())
    assert layer.kernel_grid(grid) == grid and full.kernel_grid(grid) == grid
    x = random_input(layer, grid).requires_grad_()
    y, y_full = layer(x), full(x)
    assert torch.equal(y, y_full), f"max abs diff {(y - y_full).abs().max().item():.3e}"
    upstream = torch.randn_like(y)
    assert_same_grads(param_grads(layer, x, upstream), param_grads(full, x, upstream), torch.float64)


@pytest.mark.parametrize(
    "kernel_size, grid, expected",
    [
        (3, (9, 7), (3, 3)),
        ((2, 5), (9, 7), (2, 5)),
        ((2, 5), (9, 4), (2, 4)),
        (7, (4, 3), (4, 3)),
        (None, (9, 7), (9, 7)),
    ],
    ids=["3-9x7", "2x5-9x7", "2x5-9x4", "7-4x3", "None-9x7"],
)
def test_kernel_grid_and_folded_kernel_size(kernel_calls, kernel_size, grid, expected):
    layer = make_layer(kernel_size=kernel_size, conv_method="direct").eval()
    assert layer.kernel_grid(grid) == expected
    kh, kw = expected
    truncated, whole = layer.kernels(expected), layer.kernels(grid)
    assert truncated.shape == (4, layer.dim, kh, kw)
    # a causal kernel's first cells do not depend on how far it extends
    assert_close(truncated, whole[..., :kh, :kw], torch.float64, "truncated kernel vs crop of the whole one")
    kernel_calls.clear()
    x = random_input(layer, grid)
    with torch.no_grad():
        layer(x)
    assert kernel_calls == [expected], f"kernel computed for {kernel_calls}, expected only {expected}"
    folded = layer._cache.value  # direct method: the folded (C, 2kh-1, 2kw-1) kernel
    assert folded.shape == (layer.dim, 2 * kh - 1, 2 * kw - 1), f"folded kernel {tuple(folded.shape)}"
    layer.conv_method = "fft"
    with torch.no_grad():
        layer(x)
    m1, m2 = LAYER_MODULE.fft_shape(grid, expected)
    assert m1 >= grid[0] + kh - 1 and m2 >= grid[1] + kw - 1, "too small for a linear convolution"
    spectrum = layer._cache.value
    assert spectrum.shape == (layer.dim, m1, m2 // 2 + 1), f"spectrum {tuple(spectrum.shape)}"


@pytest.mark.parametrize("kernel_size", [None, 3], ids=str)
@pytest.mark.parametrize("conv_method", ["fft", "direct"])
@pytest.mark.parametrize("variant", ["real", "complex"])
def test_reset_to_identity_is_exact_identity(variant, conv_method, kernel_size):
    layer = make_layer(variant=variant, conv_method=conv_method, kernel_size=kernel_size)
    a_before = [p.detach().clone() for n, p in layer.named_parameters() if n.startswith(("a_", "b_"))]
    x = random_input(layer, (5, 7))
    assert rel_fro(layer(x), x) > 0.1
    layer.reset_to_identity()
    assert not layer.c_raw.any() and torch.equal(layer.omega, torch.ones_like(layer.omega))
    a_after = [p for n, p in layer.named_parameters() if n.startswith(("a_", "b_"))]
    assert all(torch.equal(p, q) for p, q in zip(a_before, a_after)), "A and B must keep their values"
    y = layer(x)
    assert (y - x).abs().max().item() == 0.0, f"identity layer: max abs diff {(y - x).abs().max().item():.3e}"
    # and it trains away from the identity: C gets a gradient
    upstream = torch.randn_like(x)
    grad = param_grads(layer, x.requires_grad_(), upstream)
    assert grad["c_raw"].abs().max() > 0
    assert torch.equal(grad["x"], upstream), "the identity layer's input gradient is the upstream gradient"


@pytest.mark.parametrize("conv_method", ["fft", "direct"])
def test_reset_to_identity_invalidates_eval_cache(kernel_calls, conv_method):
    layer = make_layer(conv_method=conv_method).eval()
    x = random_input(layer, (5, 7))
    with torch.no_grad():
        y0 = layer(x)
    assert layer._cache.value is not None and len(kernel_calls) == 1
    assert rel_fro(y0, x) > 0.1
    layer.reset_to_identity()
    with torch.no_grad():
        y1 = layer(x)
    assert len(kernel_calls) == 2, "the kernel was not recomputed after reset_to_identity"
    assert torch.equal(y1, x), f"max abs diff {(y1 - x).abs().max().item():.3e}"


@pytest.mark.parametrize("kernel_size, text", [(None, "kernel_size=None"), (3, "kernel_size=(3, 3)"),
                                               ((2, 5), "kernel_size=(2, 5)"), ([4, 1], "kernel_size=(4, 1)")])
def test_extra_repr_shows_kernel_size(kernel_size, text):
    layer = SSM2D(8, state_dim=2, kernel_size=kernel_size)
    assert text in repr(layer), repr(layer)
    if kernel_size is None:
        expected = None
    else:
        expected = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    assert layer.kernel_size == expected and isinstance(layer.kernel_size, (tuple, type(None)))


def test_auto_method_follows_the_rule_with_and_without_a_backward(monkeypatch):
    """"auto" takes the path `choose_conv_method` gives for a training call (a backward follows)
    and for an inference call, and both give the same output."""
    calls = []
    for name in ("fft_conv2d", "direct_conv2d"):
        original = getattr(LAYER_MODULE, name)
        monkeypatch.setattr(LAYER_MODULE, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    layer = make_layer(dim=4, dtype=torch.float32)
    grid = (24, 24)
    x = torch.randn(2, *grid, 4)
    train_out = layer(x)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
    expected = [f"{LAYER_MODULE.choose_conv_method(grid, grid, backward=b)}_conv2d" for b in (True, False)]
    assert calls == expected
    assert_close(eval_out, train_out.detach().double(), torch.float32, "inference vs training path")
