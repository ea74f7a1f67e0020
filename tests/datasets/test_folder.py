"""ImageFolder trees (own data, ImageNet-100) and Tiny-ImageNet's validation layout."""

from __future__ import annotations

import shutil

import pytest
from dataset_files import make_folder
from PIL import Image

from ssm2d.data import DatasetError, build_dataset, build_transform, dataset_info

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_loads_tree(tmp_path):
    make_folder(tmp_path, classes=("eel", "cat", "dog"), per_class=(3, 2))
    info = dataset_info("imagefolder", tmp_path)
    assert (info.root, info.num_classes, info.in_chans, info.classes) == (tmp_path, 3, 3, ("cat", "dog", "eel"))
    assert info.img_size == (224, 224) and info.native_size is None
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    train, val = build_dataset(info, "train"), build_dataset(info, "val")
    assert train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and val.targets == [0, 0, 1, 1, 2, 2]
    img, label = val[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 2  # grayscale files come as RGB
    assert {train[i][0].size for i in range(len(train))} == {(40, 30), (25, 50), (64, 64)}


def test_img_size_and_transform(tmp_path):
    make_folder(tmp_path)
    info = dataset_info("imagefolder", tmp_path, img_size=(24, 20))
    assert info.img_size == (24, 20)
    val = build_dataset(info, "val", build_transform(info, train=False))
    train = build_dataset(info, "train", build_transform(info, train=True, hflip=0.5, re_prob=0.5))
    for ds in (val, train):
        assert {tuple(ds[i][0].shape) for i in range(len(ds))} == {(3, 24, 20)}


def test_tiny_imagenet_layout(tmp_path):
    """train/<wnid>/images/*.JPEG, and val/images/* listed in val/val_annotations.txt."""
    make_folder(tmp_path, classes=("n01", "n02"), per_class=(2, 2))
    for wnid in ("n01", "n02"):  # nest the training images one folder deeper, as Tiny-ImageNet does
        folder = tmp_path / "train" / wnid
        (folder / "images").mkdir()
        for file in list(folder.glob("*.*")):
            file.rename(folder / "images" / file.name)
        (folder / f"{wnid}_boxes.txt").write_text("ignored\t0\t0\t1\t1\n")
    val = tmp_path / "val"
    (val / "images").mkdir()
    lines = []
    for i, wnid in enumerate(["n02", "n01", "n02"]):
        shutil.copy(next((tmp_path / "train" / wnid / "images").glob("*.jpg")), val / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    shutil.rmtree(val / "n01")
    shutil.rmtree(val / "n02")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    info = dataset_info("imagefolder", tmp_path, img_size=64)
    assert info.classes == ("n01", "n02")
    assert build_dataset(info, "train").targets == [0, 0, 1, 1]
    ds = build_dataset(info, "val")
    assert ds.targets == [1, 0, 1] and ds.classes == ["n01", "n02"]
    assert ds[0][0].mode == "RGB" and ds[0][1] == 1

    (val / "val_annotations.txt").write_text("\n".join(lines + ["val_9.JPEG\tn01\t0\t0\t1\t1"]))
    with pytest.raises(DatasetError, match="lists val_9.JPEG, but .*val_9.JPEG does not exist"):
        build_dataset(info, "val")
    (val / "val_annotations.txt").write_text("\n".join(lines + ["val_1.JPEG\tn03\t0\t0\t1\t1"]))
    with pytest.raises(DatasetError, match=r"only in train \[\] \(0\), only in val \['n03'\] \(1\)"):
        dataset_info("imagefolder", tmp_path)
    (val / "val_annotations.txt").write_text("val_0.JPEG n01\n")
    with pytest.raises(DatasetError, match=r"val_annotations.txt, line 1: expected 'file<TAB>class...'"):
        dataset_info("imagefolder", tmp_path)


def test_needs_data_dir():
    with pytest.raises(
        DatasetError, match="imagefolder: expected a data_dir holding train/ and val/, but none was given"
    ):
        dataset_info("imagefolder")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tmp_path, split):
    make_folder(tmp_path)
    shutil.rmtree(tmp_path / split)
    with pytest.raises(DatasetError) as err:
        dataset_info("imagefolder", tmp_path)
    assert str(err.value).startswith(f"imagefolder: expected the folder {tmp_path / split}, but it does not exist; ")
    assert "data_dir/train/<class>/<image>" in str(err.value)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=f"one folder per class in {tmp_path / 'train'}, found none"):
        dataset_info("imagefolder", tmp_path)


def test_class_mismatch(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"))
    shutil.rmtree(tmp_path / "val" / "c")
    (tmp_path / "val" / "z").mkdir()
    with pytest.raises(
        DatasetError,
        match=r"the classes of .*train and .*val differ: only in train \['c'\] \(1\), only in val \['z'\] \(1\)",
    ):
        dataset_info("imagefolder", tmp_path)


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    for file in (tmp_path / "val" / "b").iterdir():
        file.unlink()
    info = dataset_info("imagefolder", tmp_path)
    assert len(build_dataset(info, "train")) == 6
    with pytest.raises(DatasetError, match=f"imagefolder: {tmp_path / 'val'}: Found no valid file for the classes b"):
        build_dataset(info, "val")


def test_unreadable_image(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "dog_0.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = build_dataset(dataset_info("imagefolder", tmp_path), "train")
    with pytest.raises(DatasetError, match=f"{bad}: cannot be read as an image"):
        ds[ds.targets.index(1)]


def test_classes_changed_after_info(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    info = dataset_info("imagefolder", tmp_path)
    shutil.copytree(tmp_path / "train" / "b", tmp_path / "train" / "c")
    with pytest.raises(DatasetError, match="changed since the data set was opened"):
        build_dataset(info, "train")
