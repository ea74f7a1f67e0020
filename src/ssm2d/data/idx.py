"""Fashion-MNIST and MNIST from their IDX files, gzipped or not, decoded into one uint8 tensor.

IDX format (LeCun et al., "The MNIST database", file formats section): 2 zero bytes, a type
byte (0x08 = unsigned byte), the number of dimensions, one big-endian int32 size per dimension,
then the data in row-major order.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import ArrayDataset, DatasetError, DatasetInfo

__all__ = ["DEBIAN_FASHION_MNIST", "IDX_FILES", "idx_info", "load_idx", "read_idx", "read_idx_shape"]

# Where Debian's `dataset-fashion-mnist` package installs the four gzipped files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# split -> (images, labels) file names; each may also be stored with a ".gz" suffix.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08


@dataclass(frozen=True)
class _IdxSet:
    subdir: str  # torchvision's layout: data_dir/<subdir>/raw
    default_dir: Path | None  # searched when no data_dir is given
    classes: tuple[str, ...]
    mean: float
    std: float
    how_to_get: str


_SETS = {
    "fashion_mnist": _IdxSet(
        subdir="FashionMNIST",
        default_dir=DEBIAN_FASHION_MNIST,
        # Label names of Xiao et al. 2017, github.com/zalandoresearch/fashion-mnist.
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
        ),
        mean=0.2860,
        std=0.3530,
        how_to_get=(
            f"install them with `apt-get install dataset-fashion-mnist` (into {DEBIAN_FASHION_MNIST}, used when "
            "no data_dir is given), or copy the four files of github.com/zalandoresearch/fashion-mnist "
            "(data/fashion) into one folder and pass it as data_dir"
        ),
    ),
    "mnist": _IdxSet(
        subdir="MNIST",
        default_dir=None,
        classes=tuple(str(digit) for digit in range(10)),
        mean=0.1307,
        std=0.3081,
        how_to_get=(
            "copy the four files of the MNIST database (yann.lecun.com/exdb/mnist) into one folder and pass it "
            "as data_dir"
        ),
    ),
}  # fmt: skip


def _open_idx(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _shape_from_header(path: Path, header: bytes, ndim: int) -> tuple[int, ...]:
    magic = bytes([0, 0, _UBYTE, ndim])
    if header[:4] != magic:
        raise DatasetError(
            f"{path}: not an IDX file of {ndim}-D unsigned bytes: magic number {header[:4].hex() or 'missing'}, "
            f"expected {magic.hex()}"
        )
    if len(header) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({len(header)} bytes, expected {4 + 4 * ndim})")
    return struct.unpack(f">{ndim}i", header[4 : 4 + 4 * ndim])


def read_idx_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The array shape an IDX file of unsigned bytes declares, read from its header only."""
    try:
        with _open_idx(path) as f:
            header = f.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot be read ({e})") from e
    return _shape_from_header(path, header, ndim)


def read_idx(path: Path, ndim: int) -> Tensor:
    """Decode an IDX file of unsigned bytes (gzipped when its name ends in .gz) into a uint8 tensor.

    Raises:
        DatasetError: naming the file, if it cannot be read or decompressed, has the wrong magic
            number, or holds more or fewer bytes than its header declares.
    """
    try:
        with _open_idx(path) as f:
            raw = bytearray(f.read())
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from e
    shape = _shape_from_header(path, bytes(raw[: 4 + 4 * ndim]), ndim)
    offset, expected = 4 + 4 * ndim, math.prod(shape)
    if len(raw) - offset != expected:
        raise DatasetError(
            f"{path}: {'truncated' if len(raw) - offset < expected else 'trailing bytes'}: the header declares "
            f"{'x'.join(map(str, shape))} = {expected} bytes of data, the file holds {len(raw) - offset}"
        )
    return torch.frombuffer(raw, dtype=torch.uint8, offset=offset).view(shape)


def _find_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The IDX files in `folder` (name without .gz -> path, the plain file preferred) and the missing names."""
    found, missing = {}, []
    for stem in (stem for pair in IDX_FILES.values() for stem in pair):
        path = next((folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()), None)
        if path is None:
            missing.append(stem)
        else:
            found[stem] = path
    return found, missing


def _locate(name: str, data_dir: Path | None) -> tuple[Path, dict[str, Path]]:
    spec = _SETS[name]
    expected = (
        f"{name}: expected the IDX files {', '.join(s for p in IDX_FILES.values() for s in p)} (each may end in .gz)"
    )
    if data_dir is None and spec.default_dir is None:
        raise DatasetError(f"{expected} in a folder given as data_dir, but none was given; {spec.how_to_get}")
    candidates = [spec.default_dir] if data_dir is None else [data_dir, data_dir / spec.subdir / "raw"]
    problems = []
    for folder in candidates:
        if not folder.is_dir():
            problems.append(f"{folder} does not exist")
            continue
        found, missing = _find_files(folder)
        if not missing:
            return folder, found
        problems.append(f"{folder} lacks {', '.join(missing)}")
    raise DatasetError(
        f"{expected} in {' or '.join(map(str, candidates))}, but {'; '.join(problems)}; {spec.how_to_get}"
    )


def idx_info(name: str, data_dir: Path | None, img_size: tuple[int, int] | None) -> DatasetInfo:
    """Find the IDX files of `name` and check that their headers agree (sizes and counts)."""
    spec = _SETS[name]
    root, files = _locate(name, data_dir)
    native = None
    for images_stem, labels_stem in IDX_FILES.values():
        n, h, w = read_idx_shape(files[images_stem], 3)
        (m,) = read_idx_shape(files[labels_stem], 1)
        if n != m:
            raise DatasetError(f"{files[images_stem]} holds {n} images but {files[labels_stem]} holds {m} labels")
        if native is not None and native != (h, w):
            raise DatasetError(
                f"{files[images_stem]}: images are {h}x{w}, those of the train split {native[0]}x{native[1]}"
            )
        native = (h, w)
    return DatasetInfo(
        name=name, root=root, num_classes=len(spec.classes), in_chans=1, img_size=img_size or native,
        mean=(spec.mean,), std=(spec.std,), classes=spec.classes, native_size=native,
    )  # fmt: skip


def load_idx(info: DatasetInfo, split: str, transform: Callable | None) -> ArrayDataset:
    """Decode the images and labels of `split` ("train" or "val") and check them against each other."""
    found, missing = _find_files(info.root)
    if missing:
        raise DatasetError(f"{info.name}: {info.root} lacks {', '.join(missing)}; {_SETS[info.name].how_to_get}")
    images_path, labels_path = (found[stem] for stem in IDX_FILES[split])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if tuple(images.shape[1:]) != info.native_size:
        raise DatasetError(f"{images_path}: images are {tuple(images.shape[1:])}, expected {info.native_size}")
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise DatasetError(f"{labels_path}: labels must lie in 0..{info.num_classes - 1}, found {int(labels.max())}")
    return ArrayDataset(images, labels.long(), info.classes, transform)
