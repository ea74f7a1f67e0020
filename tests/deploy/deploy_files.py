"""Files for the deployment tests: PNG images of flat colours with mild noise, and a small
trained checkpoint without any installed data set.

`trained_checkpoint`: `ssm2d train` runs two steps of `vit_mini_28_ssm2d` on an ImageFolder tree
of 28 x 28 PNGs written here (three classes of flat colours), so the checkpoint is the
trainer's own, with the folder names as its class names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssm2d.train import TrainConfig, train

CLASSES = ("blue", "green", "red")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Path:
    """A PNG of `colour` with mild noise, `size` = (W, H)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    data = root / "data"
    for split, count in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(count):
                write_png(data / split / name / f"{i}.png", COLOURS[name], (28, 28), seed=100 * c + i)
    cfg = TrainConfig(
        model="vit_mini_28_ssm2d", dataset="imagefolder", data_dir=str(data), img_size=28, epochs=1, batch_size=6,
        lr=1e-3, warmup_epochs=0, mixup=0, cutmix=0, label_smoothing=0, crop_padding=0, hflip=0, auto_augment=None,
        re_prob=0, repeated_aug=1, drop_path=0, workers=0, device="cpu", output=str(root / "run"),
    )  # fmt: skip
    train(cfg)
    return root / "run" / "last.pt"
