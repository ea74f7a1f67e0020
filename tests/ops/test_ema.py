"""ema (closed-form kernel + FFT convolution) against ema_ref (Mega's EMA recurrence, step by
step); ema_kernel against the recurrence's impulse response; direction and causality."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, grads

from ssm2d.ops import ema, ema_kernel, ema_ref

F64 = torch.float64
LENGTHS = [1, 2, 7, 16, 33]
NAMES = ("x", "alpha", "delta", "beta", "eta", "omega")


def random_inputs(length, directions=2, batch=3, channels=4, h=5, dtype=torch.float32) -> list[torch.Tensor]:
    """x (B, L, C), alpha, delta in (0.05, 0.95), beta, eta (D, C, h), omega (C,); leaves requiring grad."""
    x = torch.randn(batch, length, channels)
    alpha, delta = (0.05 + 0.9 * torch.rand(directions, channels, h) for _ in range(2))
    beta, eta = torch.randn(directions, channels, h), torch.randn(directions, channels, h)
    omega = torch.randn(channels)
    return [t.to(dtype).requires_grad_() for t in (x, alpha, delta, beta, eta, omega)]


def widen(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to(F64).requires_grad_() for t in tensors]


@pytest.mark.parametrize("directions", [1, 2], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", LENGTHS)
def test_fast_float32_matches_ref_float64(length, batch, directions):
    inputs = random_inputs(length, directions, batch)
    wide = widen(inputs)
    fast = ema(*inputs)
    ref = ema_ref(*wide)
    assert fast.dtype == torch.float32 and fast.shape == (batch, length, 4)
    assert_close(fast, ref, torch.float32, "output")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip(NAMES, grads(fast, inputs, upstream.float()), grads(ref, wide, upstream)):
        if not (name == "delta" and length == 1):  # the decay acts from the second step on
            assert g_ref.abs().max().item() > 0, f"d/d{name} is zero: the comparison proves nothing"
        assert_close(g_fast, g_ref, torch.float32, f"d/d{name}")


@pytest.mark.parametrize("directions", [1, 2], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length", [1, 9, 20])
def test_fast_matches_ref_float64(length, directions):
    inputs = widen(random_inputs(length, directions, batch=2))
    fast, ref = ema(*inputs), ema_ref(*inputs)
    assert fast.dtype == F64
    assert_close(fast, ref, F64, "output")
    upstream = torch.randn_like(ref)
    for name, g_fast, g_ref in zip(NAMES, grads(fast, inputs, upstream), grads(ref, inputs, upstream)):
        assert_close(g_fast, g_ref, F64, f"d/d{name}")


def test_without_omega_and_with_omega_differ_by_omega_x():
    x, alpha, delta, beta, eta, omega = (t.detach().to(F64) for t in random_inputs(11))
    for fn in (ema, ema_ref):
        with_skip, without = fn(x, alpha, delta, beta, eta, omega), fn(x, alpha, delta, beta, eta)
        assert_close(with_skip - without, x * omega, F64, f"{fn.__name__}: skip term")


@pytest.mark.parametrize("length", [1, 6, 25])
def test_kernel_is_the_impulse_response_of_the_recurrence(length):
    _, alpha, delta, beta, eta, _ = (t.detach().to(F64) for t in random_inputs(length, directions=1, channels=3))
    impulse = torch.zeros(1, length, 3, dtype=F64)
    impulse[:, 0] = 1.0
    response = ema_ref(impulse, alpha, delta, beta, eta)[0].T  # (C, L)
    kernel = ema_kernel(alpha, delta, beta, eta, length)
    assert kernel.shape == (1, 3, length)
    assert_close(kernel[0], response, F64, "kernel vs impulse response")
    # the closed form, written out for one channel and tap
    t, c = length - 1, 2
    q = 1 - alpha[0, c] * delta[0, c]
    expected = (eta[0, c] * alpha[0, c] * beta[0, c] * q**t).sum()
    assert_close(kernel[0, c, t], expected, F64, "k_t by the formula")


def test_kernel_broadcasts_leading_dimensions_and_survives_full_decay():
    alpha = torch.tensor([[[1.0, 0.5]]], dtype=F64, requires_grad=True)  # alpha delta = 1: q = 0
    delta = torch.tensor([[[1.0, 0.5]]], dtype=F64, requires_grad=True)
    beta = torch.ones(1, 1, 2, dtype=F64, requires_grad=True)
    eta = torch.ones(1, 1, 2, dtype=F64, requires_grad=True)
    k = ema_kernel(alpha, delta, beta, eta, 4)
    assert_close(k, torch.tensor([[[1.5, 0.375, 0.28125, 0.2109375]]], dtype=F64), F64, "kernel")
    k.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (alpha, delta, beta, eta))


def test_backward_direction_reads_the_future_and_forward_the_past():
    x, alpha, delta, beta, eta, omega = (t.detach().to(F64) for t in random_inputs(10))
    changed = x.clone()
    changed[:, 6] += 1.0
    eta_backward = eta.clone()
    eta_backward[0] = 0.0  # silences the forward direction
    for fn in (ema, ema_ref):
        forward_only = [fn(v, alpha[:1], delta[:1], beta[:1], eta[:1]) for v in (x, changed)]
        assert_close(forward_only[0][:, :6], forward_only[1][:, :6], F64, f"{fn.__name__}: causal past")
        assert not torch.allclose(forward_only[0][:, 6:], forward_only[1][:, 6:])
        backward_only = [fn(v, alpha, delta, beta, eta_backward) for v in (x, changed)]
        assert_close(backward_only[0][:, 7:], backward_only[1][:, 7:], F64, f"{fn.__name__}: anti-causal future")
        assert not torch.allclose(backward_only[0][:, :7], backward_only[1][:, :7])
        # the backward EMA is the forward EMA, with the backward parameters, of the reversed sequence
        reversed_ = fn(x.flip(1), alpha[1:], delta[1:], beta[1:], eta[1:]).flip(1)
        assert_close(backward_only[0], reversed_, F64, f"{fn.__name__}: backward = reversed forward")
        both = fn(x, alpha, delta, beta, eta, omega)
        assert_close(both, forward_only[0] + backward_only[0] + x * omega, F64, f"{fn.__name__}: sum of directions")


def test_half_precision_runs_in_float32():
    inputs = [t.detach() for t in random_inputs(19)]
    expected = ema_ref(*widen(inputs))
    y = ema(inputs[0].to(torch.bfloat16), *inputs[1:])
    assert y.dtype == torch.bfloat16
    assert_close(y, expected, torch.bfloat16, "bfloat16 output")


def test_empty_batch_gives_an_empty_output():
    x, *params = random_inputs(7, batch=1)
    y = ema(x[:0], *params)
    assert y.shape == (0, 7, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.__setitem__(0, torch.randn(2, 7)), r"x: expected a real floating-point \(B, L, C\)"),
        (lambda p: p.__setitem__(0, torch.randn(2, 7, 3)), r"x: expected .* with C=4, got \(2, 7, 3\)"),
        (lambda p: p.__setitem__(0, torch.randn(2, 0, 4)), r"x: expected a sequence of length L >= 1"),
        (lambda p: p.__setitem__(slice(1, 5), [torch.rand(3, 4, 5)] * 4), r"alpha: expected shape \(D, C, h\) with D"),
        (lambda p: p.__setitem__(3, torch.rand(2, 4, 6)), r"beta: expected the shape of alpha \(2, 4, 5\)"),
        (lambda p: p.__setitem__(4, torch.ones(2, 4, 5, dtype=torch.int64)), r"eta: expected a real floating"),
        (lambda p: p.__setitem__(5, torch.ones(3)), r"omega: expected None or shape \(C,\) with C=4"),
    ],
)
def test_bad_inputs_are_clear_errors(change, message):
    params = [t.detach() for t in random_inputs(7)]
    change(params)
    for fn in (ema, ema_ref):
        with pytest.raises(ValueError, match=message):
            fn(*params)


@pytest.mark.parametrize("length", [0, 2.0, True])
def test_bad_kernel_length_is_a_clear_error(length):
    _, alpha, delta, beta, eta, _ = (t.detach() for t in random_inputs(3))
    with pytest.raises(ValueError, match=r"length: expected an integer >= 1"):
        ema_kernel(alpha, delta, beta, eta, length)
