"""CIFAR-10 and CIFAR-100 from their python batch files (Krizhevsky 2009, "python version").

Each batch file is a pickled dict with "data", a (N, 3072) uint8 array of rows holding the
red, green and blue 32 x 32 planes in turn, and a list of labels ("labels" in CIFAR-10,
"fine_labels" in CIFAR-100). The files are read with an unpickler that rebuilds numpy arrays
and plain containers only, so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ArrayDataset, DatasetError, DatasetInfo

__all__ = ["cifar_info", "load_cifar"]

_ROW = 3 * 32 * 32


@dataclass(frozen=True)
class _CifarSet:
    subdir: str  # the folder the official archive unpacks to
    splits: dict[str, tuple[str, ...]]  # split -> batch files
    meta: str  # file holding the class names
    names_key: str
    labels_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    archive: str


_SETS = {
    "cifar10": _CifarSet(
        subdir="cifar-10-batches-py",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)},
        meta="batches.meta", names_key="label_names", labels_key="labels", num_classes=10,
        # Per-channel mean and standard deviation of all training pixels.
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        archive="www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": _CifarSet(
        subdir="cifar-100-python",
        splits={"train": ("train",), "val": ("test",)},
        meta="meta", names_key="fine_label_names", labels_key="fine_labels", num_classes=100,
        # Same statistics as ssm2d.models.builder.DATA_CFGS["cifar100"].
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
        archive="www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}  # fmt: skip

# The globals a CIFAR batch pickle needs: numpy's array reconstruction (under numpy 1's module
# names, as in the official Python 2 files, and numpy 2's) and the bytes constructor of
# protocol-2 pickles written by Python 3.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = module.replace("numpy.core.", "numpy._core.", 1)  # avoids numpy 2's deprecation shim
        return getattr(importlib.import_module(module), name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the official files are Python 2 pickles
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read ({e})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DatasetError(f"{path}: not a CIFAR python batch file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: not a CIFAR python batch file (holds a {type(obj).__name__}, expected a dict)")
    return obj


def _how_to_get(name: str) -> str:
    spec = _SETS[name]
    return f"unpack {spec.archive} and pass the folder holding {spec.subdir} (or {spec.subdir} itself) as data_dir"


def _locate(name: str, data_dir: Path | None) -> Path:
    spec = _SETS[name]
    files = [file for split in spec.splits.values() for file in split] + [spec.meta]
    expected = f"{name}: expected the python batch files {', '.join(files)}"
    if data_dir is None:
        raise DatasetError(f"{expected} in a folder given as data_dir, but none was given; {_how_to_get(name)}")
    candidates = [data_dir, data_dir / spec.subdir]
    problems = []
    for folder in candidates:
        if not folder.is_dir():
            problems.append(f"{folder} does not exist")
            continue
        missing = [file for file in files if not (folder / file).is_file()]
        if not missing:
            return folder
        problems.append(f"{folder} lacks {', '.join(missing)}")
    raise DatasetError(
        f"{expected} in {' or '.join(map(str, candidates))}, but {'; '.join(problems)}; {_how_to_get(name)}"
    )


def cifar_info(name: str, data_dir: Path | None, img_size: tuple[int, int] | None) -> DatasetInfo:
    """Find the batch files of `name` and read the class names from its meta file."""
    spec = _SETS[name]
    root = _locate(name, data_dir)
    meta = _unpickle(root / spec.meta)
    classes = meta.get(spec.names_key)
    if not (
        isinstance(classes, list) and len(classes) == spec.num_classes and all(isinstance(c, str) for c in classes)
    ):
        raise DatasetError(f"{root / spec.meta}: expected {spec.num_classes} class names under {spec.names_key!r}")
    return DatasetInfo(
        name=name, root=root, num_classes=spec.num_classes, in_chans=3, img_size=img_size or (32, 32),
        mean=spec.mean, std=spec.std, classes=tuple(classes), native_size=(32, 32),
    )  # fmt: skip


def load_cifar(info: DatasetInfo, split: str, transform: Callable | None) -> ArrayDataset:
    """Read and check the batch files of `split` ("train" or "val") into one (N, 32, 32, 3) uint8 tensor."""
    spec = _SETS[info.name]
    rows, labels = [], []
    for file in spec.splits[split]:
        path = info.root / file
        if not path.is_file():
            raise DatasetError(f"{info.name}: {path} does not exist; {_how_to_get(info.name)}")
        batch = _unpickle(path)
        data, targets = batch.get("data"), batch.get(spec.labels_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _ROW):
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DatasetError(f"{path}: expected 'data' to be a uint8 array of shape (N, {_ROW}), got {got}")
        if not isinstance(targets, list) or len(targets) != len(data):
            got = len(targets) if isinstance(targets, list) else type(targets).__name__
            raise DatasetError(f"{path}: expected {spec.labels_key!r} to be a list of {len(data)} labels, got {got}")
        if targets and not all(isinstance(t, int) and 0 <= t < spec.num_classes for t in targets):
            raise DatasetError(f"{path}: labels must be ints in 0..{spec.num_classes - 1}")
        rows.append(data)
        labels.extend(targets)
    images = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, 3) for PIL
    data = torch.from_numpy(np.ascontiguousarray(images))
    return ArrayDataset(data, torch.tensor(labels, dtype=torch.long), info.classes, transform)
