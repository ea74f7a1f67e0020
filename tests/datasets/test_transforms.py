"""Train and eval transforms on grayscale and RGB images, with every augmentation option."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from ssm2d.data import DatasetInfo, build_transform
from ssm2d.data.transforms import _posterize

GRAY = DatasetInfo(
    name="fashion_mnist", root=Path("."), num_classes=10, in_chans=1, img_size=(28, 28), mean=(0.2860,),
    std=(0.3530,), classes=tuple("abcdefghij"), native_size=(28, 28),
)  # fmt: skip
RGB = DatasetInfo(
    name="cifar10", root=Path("."), num_classes=10, in_chans=3, img_size=(32, 32), mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616), classes=tuple("abcdefghij"), native_size=(32, 32),
)  # fmt: skip
FOLDER = DatasetInfo(
    name="imagefolder", root=Path("."), num_classes=3, in_chans=3, img_size=(24, 20), mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225), classes=("a", "b", "c"),
)  # fmt: skip
AUTO_AUGMENT = [
    None, "imagenet", "cifar10", "svhn",
    "rand-m9-mstd0.5-inc1", "rand-m9-n3-mstd1", "rand-m10-n15-inc1", "rand-m10-mmax15-mstd2-inc1",
    "augmix-m5-w4-d2", "augmix-m10-w3", "original-mstd0.5", "originalr", "v0", "v0r", "3a",
]  # fmt: skip


def random_image(info: DatasetInfo, size=None) -> Image.Image:
    h, w = size or info.native_size
    shape = (h, w) if info.in_chans == 1 else (h, w, 3)
    return Image.fromarray(np.random.default_rng(h * w).integers(0, 256, shape, dtype=np.uint8))


def normalized(img: Image.Image, info: DatasetInfo) -> torch.Tensor:
    """(C, H, W) oracle of ToTensor + Normalize, written out."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).reshape(img.size[1], img.size[0], -1)
    return ((x - torch.tensor(info.mean)) / torch.tensor(info.std)).permute(2, 0, 1)


@pytest.mark.parametrize("info", [GRAY, RGB], ids=["gray", "rgb"])
def test_eval_is_to_tensor_and_normalize(info):
    tf = build_transform(info, train=False)
    assert [type(t) for t in tf.transforms] == [T.ToTensor, T.Normalize]
    img = random_image(info)
    torch.testing.assert_close(tf(img), normalized(img, info), rtol=1e-6, atol=1e-6)
    # The same size given explicitly adds no resize.
    assert [type(t) for t in build_transform(info, False, img_size=info.native_size).transforms] == [
        T.ToTensor,
        T.Normalize,
    ]


@pytest.mark.parametrize("info", [GRAY, RGB], ids=["gray", "rgb"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_eval_resizes_when_size_differs(info, interpolation):
    tf = build_transform(info, train=False, img_size=(40, 36), interpolation=interpolation)
    resize = tf.transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == (40, 36) and resize.interpolation.value == interpolation
    assert tuple(tf(random_image(info)).shape) == (info.in_chans, 40, 36)
    info_32 = DatasetInfo(**{**vars(info), "img_size": (40, 36)})  # dataset_info(..., img_size=...) does this
    assert tuple(build_transform(info_32, train=False)(random_image(info)).shape) == (info.in_chans, 40, 36)


def test_eval_imagefolder_keeps_aspect_ratio():
    tf = build_transform(FOLDER, train=False)
    assert [type(t) for t in tf.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    for size in [(50, 30), (30, 50), (24, 20), (7, 9)]:
        assert tuple(tf(random_image(FOLDER, size)).shape) == (3, 24, 20)
    # A 2:1 image becomes 24 rows: the shorter side goes to max(24, 20); the center crop keeps 20 columns.
    img = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8), (48, 1)).repeat(3).reshape(48, 96, 3))
    out = tf(img)[0] * FOLDER.std[0] + FOLDER.mean[0]
    assert abs(out[:, 10].mean().item() * 255 - 47.5) < 2  # center column of the 0..95 ramp


@pytest.mark.parametrize("auto_augment", AUTO_AUGMENT, ids=str)
@pytest.mark.parametrize("info", [GRAY, RGB, FOLDER], ids=["gray", "rgb", "folder"])
def test_train_every_option(info, auto_augment):
    random.seed(0)
    np.random.seed(0)
    for padding in (0, 4):
        tf = build_transform(info, True, crop_padding=padding, hflip=0.5, auto_augment=auto_augment, re_prob=0.5)
        h, w = info.img_size
        for i in range(25):
            x = tf(random_image(info, (h + i % 3, w + 2 * (i % 2)) if info is FOLDER else None))
            assert tuple(x.shape) == (info.in_chans, h, w) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_train_at_other_size():
    tf = build_transform(
        GRAY, True, img_size=32, crop_padding=4, hflip=0.5, auto_augment="rand-m9-mstd0.5", re_prob=0.25
    )
    assert [type(t).__name__ for t in tf.transforms] == [
        "Resize", "RandomCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize", "RandomErasing"
    ]  # fmt: skip
    assert tf.transforms[1].size == (32, 32) and tf.transforms[1].padding == 4
    assert tuple(tf(random_image(GRAY)).shape) == (1, 32, 32)


def test_imagefolder_train_crops():
    assert type(build_transform(FOLDER, True).transforms[0]) is T.RandomResizedCrop
    crops = build_transform(FOLDER, True, crop_padding=4).transforms
    assert [type(t) for t in crops[:3]] == [T.Resize, T.CenterCrop, T.RandomCrop]


@pytest.mark.parametrize("info", [GRAY, RGB], ids=["gray", "rgb"])
def test_fill_values_follow_the_mean(info):
    fill = [round(255 * m) for m in info.mean]  # [73] for Fashion-MNIST
    assert build_transform(info, True, auto_augment="cifar10").transforms[0].fill == fill
    for spec in ("rand-m9", "augmix-m5", "original"):
        augment = build_transform(info, True, auto_augment=spec).transforms[0]
        ops = augment.ops if hasattr(augment, "ops") else [op for sub in augment.policy for op in sub]
        assert {op.kwargs["fillcolor"] for op in ops} == {fill[0] if info.in_chans == 1 else tuple(fill)}


def test_crop_padding_fills_zeros():
    torch.manual_seed(0)
    tf = build_transform(GRAY, True, crop_padding=4)
    white = Image.new("L", (28, 28), 255)
    zero = (0 - GRAY.mean[0]) / GRAY.std[0]
    outs = torch.stack([tf(white) for _ in range(20)])
    assert torch.isclose(outs, torch.tensor(zero)).any()  # some padding came in
    assert torch.isclose(outs, torch.tensor((1 - GRAY.mean[0]) / GRAY.std[0])).float().mean() > 0.5


@pytest.mark.parametrize("info", [GRAY, RGB], ids=["gray", "rgb"])
def test_hflip(info):
    img = random_image(info)
    flipped = build_transform(info, True, hflip=1.0)(img)
    torch.testing.assert_close(flipped, build_transform(info, False)(img).flip(-1))


@pytest.mark.parametrize("re_mode", ["pixel", "rand", "const"])
def test_random_erasing(re_mode):
    torch.manual_seed(0)
    img = random_image(GRAY)
    erased = build_transform(GRAY, True, re_prob=1.0, re_mode=re_mode)(img)
    clean = build_transform(GRAY, False)(img)
    changed = (erased != clean).float().mean().item()
    assert 0.0 < changed < 0.5, changed  # one rectangle of 2 % .. 33 % of the area
    if re_mode == "const":
        assert set(erased[erased != clean].tolist()) == {0.0}


def test_posterize_stand_in():
    img = random_image(RGB)
    assert _posterize(img, 8) is img
    assert np.array_equal(np.asarray(_posterize(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    for bits in (0, -2):  # timm's strongest magnitudes; Pillow rejects them
        out = _posterize(img, bits, fillcolor=(1, 2, 3))
        assert out.mode == img.mode and out.size == img.size and not np.asarray(out).any()
    for spec in ("rand-m9-inc1", "augmix-m5", "v0"):
        augment = build_transform(GRAY, True, auto_augment=spec).transforms[0]
        ops = augment.ops if hasattr(augment, "ops") else [op for sub in augment.policy for op in sub]
        posterize = [op for op in ops if op.name.startswith("Posterize")]
        assert posterize and all(op.aug_fn is _posterize for op in posterize)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(train=False, hflip=0.5, re_prob=0.1), r"hflip, re_prob: augmentation applies to train=True only"),
        (dict(train=False, crop_padding=4), "crop_padding: augmentation applies to train=True only"),
        (dict(train=False, auto_augment="cifar10"), "auto_augment: augmentation applies to train=True only"),
        (dict(train=True, interpolation="lanczos"), "interpolation: expected one of bicubic, bilinear, nearest"),
        (dict(train=True, crop_padding=-1), "crop_padding: expected an int >= 0, got -1"),
        (dict(train=True, crop_padding=2.0), "crop_padding: expected an int >= 0, got 2.0"),
        (dict(train=True, hflip=1.5), r"hflip: expected a probability in \[0, 1\], got 1.5"),
        (dict(train=True, re_prob=-0.1), r"re_prob: expected a probability in \[0, 1\]"),
        (dict(train=True, re_mode="noise"), "re_mode: expected one of pixel, rand, const, got 'noise'"),
        (
            dict(train=True, auto_augment="autoaugment"),
            "auto_augment: expected torchvision's AutoAugment policy imagenet",
        ),
        (dict(train=True, auto_augment="rand-m9-zz1"), "auto_augment: 'rand-m9-zz1' is not a valid timm augmentation"),
        (dict(train=True, auto_augment="augmix-q3"), "auto_augment: 'augmix-q3' is not a valid timm augmentation"),
        (dict(train=True, img_size=0), "img_size: expected a positive int"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_transform(GRAY, **kwargs)


def test_unknown_keyword():
    with pytest.raises(TypeError):
        build_transform(GRAY, True, h_flip=0.5)
