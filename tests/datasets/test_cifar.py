"""CIFAR-10 / CIFAR-100 from synthetic python batch files: decoding, layouts and every error."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from dataset_files import make_cifar
from PIL import Image

from ssm2d.data import DatasetError, build_dataset, dataset_info

SUBDIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@pytest.mark.parametrize(
    ("protocol", "numpy1_names"), [(2, True), (2, False), (5, False)], ids=["py2-names", "p2", "p5"]
)
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_loads_images_and_labels(tmp_path, name, protocol, numpy1_names):
    arrays = make_cifar(tmp_path, name, per_batch=12, protocol=protocol, numpy1_names=numpy1_names)
    info = dataset_info(name, tmp_path)
    classes = 10 if name == "cifar10" else 100
    assert (info.root, info.num_classes, info.in_chans, info.img_size, info.native_size) == (
        tmp_path,
        classes,
        3,
        (32, 32),
        (32, 32),
    )
    assert info.classes == tuple(f"class_{i}" for i in range(classes))
    assert (info.mean, info.std) == STATS[name]
    for split, n in (("train", 60 if name == "cifar10" else 12), ("val", 12)):
        ds = build_dataset(info, split)
        images, labels = arrays[split]
        assert len(ds) == n and ds.targets == labels.tolist()
        assert tuple(ds.data.shape) == (n, 32, 32, 3)
        img, label = ds[n - 1]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
        assert np.array_equal(np.asarray(img), images[n - 1]) and label == labels[n - 1]


def test_official_subfolder(tmp_path):
    make_cifar(tmp_path / "cifar-100-python", "cifar100")
    info = dataset_info("cifar100", tmp_path)
    assert info.root == tmp_path / "cifar-100-python"
    assert len(build_dataset(info, "val")) == 12


@pytest.mark.parametrize(
    ("name", "files", "archive"),
    [
        ("cifar10", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta",
         "cifar-10-python.tar.gz"),
        ("cifar100", "train, test, meta", "cifar-100-python.tar.gz"),
    ],
)  # fmt: skip
def test_missing_folder_and_how_to_get(tmp_path, name, files, archive):
    with pytest.raises(DatasetError) as err:
        dataset_info(name, tmp_path / "none")
    msg = str(err.value)
    assert msg.startswith(f"{name}: expected the python batch files {files} in {tmp_path / 'none'} or ")
    assert f"{tmp_path / 'none'} does not exist" in msg and f"{tmp_path / 'none' / SUBDIRS[name]} does not exist" in msg
    assert f"unpack www.cs.toronto.edu/~kriz/{archive} and pass the folder holding {SUBDIRS[name]}" in msg


def test_needs_data_dir():
    with pytest.raises(DatasetError, match="cifar10: expected the python batch files data_batch_1, .* none was given"):
        dataset_info("cifar10")


def test_missing_batch(tmp_path):
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path} lacks data_batch_3;"):
        dataset_info("cifar10", tmp_path)


@pytest.mark.parametrize(
    "corrupt",
    [lambda raw: raw[: len(raw) // 2], lambda raw: b"garbage" + raw, lambda raw: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupt_batch(tmp_path, corrupt):
    make_cifar(tmp_path, "cifar10")
    path = tmp_path / "data_batch_2"
    path.write_bytes(corrupt(path.read_bytes()))
    info = dataset_info("cifar10", tmp_path)
    with pytest.raises(DatasetError, match=f"{path}: not a CIFAR python batch file"):
        build_dataset(info, "train")
    assert len(build_dataset(info, "val")) == 12


def test_corrupt_meta(tmp_path):
    make_cifar(tmp_path, "cifar100")
    (tmp_path / "meta").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'meta'}: not a CIFAR python batch file"):
        dataset_info("cifar100", tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (print, ("a pickle that runs code",))


def test_pickle_cannot_run_code(tmp_path, capsys):
    make_cifar(tmp_path, "cifar10")
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({"data": _RunsCode()}))
    info = dataset_info("cifar10", tmp_path)
    with pytest.raises(DatasetError, match=f"{path}: .*global builtins.print is not allowed"):
        build_dataset(info, "val")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (
            {"labels": [0] * 4, "data": np.zeros((4, 3072), np.float32)},
            r"'data' to be a uint8 array of shape \(N, 3072\), got float32",
        ),
        ({"labels": [0] * 4, "data": np.zeros((4, 1024), np.uint8)}, r"got uint8 \(4, 1024\)"),
        ({"labels": [0] * 4}, "got NoneType"),
        ({"labels": [0] * 3, "data": np.zeros((4, 3072), np.uint8)}, "'labels' to be a list of 4 labels, got 3"),
        ({"data": np.zeros((4, 3072), np.uint8)}, "'labels' to be a list of 4 labels, got NoneType"),
        ({"labels": [0, 1, 10, 2], "data": np.zeros((4, 3072), np.uint8)}, r"labels must be ints in 0..9"),
        ([1, 2, 3], "holds a list, expected a dict"),
    ],
    ids=["float-data", "wrong-width", "no-data", "count-mismatch", "no-labels", "label-range", "not-dict"],
)
def test_bad_batch_content(tmp_path, batch, match):
    make_cifar(tmp_path, "cifar10")
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch))
    info = dataset_info("cifar10", tmp_path)
    with pytest.raises(DatasetError, match=f"{path}: .*{match}"):
        build_dataset(info, "val")


def test_meta_with_wrong_class_count(tmp_path):
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    with pytest.raises(DatasetError, match=r"batches.meta: expected 10 class names under 'label_names'"):
        dataset_info("cifar10", tmp_path)
