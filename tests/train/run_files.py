"""Synthetic Fashion-MNIST files and helpers shared by the training, CLI and DDP tests.

A plain module, not a conftest.py (see tests/datasets/dataset_files.py). The data set is
written by the tests, so that they never depend on Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "datasets"))
from dataset_files import IDX_NAMES, write_idx  # noqa: E402

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")
# A short deterministic recipe: no augmentation, batch 50 on 600 of the 1,200 training images.
SMALL = ["--train-fraction", "0.5", "--batch-size", "50", "--warmup-epochs", "0.5", "--workers", "0",
         "--crop-padding", "0", "--hflip", "0"]  # fmt: skip
N_TRAIN, N_VAL = 1200, 200


def make_learnable_idx(folder: Path, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """The four IDX files of a 10-class, 28 x 28 set that a tiny ViT learns within an epoch:
    noise in [0, 100) plus a bright 7 x 7 square at one of 10 cells of a 3 x 4 layout, the cell
    given by the class. Returns `folder`."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 100, size=(n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 4)
            images[i, 7 * row + 3 : 7 * row + 10, 7 * col : 7 * col + 7] += 150
        images_name, labels_name = IDX_NAMES[split]
        write_idx(folder / (images_name + ".gz"), images)
        write_idx(folder / (labels_name + ".gz"), labels)
    return folder


def read_rows(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_metrics(a: list[dict], b: list[dict], rtol: float, acc_atol: float = 0.0) -> None:
    """Losses and learning rates within `rtol`; accuracies (%) within `acc_atol`."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert math.isclose(ra[key], rb[key], rel_tol=rtol, abs_tol=1e-9), f"epoch {ra['epoch']} {key}: {ra} vs {rb}"
        for key in ("val_acc1", "val_acc5"):
            assert abs(ra[key] - rb[key]) <= acc_atol + 1e-9, f"epoch {ra['epoch']} {key}: {ra} vs {rb}"


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m ssm2d` child: this checkout's sources, no hub access."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
