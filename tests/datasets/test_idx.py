"""Fashion-MNIST / MNIST from synthetic IDX files: decoding, folder layouts and every error."""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pytest
import torch
from dataset_files import make_idx, write_idx
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from ssm2d.data import DatasetError, build_dataset, dataset_info
from ssm2d.data import idx as idx_module
from ssm2d.data.idx import IDX_FILES, read_idx, read_idx_shape


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_loads_images_and_labels(tmp_path, name, gz):
    arrays = make_idx(tmp_path, n_train=30, n_val=20, gz=gz)
    info = dataset_info(name, tmp_path)
    assert (info.name, info.root, info.num_classes, info.in_chans) == (name, tmp_path, 10, 1)
    assert info.img_size == info.native_size == (28, 28)
    assert len(info.classes) == 10 and info.classes[0] == ("T-shirt/top" if name == "fashion_mnist" else "0")
    expected_stats = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}[name]
    assert (info.mean, info.std) == expected_stats
    for split, n in (("train", 30), ("val", 20)):
        ds = build_dataset(info, split)
        images, labels = arrays[split]
        assert len(ds) == n and ds.targets == labels.tolist()
        assert all(type(t) is int for t in ds.targets)
        assert torch.equal(ds.data, torch.from_numpy(images))
        img, label = ds[7]
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), images[7]) and label == labels[7]


def test_transform_is_applied(tmp_path):
    make_idx(tmp_path)
    ds = build_dataset(dataset_info("mnist", tmp_path), "val", transform=lambda img: np.asarray(img).sum())
    assert ds[3][0] == int(ds.data[3].sum())


def test_matches_torchvision_reader(tmp_path):
    """An independent decoder (torchvision's) reads the same arrays from the same files."""
    make_idx(tmp_path, gz=False, size=(5, 7))
    images_path, labels_path = (tmp_path / name for name in IDX_FILES["train"])
    assert torch.equal(read_idx(images_path, 3), read_image_file(str(images_path)))
    assert torch.equal(read_idx(labels_path, 1), read_label_file(str(labels_path)))
    assert read_idx_shape(images_path, 3) == (30, 5, 7)


def test_non_square_images(tmp_path):
    make_idx(tmp_path, size=(9, 5))
    info = dataset_info("mnist", tmp_path)
    assert info.native_size == info.img_size == (9, 5)
    assert build_dataset(info, "train")[0][0].size == (5, 9)  # PIL: (W, H)


def test_img_size_override(tmp_path):
    make_idx(tmp_path)
    info = dataset_info("fashion_mnist", tmp_path, img_size=32)
    assert info.img_size == (32, 32) and info.native_size == (28, 28)
    assert dataset_info("fashion_mnist", tmp_path, img_size=(30, 36)).img_size == (30, 36)
    for bad in (0, (28,), (28, 28, 1), 2.5, (28, -1)):
        with pytest.raises(ValueError, match="img_size"):
            dataset_info("fashion_mnist", tmp_path, img_size=bad)


@pytest.mark.parametrize(("name", "sub"), [("fashion_mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_layout(tmp_path, name, sub):
    make_idx(tmp_path / sub / "raw")
    info = dataset_info(name, str(tmp_path))  # str accepted
    assert info.root == tmp_path / sub / "raw"
    assert len(build_dataset(info, "train")) == 30


def test_plain_file_preferred_over_gz(tmp_path):
    make_idx(tmp_path, n_train=30, gz=True)
    make_idx(tmp_path, n_train=12, gz=False)  # torchvision keeps both after extracting
    assert len(build_dataset(dataset_info("mnist", tmp_path), "train")) == 12


def test_default_folder_without_data_dir(tmp_path, monkeypatch):
    make_idx(tmp_path / "debian")
    spec = dataclasses.replace(idx_module._SETS["fashion_mnist"], default_dir=tmp_path / "debian")
    monkeypatch.setitem(idx_module._SETS, "fashion_mnist", spec)
    assert dataset_info("fashion_mnist").root == tmp_path / "debian"
    # An explicit data_dir is used, not the default folder.
    with pytest.raises(DatasetError, match="does not exist"):
        dataset_info("fashion_mnist", tmp_path / "elsewhere")


def test_missing_default_folder(tmp_path, monkeypatch):
    spec = dataclasses.replace(idx_module._SETS["fashion_mnist"], default_dir=tmp_path / "absent")
    monkeypatch.setitem(idx_module._SETS, "fashion_mnist", spec)
    with pytest.raises(DatasetError) as err:
        dataset_info("fashion_mnist")
    msg = str(err.value)
    assert f"{tmp_path / 'absent'} does not exist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg


def test_mnist_needs_data_dir():
    with pytest.raises(DatasetError, match="mnist: expected the IDX files .* none was given; copy the four files"):
        dataset_info("mnist")


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError) as err:
        dataset_info("fashion_mnist", tmp_path / "nowhere")
    msg = str(err.value)
    assert f"{tmp_path / 'nowhere'} does not exist" in msg
    assert f"{tmp_path / 'nowhere' / 'FashionMNIST' / 'raw'} does not exist" in msg
    assert "t10k-labels-idx1-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_missing_file(tmp_path):
    make_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path} lacks t10k-labels-idx1-ubyte;"):
        dataset_info("mnist", tmp_path)


def test_file_removed_after_info(tmp_path):
    make_idx(tmp_path)
    info = dataset_info("mnist", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="lacks train-images-idx3-ubyte"):
        build_dataset(info, "train")


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_truncated_data(tmp_path, gz):
    make_idx(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = raw[:-100]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    info = dataset_info("mnist", tmp_path)  # the header is intact
    with pytest.raises(
        DatasetError,
        match=f"{path}: truncated: the header declares 30x28x28 = 23520 bytes of data, the file holds 23420",
    ):
        build_dataset(info, "train")
    assert len(build_dataset(info, "val")) == 20  # the other split still loads


def test_trailing_bytes(tmp_path):
    make_idx(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=f"{path}: trailing bytes"):
        build_dataset(dataset_info("mnist", tmp_path), "val")


def test_truncated_gzip_stream(tmp_path):
    make_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])  # the gzip stream itself is cut
    info = dataset_info("mnist", tmp_path)
    with pytest.raises(DatasetError, match=f"{path}: cannot be read"):
        build_dataset(info, "train")


def test_not_gzip(tmp_path):
    make_idx(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match=f"{path}: cannot be read"):
        dataset_info("mnist", tmp_path)


def test_corrupt_gzip_crc(tmp_path):
    make_idx(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the CRC32 of the trailer
    path.write_bytes(bytes(raw))
    info = dataset_info("mnist", tmp_path)
    with pytest.raises(DatasetError, match=f"{path}: cannot be read"):
        build_dataset(info, "train")


@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"\x00\x00\x08\x01", "00000801"),
        (b"\x00\x00\x0d\x03", "00000d03"),
        (b"\x12\x34\x56\x78", "12345678"),
        (b"", "missing"),
    ],
    ids=["wrong-ndim", "float-type", "garbage", "empty"],
)
def test_bad_magic(tmp_path, header, what):
    make_idx(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(header + path.read_bytes()[4:] if header else b"")
    with pytest.raises(DatasetError) as err:
        dataset_info("mnist", tmp_path)
    assert str(err.value) == (f"{path}: not an IDX file of 3-D unsigned bytes: magic number {what}, expected 00000803")


def test_truncated_header(tmp_path):
    make_idx(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DatasetError, match=f"{path}: truncated IDX header"):
        dataset_info("mnist", tmp_path)


def test_count_mismatch(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(
        DatasetError,
        match="train-images-idx3-ubyte.gz holds 30 images but .*train-labels-idx1-ubyte.gz holds 29 labels",
    ):
        dataset_info("mnist", tmp_path)


def test_size_mismatch_between_splits(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(
        DatasetError, match="t10k-images-idx3-ubyte.gz: images are 28x27, those of the train split 28x28"
    ):
        dataset_info("mnist", tmp_path)


def test_label_out_of_range(tmp_path):
    make_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8))
    info = dataset_info("mnist", tmp_path)
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: labels must lie in 0..9, found 10"):
        build_dataset(info, "val")


def test_unreadable_file(tmp_path):
    make_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.unlink()
    path.mkdir()  # a folder where the file should be: not counted as present
    with pytest.raises(DatasetError, match="lacks train-images-idx3-ubyte"):
        dataset_info("mnist", tmp_path)
