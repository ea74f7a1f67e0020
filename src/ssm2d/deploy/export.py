"""Export a trained model to ONNX or a `torch.export` program, and check the file against PyTorch.

Steps, one function each: `materialize_kernels` (the spatial layers' kernels as constants, see
materialize.py) -> `export_onnx` / `export_program` -> `max_difference` (the file run on a random
batch against the model in eval mode). `export_checkpoint` chains them for a checkpoint of
`ssm2d train`. ONNX goes through PyTorch's `torch.export`-based exporter (`dynamo=True`, which
needs onnxscript) and is checked with onnxruntime: the `export` extra installs all three.

The exported graph takes a batch of any size at the export's input size (in_chans, H, W) only:
the kernels were materialized for that grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..errors import ConfigError, MissingFileError
from ..train.inference import load_trained_model
from .materialize import ExportError, materialize_kernels

__all__ = [
    "FORMATS",
    "MIN_OPSET",
    "ExportResult",
    "checkpoint_input_size",
    "export_checkpoint",
    "export_onnx",
    "export_program",
    "max_difference",
    "onnx_session",
]

FORMATS = ("onnx", "torch-export")
MIN_OPSET = 17
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass(frozen=True)
class ExportResult:
    """What `export_checkpoint` wrote and how closely the file reproduces the model."""

    path: Path
    format: str
    input_size: tuple[int, int, int]
    max_abs_diff: float
    tolerance: float


def _batch_dim() -> dict[str, dict[int, torch.export.Dim]]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}


def _traced_example(example: Tensor) -> Tensor:
    """The example to trace: a batch of 1 repeated to 2, since torch.export specializes a
    dimension of size 1 (the program would then refuse every other batch size)."""
    return example.expand(2, *example.shape[1:]) if example.shape[0] == 1 else example


def export_onnx(model: nn.Module, example: Tensor, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` (exportable operators only, e.g. after `materialize_kernels`) as ONNX.

    Args:
        model: in eval mode.
        example: (B, in_chans, H, W); the file takes any batch size B at this (H, W).
        path: the .onnx file, overwritten.
        opset: ONNX opset, at least 17.

    Returns:
        The path written. Input "images" (B, in_chans, H, W) float32, output "logits" (B, classes).
    """
    if opset < MIN_OPSET:
        raise ConfigError(f"opset: expected an ONNX opset >= {MIN_OPSET}, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter logs every stage and onnxscript's optimizer warns about each fused pattern.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            model, (_traced_example(example),), dynamo=True, opset_version=opset, dynamic_shapes=_batch_dim(),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False, verbose=False,
        )  # fmt: skip
        program.save(str(path))
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return path


def export_program(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Write `model` as a `torch.export` program (.pt2) taking any batch size at the example's (H, W).

    Load it with `torch.export.load(path).module()`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model, (_traced_example(example),), dynamic_shapes=_batch_dim())
    torch.export.save(program, str(path))
    return path


def onnx_session(path: str | Path):  # -> onnxruntime.InferenceSession
    """An onnxruntime CPU session for `path`; a missing onnxruntime names the extra to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("onnxruntime: not installed; install the export extra: pip install 'ssm2d[export]'") from err
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"onnx: expected an ONNX file at {path}, found none")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    # Idle worker threads sleep instead of spinning, so that they do not take the cores from
    # whatever runs between two calls (PyTorch, in a comparison).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def max_difference(path: str | Path, fmt: str, model: nn.Module, x: Tensor) -> float:
    """Largest |file(x) - model(x)| over the logits: the file run by onnxruntime (onnx) or
    `torch.export.load` (torch-export), `model` in eval mode."""
    expected = model.eval()(x)
    if fmt == "onnx":
        session = onnx_session(path)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    elif fmt == "torch-export":
        got = torch.export.load(str(path)).module()(x)
    else:
        raise ConfigError(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if got.shape != expected.shape:
        raise ExportError(f"{path}: returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max()) if got.numel() else 0.0


def checkpoint_input_size(model_args: dict, img_size: int | None = None) -> tuple[int, int, int]:
    """(in_chans, H, W) of a checkpoint's model: its training size, or `img_size` x `img_size`."""
    if img_size is not None:
        if img_size < 1:
            raise ConfigError(f"img_size: expected an integer >= 1, got {img_size}")
        size = (img_size, img_size)
    else:
        trained = model_args.get("img_size", 224)
        size = tuple(trained) if isinstance(trained, (list, tuple)) else (trained, trained)
    return (int(model_args.get("in_chans", 3)), int(size[0]), int(size[1]))


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    img_size: int | None = None,
    fmt: Literal["onnx", "torch-export"] = "onnx",
    batch: int = 4,
    tolerance: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ExportResult:
    """Export a checkpoint of `ssm2d train` and check the file against the model in eval mode.

    Args:
        checkpoint: `last.pt` or `best.pt`.
        output: the file to write (.onnx or .pt2).
        img_size: export input size (default: the training size); the kernels are materialized for it.
        fmt: "onnx" or "torch-export".
        batch: size of the random (normal) check batch.
        tolerance: the largest allowed absolute difference of the logits.
        opset: ONNX opset (>= 17).
        seed: seeds the check batch.

    Raises:
        ExportError: a layer cannot be exported, or the file differs from PyTorch by more than
            `tolerance` (the file is kept for inspection).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    model, state = load_trained_model(checkpoint)
    size = checkpoint_input_size(state["model_args"], img_size)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *size, generator=generator)
    frozen = materialize_kernels(model, example)
    path = export_onnx(frozen, example, output, opset) if fmt == "onnx" else export_program(frozen, example, output)
    x = torch.randn(batch, *size, generator=generator)
    diff = max_difference(path, fmt, model, x)
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(
            f"{path}: the exported model differs from PyTorch by up to {diff:.3g} on a random batch "
            f"(tolerance {tolerance:g}); the file is kept for inspection"
        )
    return ExportResult(path=path, format=fmt, input_size=size, max_abs_diff=diff, tolerance=tolerance)
