"""Class-balanced subsets: exact per-class counts, determinism, nesting, errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ssm2d.data import LabeledSubset, class_balanced_subset


class Labels(torch.utils.data.Dataset):
    """Items are their own index; only the labels matter."""

    def __init__(self, targets):
        self.targets = targets
        self.classes = [f"c{i}" for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return index, int(self.targets[index])


# Class sizes chosen to hit every branch of the rounding rule for fraction 0.1:
# 25 -> 2.5 -> 3 (half up), 24 -> 2.4 -> 2, 35 -> 3.5 -> 4, 4 -> 0.4 -> 1 (at least one), 100 -> 10.
SIZES = {0: 25, 1: 24, 3: 35, 7: 4, 9: 100}  # labels 2, 4, 5, 6, 8 have no items


def labels(sizes=SIZES, seed=0):
    order = torch.randperm(sum(sizes.values()), generator=torch.Generator().manual_seed(seed))
    flat = torch.tensor([label for label, n in sizes.items() for _ in range(n)])
    return flat[order].tolist()


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.1, {0: 3, 1: 2, 3: 4, 7: 1, 9: 10}),
        (0.5, {0: 13, 1: 12, 3: 18, 7: 2, 9: 50}),
        (0.02, {0: 1, 1: 1, 3: 1, 7: 1, 9: 2}),
        (1, SIZES),
        (1.0, SIZES),
    ],
)
def test_per_class_counts_are_exact(fraction, expected):
    ds = Labels(labels())
    subset = class_balanced_subset(ds, fraction, seed=0)
    assert isinstance(subset, LabeledSubset)
    assert Counter(subset.targets) == expected
    assert subset.targets == [ds.targets[i] for i in subset.indices]
    assert list(subset.indices) == sorted(set(subset.indices))
    assert [subset[i][0] for i in range(len(subset))] == list(subset.indices)
    assert subset.classes == ds.classes


def test_rule_matches_its_formula():
    for fraction in (0.01, 0.05, 0.1, 0.15, 0.25, 0.3, 0.45, 0.7, 0.99):
        for n in (1, 2, 3, 7, 10, 20, 30, 333):
            subset = class_balanced_subset(Labels([0] * n), fraction, seed=1)
            # Half up on the decimal value of fraction, computed in integers: fraction = p / 100.
            p = round(fraction * 100)
            assert len(subset) == max(1, (2 * p * n + 100) // 200), (fraction, n)


def test_deterministic_in_seed():
    ds = Labels(labels())
    a = class_balanced_subset(ds, 0.3, seed=5)
    assert a.indices == class_balanced_subset(ds, 0.3, seed=5).indices
    assert a.indices != class_balanced_subset(ds, 0.3, seed=6).indices
    torch.manual_seed(123)  # the global RNG plays no part
    assert a.indices == class_balanced_subset(ds, 0.3, seed=5).indices


def test_nested_across_fractions():
    ds = Labels(labels())
    previous = set()
    for fraction in (0.05, 0.1, 0.25, 0.5, 0.8, 1.0):
        current = set(class_balanced_subset(ds, fraction, seed=3).indices)
        assert previous <= current, fraction
        previous = current
    assert previous == set(range(len(ds)))


def test_tensor_targets_and_subset_of_subset():
    ds = Labels(torch.tensor(labels()))
    half = class_balanced_subset(ds, 0.5, seed=0)
    quarter = class_balanced_subset(half, 0.5, seed=0)
    assert Counter(quarter.targets) == {0: 7, 1: 6, 3: 9, 7: 1, 9: 25}
    assert all(ds.targets[half.indices[i]] == t for i, t in zip(quarter.indices, quarter.targets, strict=True))


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan"), "0.5", True, None])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction: expected a number in \(0, 1\]"):
        class_balanced_subset(Labels([0, 1]), fraction, seed=0)


def test_needs_targets():
    with pytest.raises(ValueError, match="dataset: expected a dataset with .targets"):
        class_balanced_subset(torch.utils.data.TensorDataset(torch.zeros(3)), 0.5, seed=0)
