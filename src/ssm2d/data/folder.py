"""ImageFolder trees: data_dir/train/<class>/<image> and data_dir/val/<class>/<image>.

For Tiny-ImageNet, ImageNet-100 or a user's own images. Tiny-ImageNet's validation layout
(val/images/* listed in val/val_annotations.txt, one "file<TAB>class<TAB>box" line per image)
is read as it is unpacked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .base import DatasetError, DatasetInfo

__all__ = ["ANNOTATIONS", "DEFAULT_IMG_SIZE", "AnnotatedImages", "folder_info", "load_folder", "load_rgb"]

DEFAULT_IMG_SIZE = (224, 224)
ANNOTATIONS = "val_annotations.txt"  # Tiny-ImageNet's validation labels, in data_dir/val
HOW_TO_GET = (
    "arrange the images as data_dir/train/<class>/<image> and data_dir/val/<class>/<image>, with the same "
    f"class folders in both (Tiny-ImageNet's val/images + val/{ANNOTATIONS} layout is read too)"
)


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB; an unreadable file raises a DatasetError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"{path}: cannot be read as an image ({e}); replace or remove it") from e


class AnnotatedImages(Dataset):
    """Images listed with their class in a text file; items are (transform(RGB image), int label).

    Args:
        samples: (image path, label) pairs.
        classes: class names; the label of `classes[i]` is i.
        transform: applied to each PIL image; None returns the image.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Callable | None = None) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = load_rgb(str(path))
        return (img if self.transform is None else self.transform(img)), label


def _class_dirs(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())  # as ImageFolder orders them


def _read_annotations(path: Path) -> list[tuple[str, str]]:
    """(file name, class) pairs of a Tiny-ImageNet annotation file."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise DatasetError(f"{path}, line {number}: expected 'file<TAB>class...', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def folder_info(data_dir: Path | None, img_size: tuple[int, int] | None) -> DatasetInfo:
    """Find the train and val folders under `data_dir` and check that they hold the same classes."""
    if data_dir is None:
        raise DatasetError(
            f"imagefolder: expected a data_dir holding train/ and val/, but none was given; {HOW_TO_GET}"
        )
    train, val = data_dir / "train", data_dir / "val"
    for folder in (train, val):
        if not folder.is_dir():
            raise DatasetError(f"imagefolder: expected the folder {folder}, but it does not exist; {HOW_TO_GET}")
    classes = _class_dirs(train)
    if not classes:
        raise DatasetError(f"imagefolder: expected one folder per class in {train}, found none; {HOW_TO_GET}")
    annotations = val / ANNOTATIONS
    val_classes = sorted({c for _, c in _read_annotations(annotations)}) if annotations.is_file() else _class_dirs(val)
    if val_classes != classes:
        only_train, only_val = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        raise DatasetError(
            f"imagefolder: the classes of {train} and {val} differ: only in train {only_train[:10]}"
            f"{' ...' if len(only_train) > 10 else ''} ({len(only_train)}), only in val {only_val[:10]}"
            f"{' ...' if len(only_val) > 10 else ''} ({len(only_val)}); {HOW_TO_GET}"
        )
    return DatasetInfo(
        name="imagefolder", root=data_dir, num_classes=len(classes), in_chans=3, img_size=img_size or DEFAULT_IMG_SIZE,
        mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), classes=tuple(classes),
    )  # fmt: skip


def load_folder(info: DatasetInfo, split: str, transform: Callable | None) -> Dataset:
    """The images of `split` ("train" or "val"), labelled by class folder (or annotation file)."""
    folder = info.root / split
    annotations = folder / ANNOTATIONS
    classes = list(info.classes)
    if split == "val" and annotations.is_file():
        index = {name: i for i, name in enumerate(classes)}
        samples = []
        for file, name in _read_annotations(annotations):
            path = folder / "images" / file
            if name not in index:
                raise DatasetError(f"{annotations}: lists {file} of class {name!r}, which {info.root / 'train'} lacks")
            if not path.is_file():
                raise DatasetError(f"{annotations}: lists {file}, but {path} does not exist")
            samples.append((path, index[name]))
        return AnnotatedImages(samples, classes, transform)
    try:
        dataset = ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as e:  # a class folder without images, or a missing folder
        raise DatasetError(f"imagefolder: {folder}: {e}; {HOW_TO_GET}") from e
    if dataset.classes != classes:
        raise DatasetError(f"imagefolder: the class folders of {folder} changed since the data set was opened")
    return dataset
