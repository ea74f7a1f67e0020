"""The real Fashion-MNIST, as Debian's dataset-fashion-mnist package installs it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ssm2d.data import ArrayDataset, build_dataset, build_transform, class_balanced_subset, dataset_info
from ssm2d.data.idx import DEBIAN_FASHION_MNIST, IDX_FILES

FILES = [DEBIAN_FASHION_MNIST / f"{stem}.gz" for pair in IDX_FILES.values() for stem in pair]
pytestmark = pytest.mark.skipif(
    not all(path.is_file() for path in FILES),
    reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def splits():
    info = dataset_info("fashion_mnist")
    return info, build_dataset(info, "train"), build_dataset(info, "val")


def test_info(splits):
    info, _, _ = splits
    assert info.root == DEBIAN_FASHION_MNIST
    assert (info.num_classes, info.in_chans, info.img_size, info.native_size) == (10, 1, (28, 28), (28, 28))
    assert info.classes[0] == "T-shirt/top" and info.classes[9] == "Ankle boot"


def test_counts_and_balance(splits):
    _, train, val = splits
    assert (len(train), len(val)) == (60000, 10000)
    assert Counter(train.targets) == {c: 6000 for c in range(10)}
    assert Counter(val.targets) == {c: 1000 for c in range(10)}
    assert tuple(train.data.shape) == (60000, 28, 28) and train.data.dtype == torch.uint8


def test_pixel_statistics_match_the_documented_ones(splits):
    info, train, _ = splits
    pixels = train.data.double() / 255
    assert abs(pixels.mean().item() - info.mean[0]) < 5e-4, pixels.mean().item()
    assert abs(pixels.std().item() - info.std[0]) < 5e-4, pixels.std().item()
    normalized = torch.stack([build_transform(info, train=False)(train[i][0]) for i in range(0, 60000, 60)])
    assert abs(normalized.mean().item()) < 0.02 and abs(normalized.std().item() - 1) < 0.02


def test_training_items_and_subset(splits):
    info, train, _ = splits
    tf = build_transform(info, True, crop_padding=2, hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    augmented = ArrayDataset(train.data, torch.tensor(train.targets), train.classes, tf)  # shares the pixels
    x, y = augmented[123]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32 and y == train.targets[123]
    subset = class_balanced_subset(train, 0.01, seed=0)
    assert Counter(subset.targets) == {c: 60 for c in range(10)}
