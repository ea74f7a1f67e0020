"""Checkpoints written atomically, so that a killed run never leaves a half-written file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .io import write_bytes_atomic

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

# Keys every checkpoint of `ssm2d train` holds.
REQUIRED_KEYS = ("config", "epoch", "model")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` to `path` atomically: `path` holds the previous checkpoint or the new
    one, never a partial file, whenever the process is killed."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint of `ssm2d train` onto the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or lacks the keys of a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: expected a file written by `ssm2d train` at {path}, found none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain containers and tensors
    except Exception as err:  # torch raises many types for a corrupt file; all mean the same here
        raise CheckpointError(f"checkpoint: cannot read {path} ({type(err).__name__}: {err})") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} is not a checkpoint of `ssm2d train` (missing {', '.join(missing)})")
    return state
