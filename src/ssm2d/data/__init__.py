"""Data sets (Fashion-MNIST / MNIST IDX files, CIFAR python batches, ImageFolder trees) and transforms.

Nothing is downloaded: `dataset_info` finds a data set on disk or raises one `DatasetError`
saying what was expected where and how to get it.
"""

from .base import ArrayDataset, DatasetError, DatasetInfo
from .datasets import DATASETS, build_dataset, dataset_info, normalization
from .subset import LabeledSubset, class_balanced_subset
from .transforms import build_transform

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "LabeledSubset",
    "build_dataset",
    "build_transform",
    "class_balanced_subset",
    "dataset_info",
    "normalization",
]
