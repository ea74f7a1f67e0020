"""Vim's bidirectional mixer (docs/math.md §9): fast vs ref path, both directions live and wired
the right way round, the div2 merge, the grid adapter in a timm ViT, init, errors."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_mamba_scans_in_float32, assert_close, grads, rel_fro, tiny_vit

import ssm2d
from ssm2d.layers import VimMixer, VimMixer2d
from ssm2d.layers.vim import RELEASED_NAMES
from ssm2d.models import add_spatial_layers, spatial_layers
from ssm2d.ops import causal_conv1d_ref, selective_scan_ref

F64 = torch.float64
BACKWARD_PARAMS = ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D")


def make_mixer(dim=8, state_dim=3, dtype=F64, cls=VimMixer, **kwargs) -> VimMixer:
    return cls(dim, state_dim=state_dim, **kwargs).to(dtype)


def randomize(mixer: VimMixer) -> VimMixer:
    """Perturb every parameter so that no init symmetry (D = 1, equal A rows) hides a bug."""
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def oracle(mixer: VimMixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer written out from docs/math.md §9 with the reference ops, each direction by hand."""
    xz = x @ mixer.in_proj.weight.t()  # (B, L, 2E)
    u, z = xz.mT.chunk(2, dim=1)
    outs = []
    for direction, flip in zip(mixer.directions, (False, True)):
        conv, x_proj, dt_proj = direction.conv1d, direction.x_proj, direction.dt_proj
        a_log, d = direction.A_log, direction.D
        uu, zz = (u.flip(-1), z.flip(-1)) if flip else (u, z)
        uu = causal_conv1d_ref(uu, conv.weight[:, 0], conv.bias, "silu")
        dt, b, c = (uu.mT @ x_proj.weight.t()).split([mixer.dt_rank, mixer.state_dim, mixer.state_dim], -1)
        delta = F.softplus(dt @ dt_proj.weight.t() + dt_proj.bias).mT
        y = selective_scan_ref(uu, delta, -torch.exp(a_log), b.mT, c.mT, d, zz)
        outs.append(y.flip(-1) if flip else y)
    return ((outs[0] + outs[1]) / 2).mT @ mixer.out_proj.weight.t()


# ---------------------------------------------------------------------------------------------
# Output against the oracle, fast against ref


@pytest.mark.parametrize("length", [1, 6, 17])
def test_matches_the_written_out_oracle(length):
    mixer = randomize(make_mixer())
    x = torch.randn(2, length, 8, dtype=F64)
    assert_close(mixer(x), oracle(mixer, x), F64, "mixer vs oracle")


@pytest.mark.parametrize("length", [1, 7, 30])
def test_fast_float32_matches_ref_float64(length):
    fast = randomize(make_mixer(dtype=torch.float32))
    ref = copy.deepcopy(fast).to(F64)
    ref.fast_path = False
    x = torch.randn(3, length, 8)
    x64 = x.to(F64).requires_grad_()
    x.requires_grad_()
    y_fast, y_ref = fast(x), ref(x64)
    assert_close(y_fast, y_ref, torch.float32, "output")
    upstream = torch.randn_like(y_ref)
    names = [n for n, _ in fast.named_parameters()]
    g_fast = grads(y_fast, [x, *fast.parameters()], upstream.float())
    g_ref = grads(y_ref, [x64, *ref.parameters()], upstream)
    for name, a, b in zip(["x", *names], g_fast, g_ref):
        if not name.endswith("A_log") or length > 1:  # one step: A never acts
            assert b.abs().max().item() > 0, f"d/d{name} is zero"
        assert_close(a, b, torch.float32, f"d/d{name}")


def test_fast_path_flag_switches_the_ops(monkeypatch):
    mixer = make_mixer()
    calls = []
    import ssm2d.layers.mamba as vim_module  # the ops are called by the shared inner module

    for name in ("selective_scan_ref", "causal_conv1d_ref"):
        original = getattr(vim_module, name)
        monkeypatch.setattr(vim_module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = torch.randn(1, 5, 8, dtype=F64)
    mixer(x)
    assert calls == []
    mixer.fast_path = False
    mixer(x)
    assert sorted(calls) == ["causal_conv1d_ref"] * 2 + ["selective_scan_ref"] * 2


# ---------------------------------------------------------------------------------------------
# Both directions are live (the released slow path silently dropped the backward one)


def test_first_token_depends_on_the_last_token():
    mixer = make_mixer()
    x = torch.randn(1, 9, 8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(mixer(x)[:, 0].sum(), x)
    assert g[:, -1].abs().max().item() > 1e-6, "the first output does not see the last token"
    # The forward direction alone is causal: its first output ignores every later token.
    u, z = mixer.in_proj(x).mT.chunk(2, dim=1)
    (g_forward,) = torch.autograd.grad(mixer.directions[0](u, z)[..., 0].sum(), x)
    assert not g_forward[:, 1:].any()


@pytest.mark.parametrize("name", BACKWARD_PARAMS)
def test_every_backward_parameter_changes_the_output(name):
    mixer = randomize(make_mixer())
    x = torch.randn(2, 7, 8, dtype=F64)
    y = mixer(x)
    with torch.no_grad():
        p = mixer.directions[1].get_parameter(name)
        p.add_(0.5 * torch.randn_like(p))
    assert rel_fro(mixer(x), y) > 1e-6, f"perturbing {name} left the output unchanged"  # float64: noise 1e-16


def test_reversed_input_with_swapped_directions_gives_reversed_output():
    """y(flip(x)) with the forward and backward parameter sets swapped equals flip(y(x))."""
    mixer = randomize(make_mixer())
    swapped = copy.deepcopy(mixer)
    state = mixer.state_dict()
    swap = {"directions.0.": "directions.1.", "directions.1.": "directions.0."}
    swapped.load_state_dict({next((swap[p] + k[len(p):] for p in swap if k.startswith(p)), k): v
                             for k, v in state.items()})  # fmt: skip
    x = torch.randn(2, 11, 8, dtype=F64)
    assert_close(swapped(x.flip(1)), mixer(x).flip(1), F64, "swapped directions on the reversed sequence")
    assert rel_fro(mixer(x.flip(1)), mixer(x).flip(1)) > 1e-3, "the directions are interchangeable: a vacuous test"


# ---------------------------------------------------------------------------------------------
# Grid adapter and retrofit into a timm ViT


@pytest.mark.parametrize("grid", [(3, 5), (4, 1), (1, 1)])
def test_grid_adapter_scans_row_major(grid):
    mixer2d = randomize(make_mixer(cls=VimMixer2d))
    tokens = VimMixer(8, state_dim=3).to(F64)
    tokens.load_state_dict(mixer2d.state_dict())
    x = torch.randn(2, *grid, 8, dtype=F64)
    y = mixer2d(x)
    assert y.shape == x.shape
    assert_close(y, tokens(x.flatten(1, 2)).unflatten(1, grid), F64, "grid vs row-major tokens")


VIM_VIT = dict(img_size=16, embed_dim=16, num_heads=2, num_classes=3, reg_tokens=0)  # for tiny_vit


def test_drops_into_a_timm_vit_before_attention():
    model = add_spatial_layers(tiny_vit(**VIM_VIT), layer=partial(VimMixer2d, state_dim=4))
    layers = spatial_layers(model)
    assert len(layers) == 2 and all(isinstance(m, VimMixer2d) for m in layers)
    x = torch.randn(2, 3, 16, 20)  # a 4 x 5 grid
    model(x).square().mean().backward()
    for layer in layers:
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().max().item() > 0, f"{name} got no gradient"


def test_identity_init_keeps_a_vit_unchanged():
    torch.manual_seed(0)
    base = tiny_vit(**VIM_VIT).eval()
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        expected = base(x)
        model = add_spatial_layers(base, layer=partial(VimMixer2d, skip=True), init="identity")
        assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="expected skip=True"):
        VimMixer2d(8).reset_to_identity()


# ---------------------------------------------------------------------------------------------
# Init, optimizer groups, repr, errors


def test_init_follows_mamba():
    mixer = VimMixer(32, state_dim=5, expand=2)
    forward, backward = mixer.directions
    for direction in mixer.directions:
        assert torch.allclose(-torch.exp(direction.A_log), -torch.arange(1.0, 6.0).expand(64, 5))
        assert torch.equal(direction.D, torch.ones(64))
        dt = F.softplus(direction.dt_proj.bias)
        assert dt.min().item() >= 1e-3 - 1e-9 and dt.max().item() <= 0.1 + 1e-9
        assert direction.dt_proj.weight.abs().max().item() <= 2**-0.5  # dt_rank = ceil(32 / 16) = 2
    assert not torch.equal(forward.dt_proj.bias, backward.dt_proj.bias), "the directions share an init draw"
    assert forward.x_proj.weight.shape == (2 + 2 * 5, 64) and mixer.in_proj.weight.shape == (128, 32)


def test_ssm_parameters_skip_weight_decay_even_after_deepcopy():
    mixer = copy.deepcopy(VimMixer(16))
    groups = ssm2d.param_groups(mixer, weight_decay=0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    names = {n for n, p in mixer.named_parameters() if id(p) in no_decay}
    for name in ("A_log", "D", "dt_proj.bias"):
        for k in range(2):
            assert f"directions.{k}.{name}" in names, f"directions.{k}.{name} gets weight decay"
    assert "in_proj.weight" not in names and "directions.1.x_proj.weight" not in names


def test_repr_and_errors():
    mixer2d = VimMixer2d(8, state_dim=3, skip=True)
    assert "dim=8, state_dim=3, expand=2, dt_rank=1, conv_size=4, fast_path=True, skip=True" in repr(mixer2d)
    with pytest.raises(ValueError, match=r"x: expected a floating-point \(B, L, 8\) tensor, got \(2, 5, 7\)"):
        VimMixer(8)(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x: expected a sequence of L >= 1 tokens, got L=0"):
        VimMixer(8)(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, H, W, C\) with C=8, got \(2, 5, 8\)"):
        mixer2d(torch.randn(2, 5, 8))
    for grid in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="expected a grid with H >= 1 and W >= 1"):
            mixer2d(torch.randn(2, *grid, 8))
    with pytest.raises(TypeError, match="floating-point"):
        mixer2d(torch.ones(2, 3, 3, 8, dtype=torch.long))
    for bad in (dict(dim=0), dict(dim=8, state_dim=2.0), dict(dim=8, expand=True)):
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            VimMixer(**bad)
    with pytest.raises(TypeError):
        VimMixer(8, state_size=4)


@pytest.mark.parametrize("cls", [VimMixer, VimMixer2d])
def test_batch_zero_gives_an_empty_output(cls):
    mixer = make_mixer(cls=cls)
    x = torch.randn(0, 5, 8, dtype=F64) if cls is VimMixer else torch.randn(0, 3, 5, 8, dtype=F64)
    for fast_path in (True, False):
        mixer.fast_path = fast_path
        y = mixer(x)
        assert y.shape == x.shape and y.dtype == x.dtype


# ---------------------------------------------------------------------------------------------
# Released parameter names, dtypes, second derivatives


def test_released_parameter_names_load():
    """A state dict under the released mixer's names (conv1d_b, A_b_log, ...) loads into the
    shared-inner-module layout, inside a model too."""
    mixer = randomize(make_mixer())
    new_to_old = {new: old for old, new in RELEASED_NAMES.items()}
    released = {}
    for key, value in mixer.state_dict().items():
        prefix = next((p for p in sorted(new_to_old, key=len, reverse=True) if key == p or key.startswith(p + ".")), None)
        released[key if prefix is None else new_to_old[prefix] + key[len(prefix):]] = value
    assert {"A_b_log", "conv1d_b.weight", "x_proj.weight", "D_b", "in_proj.weight"} <= released.keys()
    loaded = make_mixer()
    loaded.load_state_dict(released)
    x = torch.randn(2, 6, 8, dtype=F64)
    assert torch.equal(loaded(x), mixer(x))
    wrapper = torch.nn.Sequential(make_mixer())
    wrapper.load_state_dict({f"0.{k}": v for k, v in released.items()})
    assert torch.equal(wrapper(x), mixer(x))


def test_a_d_and_dt_bias_stay_float32_in_a_bfloat16_mixer(monkeypatch):
    mixer = make_mixer(dtype=torch.bfloat16)
    assert_mamba_scans_in_float32(monkeypatch, lambda: mixer(torch.randn(1, 5, 8, dtype=torch.bfloat16)), calls=2)

def test_reference_path_passes_gradgradcheck():
    mixer = randomize(make_mixer(dim=4, state_dim=2, expand=1))
    mixer.fast_path = False
    x = torch.randn(1, 3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: mixer(t), (x,))


def test_fast_path_double_backward_raises_a_clear_error():
    mixer = make_mixer(cls=VimMixer2d)
    x = torch.randn(1, 2, 3, 8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(mixer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported.*fast_path = False"):
        g.sum().backward()
