"""Models rebuilt from checkpoints of `ssm2d train`, and their evaluation at any resolution."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.utils.data import DataLoader

from ..data import build_dataset, build_transform, dataset_info
from ..errors import ConfigError
from .checkpoint import load_checkpoint
from .distributed import resolve_device
from .engine import evaluate
from .trainer import build_model

__all__ = ["check_img_size", "evaluate_checkpoint", "load_trained_model"]


def load_trained_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint with its weights (eval mode, CPU), and the checkpoint itself."""
    state = load_checkpoint(path)
    model = build_model(state["config"]["model"], state["model_args"])
    model.load_state_dict(state["model"])
    return model.eval(), state


def check_img_size(model: nn.Module, img_size: int) -> None:
    """Refuse an input size that the model's patch embedding cannot tile.

    Raises:
        ConfigError: `img_size` is not a multiple of the patch size; the message gives the
            nearest valid sizes.
    """
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    step = math.lcm(int(ph), int(pw))
    if img_size % step:
        below, above = img_size // step * step, (img_size // step + 1) * step
        near = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(
            f"--img-size: {img_size} is not a multiple of the model's patch size {ph}x{pw}; valid sizes are the "
            f"multiples of {step}, e.g. {near}"
        )


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    img_size: int | None = None,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
) -> dict[str, Any]:
    """Loss, top-1 and top-5 of a checkpoint's model on a validation set.

    Args:
        path: a `last.pt` or `best.pt` of `ssm2d train`.
        dataset, data_dir: the data set (default: the one the model was trained on).
        img_size: evaluate at this input size (default: the training size); any size the model
            accepts, e.g. another multiple of the patch size for ViT.

    Raises:
        ConfigError: the data set has another number of classes, or the model cannot take `img_size`.
    """
    model, state = load_trained_model(path)
    cfg = state["config"]
    if dataset is None:
        dataset, data_dir = cfg["dataset"], data_dir if data_dir is not None else cfg["data_dir"]
    info = dataset_info(dataset, data_dir)
    num_classes = state["model_args"]["num_classes"]
    if info.num_classes != num_classes:
        raise ConfigError(
            f"dataset: the model has {num_classes} classes, but {dataset} at {info.root} has {info.num_classes}"
        )
    size = img_size if img_size is not None else cfg["img_size"]
    if size is not None:
        check_img_size(model, size)
    val_set = build_dataset(info, "val", build_transform(info, False, size))
    dev = resolve_device(device)
    loader = DataLoader(val_set, batch_size, num_workers=workers)
    metrics = evaluate(model.to(dev), loader, len(loader), dev, amp=cfg["amp"])
    shape = tuple(val_set[0][0].shape)
    return {**metrics, "checkpoint": str(path), "dataset": dataset, "input_size": list(shape), "samples": len(val_set)}
