"""Class-balanced subsets, for sample-efficiency studies (train on 10 %, 25 %, ... of the data)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch.utils.data import Dataset, Subset

__all__ = ["LabeledSubset", "class_balanced_subset"]


class LabeledSubset(Subset):
    """A `Subset` that keeps the labels (`.targets`) and `.classes` of the items it holds.

    Args:
        dataset: a dataset with `.targets`.
        indices: the items of `dataset` to keep, in order.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, indices)
        labels = dataset.targets
        self.targets: list[int] = [int(labels[i]) for i in indices]
        self.classes = getattr(dataset, "classes", None)


def class_balanced_subset(dataset: Dataset, fraction: float, seed: int) -> LabeledSubset:
    """The same fraction of every class, drawn at random but reproducibly.

    Rule: a class with n items keeps k = max(1, floor(fraction * n + 1/2)) of them, i.e. fraction
    * n rounded half up, and at least one. `fraction` is taken as the decimal it prints as
    (0.1 is exactly 1/10), so fraction 0.1 of 25 items keeps 3. fraction 1 keeps everything.

    The items of each class are ranked by one random permutation per class, drawn in label order
    from a `torch.Generator` seeded with `seed`; the first k are kept. The ranking does not depend
    on `fraction`, so with one seed a smaller fraction's subset lies inside a larger one's. The
    kept indices are in ascending order.

    Args:
        dataset: a dataset with `.targets`, the int label of every item.
        fraction: the share of each class to keep, in (0, 1].
        seed: seed of the draw.

    Raises:
        ValueError: if `fraction` is outside (0, 1] or `dataset` has no `.targets`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    if not hasattr(dataset, "targets"):
        raise ValueError(f"dataset: expected a dataset with .targets (its labels), got {type(dataset).__name__}")
    labels = torch.as_tensor(dataset.targets, dtype=torch.long)  # (N,)
    exact = Fraction(repr(float(fraction)))
    generator = torch.Generator().manual_seed(seed)
    _, counts = torch.unique(labels, return_counts=True)  # classes in ascending label order
    kept = [torch.zeros(0, dtype=torch.long)]
    for members in torch.argsort(labels, stable=True).split(counts.tolist()):  # each class's indices, ascending
        k = max(1, math.floor(exact * len(members) + Fraction(1, 2)))
        kept.append(members[torch.randperm(len(members), generator=generator)[:k]])
    indices = torch.cat(kept).sort().values
    return LabeledSubset(dataset, indices.tolist())
