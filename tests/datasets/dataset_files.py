"""Writers of tiny synthetic data sets on disk: IDX files, CIFAR python batches, ImageFolder trees.

A plain module, not a conftest.py: the tests import `tests/conftest.py` as `conftest`, which a
second conftest.py here would shadow.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file of unsigned bytes holding `array`; gzipped when the name ends in .gz."""
    raw = (
        bytes([0, 0, 0x08, array.ndim])
        + struct.pack(f">{array.ndim}i", *array.shape)
        + array.astype(np.uint8).tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def random_split(
    rng: np.random.Generator, n: int, size: tuple[int, ...], classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images of `size` and labels covering every class (in a shuffled order)."""
    images = rng.integers(0, 256, size=(n, *size), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % classes).astype(np.uint8)
    return images, labels


def make_idx(folder: Path, n_train: int = 30, n_val: int = 20, size=(28, 28), gz: bool = True):
    """Write the four IDX files of a 10-class set into `folder`; returns {split: (images, labels)}."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images, labels = random_split(rng, n, size, 10)
        images_name, labels_name = IDX_NAMES[split]
        ext = ".gz" if gz else ""
        write_idx(folder / (images_name + ext), images)
        write_idx(folder / (labels_name + ext), labels)
        arrays[split] = (images, labels)
    return arrays


CIFAR = {
    "cifar10": dict(
        train=[f"data_batch_{i}" for i in range(1, 6)], val=["test_batch"], meta="batches.meta",
        names_key="label_names", labels_key="labels", classes=10,
    ),
    "cifar100": dict(
        train=["train"], val=["test"], meta="meta", names_key="fine_label_names", labels_key="fine_labels",
        classes=100,
    ),
}  # fmt: skip


def dump(path: Path, obj, protocol: int = 2, numpy1_names: bool = False) -> Path:
    """Pickle `obj` into `path`; numpy1_names writes numpy's globals as numpy 1 (and the official files) name them."""
    raw = pickle.dumps(obj, protocol=protocol)
    if numpy1_names:
        assert protocol <= 2, "module names are only rewritable in the text GLOBAL opcode"
        assert b"numpy._core" in raw
        raw = raw.replace(b"numpy._core", b"numpy.core")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def make_cifar(folder: Path, name: str, per_batch: int = 12, protocol: int = 2, numpy1_names: bool = False):
    """Write the batch and meta files of `name` into `folder`; returns {split: (images NHWC, labels)}."""
    spec = CIFAR[name]
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("train", "val"):
        all_images, all_labels = [], []
        for file in spec[split]:
            images, labels = random_split(rng, per_batch, (32, 32, 3), spec["classes"])
            rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane
            batch = {"batch_label": file, spec["labels_key"]: labels.tolist(), "data": rows,
                     "filenames": [f"{file}_{i}.png" for i in range(per_batch)]}  # fmt: skip
            if name == "cifar100":
                batch["coarse_labels"] = (labels // 5).tolist()
            dump(folder / file, batch, protocol, numpy1_names)
            all_images.append(images)
            all_labels.append(labels)
        arrays[split] = (np.concatenate(all_images), np.concatenate(all_labels))
    names = [f"class_{i}" for i in range(spec["classes"])]
    dump(folder / spec["meta"], {spec["names_key"]: names, "num_cases_per_batch": per_batch}, protocol)
    return arrays


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 0) -> Path:
    """A (W, H) = size image file with a gradient plus `value`, format from the suffix."""
    w, h = size
    grid = (np.add.outer(np.arange(h), np.arange(w)) * 7 + value) % 256
    array = np.stack([grid, 255 - grid, grid // 2], axis=-1) if mode == "RGB" else grid
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog", "eel"), per_class=(3, 2)):
    """Write root/{train,val}/<class>/ images of varied sizes and modes; returns root."""
    sizes = [(40, 30), (25, 50), (64, 64)]
    modes = ["RGB", "L", "RGB"]
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(classes):
            for i in range(n):
                ext = ".png" if i % 2 else ".jpg"
                write_image(root / split / name / f"{name}_{i}{ext}", sizes[(c + i) % 3], modes[(c + i) % 3], c)
    return root
