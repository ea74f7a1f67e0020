"""Class predictions for image files, from a checkpoint of `ssm2d train` or its exported ONNX file.

Images are read as the model was trained: grayscale or RGB by its input channels, resized
(shorter side, then a center crop) to its input size, normalized with its data set's statistics;
an image already at that size passes unchanged, exactly as in the training run's evaluation.
The class names come from the checkpoint (stored at training time); a checkpoint without them
gives the class indices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data import DatasetInfo, build_transform, normalization
from ..data.folder import load_rgb
from ..errors import ConfigError, MissingFileError
from ..train.inference import load_trained_model
from .export import checkpoint_input_size, onnx_session

__all__ = ["IMAGE_EXTENSIONS", "checkpoint_transform", "find_images", "format_predictions", "predict_images"]

IMAGE_EXTENSIONS: tuple[str, ...] = IMG_EXTENSIONS  # as ImageFolder reads them: .png, .jpg, .jpeg, ...


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """The image files named by `paths`: files as given, folders walked (sorted) for files with an
    image extension (`IMAGE_EXTENSIONS`, any case); other files in folders are skipped.

    Raises:
        FileNotFoundError: a path does not exist, or no image was found.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise MissingFileError(f"images: {path} does not exist")
    if not found:
        where = ", ".join(map(str, paths))
        raise MissingFileError(f"images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {where}")
    return found


def checkpoint_transform(state: dict[str, Any], size: tuple[int, int] | None = None) -> Callable:
    """The eval transform of a checkpoint's model, for images of any size: PIL image -> (C, H, W).

    Args:
        state: a checkpoint of `ssm2d train` (its config's data set and its model_args).
        size: (H, W) to feed (default: the training input size).
    """
    in_chans, height, width = checkpoint_input_size(state["model_args"])
    size = size or (height, width)
    mean, std = normalization(state["config"]["dataset"])
    # native_size=None: images of any size get the resize-and-center-crop of ImageFolder data,
    # the identity for an image already at `size`.
    info = DatasetInfo(
        name=state["config"]["dataset"], root=Path("."), num_classes=state["model_args"]["num_classes"],
        in_chans=in_chans, img_size=size, mean=mean, std=std, classes=(), native_size=None,
    )  # fmt: skip
    return build_transform(info, False, size)


def _class_names(state: dict[str, Any]) -> list[str]:
    num_classes = state["model_args"]["num_classes"]
    names = state.get("classes")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _onnx_logits(path: str | Path, in_chans: int) -> tuple[Callable[[Tensor], Tensor], tuple[int, int]]:
    session = onnx_session(path)
    shape = session.get_inputs()[0].shape  # [batch, C, H, W]; batch is symbolic
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]) or shape[1] != in_chans:
        raise ConfigError(
            f"onnx: expected an exported model taking (B, {in_chans}, H, W) images as the checkpoint's, "
            f"got input shape {shape}"
        )
    name = session.get_inputs()[0].name
    return (lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])), (shape[2], shape[3])


@torch.no_grad()
def predict_images(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    topk: int = 5,
    onnx: str | Path | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Top-k classes of every image file under `images` (files, or folders to walk).

    Args:
        checkpoint: `best.pt` or `last.pt` of `ssm2d train`: model, transform and class names.
        images: image files and folders (see `find_images`).
        topk: classes per image (at most the number of classes).
        onnx: run this exported file (`ssm2d export`) with onnxruntime instead of the PyTorch
            model; images are resized to its input size.
        batch_size: images per forward pass.

    Returns:
        One {"image": path, "predictions": [{"class": name, "index": i, "probability": p}, ...]}
        per image, in order, most probable first.

    Raises:
        DatasetError: an image cannot be read (the message names the file).
    """
    if topk < 1 or batch_size < 1:
        raise ConfigError(f"topk, batch_size: expected integers >= 1, got {topk} and {batch_size}")
    files = find_images(images)
    model, state = load_trained_model(checkpoint)
    in_chans = checkpoint_input_size(state["model_args"])[0]
    logits_fn, size = (model, None) if onnx is None else _onnx_logits(onnx, in_chans)
    transform = checkpoint_transform(state, size)
    names = _class_names(state)
    k = min(topk, len(names))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = torch.stack([transform(_read(path, in_chans)) for path in chunk])
        probs = torch.softmax(logits_fn(batch).float(), dim=-1)
        top = probs.topk(k, dim=-1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            predictions = [{"class": names[i], "index": i, "probability": p} for p, i in zip(values, indices)]
            results.append({"image": str(path), "predictions": predictions})
    return results


def _read(path: Path, in_chans: int):  # -> PIL.Image.Image
    image = load_rgb(str(path))  # DatasetError naming the file when it is not a readable image
    return image.convert("L") if in_chans == 1 else image


def format_predictions(results: list[dict[str, Any]], as_json: bool = False) -> str:
    """`predict_images` results as text (the image, then one "probability  class" line per class)
    or as one JSON document."""
    if as_json:
        return json.dumps(results, indent=2) + "\n"
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {p['probability']:.4f}  {p['class']}" for p in result["predictions"]]
    return "\n".join(lines) + "\n"
