"""The data sets by name: names, splits, and the public API."""

from __future__ import annotations

import pytest
from dataset_files import make_idx

import ssm2d.data
from ssm2d.data import DATASETS, DatasetError, build_dataset, dataset_info


def test_names():
    assert DATASETS == ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")


@pytest.mark.parametrize("name", ["fashion-mnist", "FashionMNIST", "cifar", "tiny_imagenet", ""])
def test_unknown_name_lists_the_valid_ones(name):
    with pytest.raises(ValueError) as err:
        dataset_info(name, "/tmp")
    assert str(err.value) == (
        f"name: expected one of fashion_mnist, mnist, cifar10, cifar100, imagefolder, got {name!r}"
    )
    assert not isinstance(err.value, DatasetError)


def test_bad_split(tmp_path):
    make_idx(tmp_path)
    info = dataset_info("mnist", tmp_path)
    with pytest.raises(ValueError, match="split: expected one of train, val, got 'test'"):
        build_dataset(info, "test")


def test_data_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_idx(tmp_path / "mnist")
    assert dataset_info("mnist", "~/mnist").root == tmp_path / "mnist"


def test_dataset_error_is_a_runtime_error():
    assert issubclass(DatasetError, RuntimeError)


def test_public_api():
    assert set(ssm2d.data.__all__) >= {
        "DATASETS", "DatasetError", "DatasetInfo", "dataset_info", "build_dataset", "build_transform",
        "class_balanced_subset",
    }  # fmt: skip
    assert all(hasattr(ssm2d.data, name) for name in ssm2d.data.__all__)
