"""The data sets by name: find one on disk, then build its train or val split.

Nothing is ever downloaded: a data set that is not on disk, or is corrupt, raises one
`DatasetError` saying what was expected where and how to get it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from .base import DatasetError, DatasetInfo, to_size
from .cifar import _SETS as _CIFAR_SETS
from .cifar import cifar_info, load_cifar
from .folder import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, folder_info, load_folder
from .idx import _SETS as _IDX_SETS
from .idx import idx_info, load_idx

__all__ = ["DATASETS", "build_dataset", "dataset_info", "normalization"]

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "val")


def dataset_info(
    name: str, data_dir: str | Path | None = None, *, img_size: int | Sequence[int] | None = None
) -> DatasetInfo:
    """Find data set `name` on disk and check that it is complete.

    Args:
        name: one of `DATASETS`.
        data_dir: the folder holding it. fashion_mnist: the four IDX files, or torchvision's
            FashionMNIST/raw below it; without data_dir, Debian's /usr/share/datasets/fashion-mnist.
            mnist: the same files, or MNIST/raw below it. cifar10 / cifar100: the python batch
            files, or cifar-10-batches-py / cifar-100-python below it. imagefolder: train/<class>/
            and val/<class>/ below it. Only fashion_mnist works without it.
        img_size: the size images reach the model at by default (`DatasetInfo.img_size`), as N or
            (H, W); None keeps the stored size of fixed-size data sets and 224 for imagefolder.

    Raises:
        ValueError: if `name` is not one of `DATASETS`.
        DatasetError: if the data set is missing, incomplete or its headers disagree.
    """
    root = None if data_dir is None else Path(data_dir).expanduser()
    if root is not None and root.exists() and not root.is_dir():
        raise DatasetError(f"data_dir: {root} is a file, expected a folder holding the {name} files")
    size = None if img_size is None else to_size(img_size, "img_size")
    if name in ("fashion_mnist", "mnist"):
        return idx_info(name, root, size)
    if name in ("cifar10", "cifar100"):
        return cifar_info(name, root, size)
    if name == "imagefolder":
        return folder_info(root, size)
    raise ValueError(f"name: expected one of {', '.join(DATASETS)}, got {name!r}")


def build_dataset(info: DatasetInfo, split: Literal["train", "val"], transform: Callable | None = None) -> Dataset:
    """The `split` of a data set found by `dataset_info`.

    Items are (transform(PIL image), int label); the image is mode "L" for 1-channel data sets
    and "RGB" otherwise. The dataset has `.targets` (the int label of every item, in order) and
    `.classes`. Fixed-size data sets are decoded once into memory.

    Raises:
        ValueError: if `split` is not "train" or "val".
        DatasetError: if a file is missing or corrupt (the message names it).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if info.name in ("fashion_mnist", "mnist"):
        return load_idx(info, split, transform)
    if info.name in ("cifar10", "cifar100"):
        return load_cifar(info, split, transform)
    if info.name == "imagefolder":
        return load_folder(info, split, transform)
    raise ValueError(f"info.name: expected one of {', '.join(DATASETS)}, got {info.name!r}")


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) that data set `name`'s transforms normalize with (`DatasetInfo`'s),
    known without the data set on disk: what a trained model's inputs need at prediction time."""
    if name in _IDX_SETS:
        return (_IDX_SETS[name].mean,), (_IDX_SETS[name].std,)
    if name in _CIFAR_SETS:
        return _CIFAR_SETS[name].mean, _CIFAR_SETS[name].std
    if name == "imagefolder":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    raise ValueError(f"name: expected one of {', '.join(DATASETS)}, got {name!r}")
