"""What every data set shares: its description, its error type and an in-memory image array."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DatasetError

__all__ = ["ArrayDataset", "DatasetError", "DatasetInfo", "to_size"]


@dataclass(frozen=True)
class DatasetInfo:
    """A data set found on disk, with everything a model and its transforms need to know.

    Attributes:
        name: one of `DATASETS`.
        root: the folder the files are read from.
        num_classes: number of classes; labels are 0 .. num_classes - 1.
        in_chans: image channels the transforms produce (1 grayscale, 3 RGB).
        img_size: (H, W) the images reach the model at unless a transform asks otherwise: the
            stored size of fixed-size data sets, 224 x 224 for ImageFolder trees by default.
        mean: per-channel mean of the pixels in [0, 1] units, for Normalize.
        std: per-channel standard deviation, for Normalize.
        classes: class names; the label of `classes[i]` is i.
        native_size: (H, W) of the stored images; None when they vary (ImageFolder trees).
    """

    name: str
    root: Path
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    native_size: tuple[int, int] | None = None


def to_size(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """An image size given as N or (H, W), as a validated (H, W) tuple of positive ints."""
    size = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"{what}: expected a positive int or a pair (H, W) of them, got {value!r}")
    return size


class ArrayDataset(Dataset):
    """Images held in memory as one uint8 tensor; items are (transform(PIL image), int label).

    Args:
        data: (N, H, W) grayscale or (N, H, W, 3) RGB images, uint8.
        targets: (N,) integer labels.
        classes: class names; the label of `classes[i]` is i.
        transform: applied to each PIL image (mode "L" or "RGB"); None returns the image.
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if data.dtype != torch.uint8 or not (data.ndim == 3 or (data.ndim == 4 and data.shape[-1] == 3)):
            raise ValueError(f"data: expected uint8 (N, H, W) or (N, H, W, 3), got {data.dtype} {tuple(data.shape)}")
        if targets.shape != data.shape[:1]:
            raise ValueError(f"targets: expected shape ({len(data)},), got {tuple(targets.shape)}")
        self.data = data.contiguous()
        self.targets: list[int] = targets.tolist()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.data.numpy()[index])  # mode "L" for (H, W), "RGB" for (H, W, 3)
        return (img if self.transform is None else self.transform(img)), self.targets[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={tuple(self.data.shape)}, classes={len(self.classes)}, "
            f"transform={self.transform!r})"
        )
