"""selective_scan (chunked) against selective_scan_ref (sequential) and against mambapy's
selective scans as an independent oracle: docs/math.md §9."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, grads
from mambapy.mamba import MambaBlock, MambaConfig

from ssm2d.ops import default_chunk_size, selective_scan, selective_scan_ref

# The modules, not the functions that `ssm2d.ops` re-exports under the same names.
scan_module = importlib.import_module("ssm2d.ops.selective_scan")
chunked_module = importlib.import_module("ssm2d.ops.chunked_scan")
F64 = torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# B / C layouts: (groups of B, groups of C); 0 means the ungrouped (B, N, L) layout.
LAYOUTS = {"plain": (0, 0), "grouped": (2, 2), "grouped_3x1": (3, 1)}


def random_inputs(length, softplus, groups=(0, 0), batch=2, d=6, n=3, dtype=torch.float32) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias as leaves requiring grad.

    Without softplus, delta + delta_bias stays in (0, 1.2): a stable scan, as after softplus.
    """
    u = torch.randn(batch, d, length)
    delta = torch.randn(batch, d, length) if softplus else torch.rand(batch, d, length)
    A = -torch.empty(d, n).uniform_(0.1, 4.0)
    bc = [torch.randn(batch, n, length) if g == 0 else torch.randn(batch, g, n, length) for g in groups]
    D, z = torch.randn(d), torch.randn(batch, d, length)
    delta_bias = torch.randn(d) if softplus else torch.rand(d) * 0.2
    return [t.to(dtype).requires_grad_() for t in (u, delta, A, *bc, D, z, delta_bias)]


def widen(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to(F64).requires_grad_() for t in inputs]


def check_against_ref(inputs, softplus, dtype, chunk_size=None) -> None:
    fast = selective_scan(*inputs, delta_softplus=softplus, chunk_size=chunk_size)
    wide = widen(inputs)
    ref = selective_scan_ref(*wide, delta_softplus=softplus)
    assert fast.dtype == inputs[0].dtype and fast.shape == inputs[0].shape
    assert ref.abs().max().item() > 1e-2, "a vanishing output proves nothing"
    assert_close(fast, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip(NAMES, grads(fast, inputs, upstream.to(fast.dtype)), grads(ref, wide, upstream)):
        if name != "A" or inputs[0].shape[-1] > 1:  # with one step, A never acts (h_0 = 0)
            assert g_ref.abs().max().item() > 0, f"d/d{name} is zero: the comparison proves nothing"
        assert_close(g_fast, g_ref, dtype, f"d/d{name}")


# ---------------------------------------------------------------------------------------------
# Fast against ref


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "raw"])
@pytest.mark.parametrize(
    ("length", "chunk_size"), [(1, None), (7, None), (7, 3), (33, None), (33, 1), (33, 8), (50, 16), (20, 64)]
)
def test_fast_float32_matches_ref_float64(length, chunk_size, softplus, layout):
    inputs = random_inputs(length, softplus, LAYOUTS[layout])
    check_against_ref(inputs, softplus, torch.float32, chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 40])
def test_fast_float64_matches_ref_to_rounding(chunk_size):
    inputs = random_inputs(37, True, (2, 0), batch=3, d=4, n=5, dtype=F64)
    check_against_ref(inputs, True, F64, chunk_size)


def test_optional_arguments_and_the_blocks(monkeypatch):
    # Without D, z and delta_bias; with channel blocks smaller than a group (several blocks).
    monkeypatch.setattr(chunked_module, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(chunked_module, "_STEP_ELEMENTS", 1)
    assert len(chunked_module._blocks(4, 2, per_channel=100, chunk=4)) == 4  # one channel per block
    u, delta, A, B, C, *_ = random_inputs(19, False, (2, 2), d=4)
    fast = selective_scan(u, delta, A, B, C, chunk_size=4)
    wide = widen([u, delta, A, B, C])
    ref = selective_scan_ref(*wide)
    assert_close(fast, ref, torch.float32, "output")
    upstream = torch.randn_like(ref)
    pairs = zip(NAMES, grads(fast, [u, delta, A, B, C], upstream.float()), grads(ref, wide, upstream))
    for name, g_fast, g_ref in pairs:
        assert_close(g_fast, g_ref, torch.float32, f"d/d{name}")


def test_long_sequence_and_strong_decay_stay_finite():
    """Decays exp(delta A) down to exp(-400) in float32: only products <= 1 appear."""
    u, delta, A, B, C, D, z, bias = random_inputs(300, False, d=3, n=4)
    delta = (delta.detach() * 100).requires_grad_()  # delta up to 100, A down to -4
    check_against_ref([u, delta, A, B, C, D, z, bias], False, torch.float32, chunk_size=17)


def test_chunk_decay_is_floored_above_the_subnormals():
    """exp(-1000) would underflow (and exp with subnormal results is ~100x slower on CPU)."""
    for dtype in (torch.float32, F64):
        tiny = torch.finfo(dtype).tiny
        dt_sum = torch.tensor([[[0.5, 10.0, 1000.0]]], dtype=dtype)  # (d, B, K) = (1, 1, 3)
        decay = chunked_module._chunk_decay(dt_sum, -torch.ones(1, 2, dtype=dtype))  # (1, 2, 1, 3)
        expected = torch.tensor([math.exp(-0.5), math.exp(-10.0), math.sqrt(tiny)], dtype=dtype)
        assert_close(decay[0, 1, 0], expected, dtype, f"{dtype} decays")
        assert decay.min().item() >= tiny  # never subnormal


def test_workspace_is_reused_across_calls_and_sizes(monkeypatch):
    """Large, then small, then large again through one cached workspace: each matches the ref."""
    cache = chunked_module._CACHE.__dict__.setdefault("buffers", {})
    cache.clear()
    for length, d in ((40, 6), (9, 2), (40, 6)):
        inputs = random_inputs(length, True, d=d)
        check_against_ref(inputs, True, torch.float32, chunk_size=5)
    (key, flat), = cache.items()
    assert key == (torch.device("cpu"), torch.float32) and flat.numel() > 0
    monkeypatch.setattr(chunked_module, "_CACHED_ELEMENTS", 1)  # too big to keep: allocated per call
    cache.clear()
    check_against_ref(random_inputs(12, True), True, torch.float32, chunk_size=4)
    assert not cache


def test_workspace_made_in_inference_mode_serves_autograd_later():
    """Eval under torch.inference_mode, then a training step, through one cached workspace."""
    chunked_module._CACHE.__dict__.setdefault("buffers", {}).clear()
    inputs = random_inputs(21, True)
    with torch.inference_mode():
        selective_scan(*[t.detach() for t in inputs], delta_softplus=True, chunk_size=5)
    check_against_ref(inputs, True, torch.float32, chunk_size=5)
    with torch.inference_mode():  # and back: the cached (normal) tensor is written in inference mode
        fast = selective_scan(*[t.detach() for t in inputs], delta_softplus=True, chunk_size=5)
    assert_close(fast, selective_scan_ref(*widen(inputs), delta_softplus=True), torch.float32, "output")


def test_expanded_upstream_gradient():
    """y.sum().backward() hands the backward an expanded (stride 0) gradient."""
    inputs = random_inputs(23, True, (2, 2))
    selective_scan(*inputs, delta_softplus=True, chunk_size=4).sum().backward()
    wide = widen(inputs)
    selective_scan_ref(*wide, delta_softplus=True).sum().backward()
    for name, t, w in zip(NAMES, inputs, wide):
        assert_close(t.grad, w.grad, torch.float32, f"d/d{name}")


def test_matches_the_recurrence_by_hand():
    """One channel, one state: h_t = exp(delta A) h_{t-1} + delta B u, y = C h + D u."""
    u = torch.tensor([[[1.0, 2.0, -1.0]]], dtype=F64)
    delta = torch.tensor([[[0.5, 1.0, 0.25]]], dtype=F64)
    A = torch.tensor([[-2.0]], dtype=F64)
    B = torch.tensor([[[1.0, -1.0, 2.0]]], dtype=F64)
    C = torch.tensor([[[3.0, 1.0, 0.5]]], dtype=F64)
    D = torch.tensor([0.5], dtype=F64)
    h, expected = 0.0, []
    for t in range(3):
        h = torch.exp(delta[0, 0, t] * A[0, 0]) * h + delta[0, 0, t] * B[0, 0, t] * u[0, 0, t]
        expected.append(C[0, 0, t] * h + D[0] * u[0, 0, t])
    expected = torch.stack(expected).view(1, 1, 3)
    for fn in (selective_scan, selective_scan_ref):
        assert_close(fn(u, delta, A, B, C, D), expected, F64, fn.__name__)


def test_default_chunk_size():
    assert [default_chunk_size(n) for n in (1, 2, 50, 197, 3136)] == [1, 1, 7, 14, 56]


# ---------------------------------------------------------------------------------------------
# mambapy as an independent oracle: x (B, L, E), delta (B, L, E) after softplus, A (E, N),
# B and C (B, L, N), D (E,); returns the scan plus D x, without a gate.


def mambapy_scan(method: str, u, delta, A, B, C, D) -> torch.Tensor:
    """mambapy's MambaBlock.<method> in our layout: (B, E, L) in, (B, E, L) out."""
    e, n = A.shape
    block = MambaBlock(MambaConfig(d_model=e // 2, n_layers=1, d_state=n, expand_factor=2)).to(u.dtype)
    y = getattr(block, method)(u.mT, delta.mT, A, B.mT, C.mT, D)
    return y.mT


@pytest.mark.parametrize("method", ["selective_scan", "selective_scan_seq"], ids=["pscan", "sequential"])
@pytest.mark.parametrize("length", [2, 16, 33])
def test_matches_mambapy_float64(length, method):
    u, delta, A, B, C, D, _, _ = random_inputs(length, False, dtype=F64)
    ours = selective_scan(u, delta, A, B, C, D, chunk_size=5)
    wide = [t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D)]
    theirs = mambapy_scan(method, *wide)
    assert_close(ours, theirs, F64, f"output vs mambapy {method}")
    upstream = torch.randn_like(ours)
    pairs = zip(NAMES, grads(ours, [u, delta, A, B, C, D], upstream), grads(theirs, wide, upstream))
    for name, g_ours, g_theirs in pairs:
        assert g_theirs.abs().max().item() > 0, f"d/d{name} is zero"
        assert_close(g_ours, g_theirs, F64, f"d/d{name} vs mambapy {method}")


def test_softplus_bias_and_gate_match_mambapy_plus_torch():
    """delta_softplus, delta_bias and z on our side equal softplus / sum / silu gate around mambapy."""
    u, delta, A, B, C, D, z, bias = random_inputs(21, True, dtype=F64)
    ours = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    theirs = mambapy_scan("selective_scan_seq", u, F.softplus(delta + bias[:, None]), A, B, C, D) * F.silu(z)
    assert_close(ours, theirs, F64, "output vs mambapy")


# ---------------------------------------------------------------------------------------------
# Errors and backend selection


def test_bad_shapes_raise_clear_errors():
    u, delta, A, B, C, D, z, bias = (t.detach() for t in random_inputs(5, True))
    cases = [
        ((u[0], delta, A, B, C), "u: expected (B, D, L)"),
        ((u, delta[..., :4], A, B, C), "delta: expected (B, D, L)"),
        ((u, delta, A[:5], B, C), "A: expected (D, N) with D=6"),
        ((u, delta, A, B[:, :2], C), "B: expected (B, N, L)"),
        ((u, delta, A, B, torch.randn(2, 4, 3, 5)), "C: expected (B, N, L) = (2, 3, 5) or (B, G, N, L) with D=6"),
        ((u, delta, A, torch.randn(2, 2, 3, 5), torch.randn(2, 3, 3, 5)), "B, C: expected the same number of groups"),
        ((u, delta, A, B, C, D[:5]), "D: expected (6,)"),
        ((u, delta, A, B, C, D, z[:1]), "z: expected (B, D, L)"),
        ((u, delta, A, B, C, D, z, bias[None]), "delta_bias: expected (6,)"),
        ((u.long(), delta, A, B, C), "u: expected a real floating-point tensor"),
    ]
    for fn in (selective_scan, selective_scan_ref):
        for args, message in cases:
            with pytest.raises((ValueError, TypeError)) as info:
                fn(*args)
            assert message in str(info.value), f"{fn.__name__}: {info.value}"
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
            selective_scan(u, delta, A, B, C, chunk_size=bad)
    with pytest.raises(TypeError):
        selective_scan(u, delta, A, B, C, chunksize=4)


def test_cpu_takes_the_torch_path_without_warning():
    u, delta, A, B, C, *_ = (t.detach() for t in random_inputs(4, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(u, delta, A, B, C)
    assert scan_module._cuda_kernel(torch.device("cpu")) is None


def test_missing_cuda_kernel_warns_once(monkeypatch):
    monkeypatch.setattr(scan_module, "_mamba_selective_scan_fn", None)
    monkeypatch.setattr(scan_module, "_KERNEL_OK", {})
    device = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="CUDA kernel is unavailable"):
        assert scan_module._cuda_kernel(device) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_module._cuda_kernel(device) is None  # cached: no second warning


def _wrong_values(*args, **kwargs):
    return selective_scan_ref(*args, **kwargs) + 0.1


def _raises_runtime_error(*args, **kwargs):
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def _old_signature(u, delta, A, B, C, D, z, delta_bias):  # no delta_softplus: a build with another signature
    return u


def _wrong_shape(*args, **kwargs):
    return selective_scan_ref(*args, **kwargs)[..., :-1]


@pytest.mark.parametrize(
    "fake", [_wrong_values, _raises_runtime_error, _old_signature, _wrong_shape],
    ids=["wrong_values", "runtime_error", "type_error", "wrong_shape"],
)  # fmt: skip
def test_kernel_failing_its_smoke_test_is_dropped_with_one_warning(monkeypatch, fake):
    """A kernel that imports but fails the smoke call (on the CPU standing in for the GPU) is
    never used, and the fallback warns exactly once per device."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fake(*args, **kwargs)

    real_smoke = scan_module._smoke_test
    monkeypatch.setattr(scan_module, "_mamba_selective_scan_fn", counting)
    monkeypatch.setattr(scan_module, "_KERNEL_OK", {})
    monkeypatch.setattr(scan_module, "_smoke_test", lambda fn, device: real_smoke(fn, torch.device("cpu")))
    assert not real_smoke(counting, torch.device("cpu")) and calls == [1]
    device = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert scan_module._cuda_kernel(device) is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "failed its smoke test on cuda:0" in messages[0], messages
    assert calls == [1, 1], "the smoke call ran more than once per device"
    with pytest.warns(UserWarning, match="cuda:1"):  # another device gets its own check
        assert scan_module._cuda_kernel(torch.device("cuda", 1)) is None


def test_kernel_passing_its_smoke_test_is_used(monkeypatch):
    """A kernel that matches the ref is used (no warning) for the inputs it takes, and bypassed
    for float64, for B and C with different group counts, and when chunk_size is given."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].dtype)
        return selective_scan_ref(*args, **kwargs)

    real_smoke = scan_module._smoke_test
    monkeypatch.setattr(scan_module, "_mamba_selective_scan_fn", kernel)
    monkeypatch.setattr(scan_module, "_KERNEL_OK", {})
    monkeypatch.setattr(scan_module, "_smoke_test", lambda fn, device: real_smoke(fn, torch.device("cpu")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_module._cuda_kernel(torch.device("cuda", 0)) is kernel
    assert len(calls) == 1, "one smoke call"
    calls.clear()
    # Route CPU inputs to the (fake) device check, so that selective_scan's dispatch runs.
    monkeypatch.setattr(scan_module, "_cuda_kernel", lambda device: kernel)
    inputs = [t.detach() for t in random_inputs(6, True)]
    out = selective_scan(*inputs, delta_softplus=True)
    assert calls == [torch.float32]
    assert_close(out, selective_scan_ref(*inputs, delta_softplus=True), torch.float32, "through the kernel")
    selective_scan(*[t.double() for t in inputs], delta_softplus=True)
    selective_scan(*inputs, delta_softplus=True, chunk_size=2)
    u, delta, A, _, _, D, z, bias = inputs
    B, C = torch.randn(2, 3, 3, 6), torch.randn(2, 1, 3, 6)
    selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert calls == [torch.float32], f"kernel called for inputs it does not take: {calls}"


# ---------------------------------------------------------------------------------------------
# reverse: the backward direction of a bidirectional scan, without flips


def _flip_steps(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias with the per-step ones flipped along L."""
    return [t.flip(-1) if name in ("u", "delta", "B", "C", "z") else t for name, t in zip(NAMES, inputs)]


@pytest.mark.parametrize("layout", ["plain", "grouped_3x1"])
def test_reverse_ref_is_the_forward_ref_on_the_flipped_sequence(layout):
    inputs = [t.detach() for t in widen(random_inputs(9, True, LAYOUTS[layout]))]
    expected = selective_scan_ref(*_flip_steps(inputs), delta_softplus=True).flip(-1)
    got = selective_scan_ref(*inputs, delta_softplus=True, reverse=True)
    assert_close(got, expected, F64, "reverse ref")
    assert not torch.allclose(got, selective_scan_ref(*inputs, delta_softplus=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("length", "chunk_size"), [(1, None), (7, None), (17, None), (53, None), (17, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_reverse_fast_matches_ref_float64(dtype, length, chunk_size, layout):
    """The fused kernel walking backwards (chunk_size None; 17 and 53 steps cross its checkpoint
    chunks) and the chunked scan on flipped inputs (chunk_size 4), outputs and every gradient,
    and the last state h_0 against the forward scan's last state on the flipped sequence."""
    inputs = random_inputs(length, True, LAYOUTS[layout], dtype=dtype)
    fast, last = selective_scan(*inputs, delta_softplus=True, return_last_state=True, reverse=True,
                                chunk_size=chunk_size)  # fmt: skip
    wide = widen(inputs)
    ref = selective_scan_ref(*wide, delta_softplus=True, reverse=True)
    assert ref.abs().max().item() > 1e-2
    assert_close(fast, ref, dtype, "output")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip(NAMES, grads(fast, inputs, upstream.to(dtype)), grads(ref, wide, upstream)):
        if name != "A" or length > 1:
            assert g_ref.abs().max().item() > 0, f"d/d{name} is zero"
        assert_close(g_fast, g_ref, dtype, f"d/d{name}")
    flipped = [t.detach() for t in _flip_steps(wide)]
    _, expected_last = selective_scan(*flipped, delta_softplus=True, return_last_state=True, chunk_size=4)
    assert_close(last, expected_last, dtype, "last state h_0")
