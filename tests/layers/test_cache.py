"""ParameterCache: the eval-mode cache every caching layer uses, keyed on a caller's key and the
parameters' version counters (no value read)."""

from __future__ import annotations

import torch

from ssm2d.layers.cache import ParameterCache


class Counter:
    """compute() for the cache: returns the parameter's sum, counts its calls."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param, self.calls = param, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.param.detach().sum()


def test_hit_while_key_and_parameters_are_unchanged():
    p = torch.nn.Parameter(torch.randn(3))
    cache, compute = ParameterCache(), Counter(p)
    first = cache.fetch("a", [p], compute)
    assert cache.fetch("a", [p], compute) is first and compute.calls == 1
    cache.fetch("b", [p], compute)  # another key
    assert compute.calls == 2 and cache.key == "b"


def test_in_place_updates_moves_and_replacements_invalidate():
    p = torch.nn.Parameter(torch.randn(3))
    cache = ParameterCache()
    compute = Counter(p)
    cache.fetch("k", [p], compute)
    with torch.no_grad():
        p.mul_(2)  # an optimizer step or a load_state_dict bumps the version counter
    assert torch.equal(cache.fetch("k", [p], compute), p.detach().sum()) and compute.calls == 2
    q = p.double()  # another dtype (and storage)
    assert cache.fetch("k", [q], compute) is not None and compute.calls == 3
    r = torch.nn.Parameter(q.detach().clone())  # same values, another parameter
    cache.fetch("k", [r], compute)
    assert compute.calls == 4


def test_clear_drops_the_entry():
    p = torch.nn.Parameter(torch.randn(3))
    cache, compute = ParameterCache(), Counter(p)
    cache.fetch("k", [p], compute)
    cache.clear()
    assert cache.key is None and cache.value is None
    cache.fetch("k", [p], compute)
    assert compute.calls == 2


def test_parameters_without_storage_are_stamped_without_reading_values():
    """Meta tensors have no values at all: the stamp must not need them."""
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    cache = ParameterCache()
    value = cache.fetch("k", [p], lambda: torch.zeros(()))
    assert cache.fetch("k", [p], lambda: torch.ones(())) is value
