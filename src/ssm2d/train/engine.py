"""One training epoch and one evaluation pass, with metrics summed over every process."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import NonFiniteLossError
from .distributed import all_reduce_sum, count_processes

__all__ = ["NonFiniteLossError", "evaluate", "train_one_epoch"]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for amp "auto" / "bf16"; nothing on the CPU unless "bf16" is asked for."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(loader: Iterable, total: int, desc: str, show: bool) -> Any:
    """A tqdm bar on a terminal (main process only); the loader itself otherwise."""
    return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True) if show else loader


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[], None],
    device: torch.device,
    *,
    mixup: Callable | None = None,
    amp: str = "auto",
    clip_grad: float | None = None,
    show_progress: bool = False,
    desc: str = "train",
    epoch: int | None = None,
) -> float:
    """Train for one pass over `loader` (`steps` batches) and return the mean training loss.

    `on_step` is called after every optimizer step (the learning-rate schedule). The mean is
    over all samples of all processes. `epoch` (1-based) is named in the error below.

    Raises:
        NonFiniteLossError: the loss of a batch is NaN or infinite on any process (checked
            before the update, so the model and optimizer still hold the last finite step).
            Every process raises it, with the same message, at the same step.
    """
    model.train()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, samples)
    bar = _progress(loader, steps, desc, show_progress)
    for step, (images, targets) in enumerate(bar):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with autocast(device, amp):
            loss = criterion(model(images), targets)
        value = loss.item()
        # A collective at every step: one process stopping alone would leave the others waiting in
        # the gradient all-reduce until the process group's timeout.
        bad = count_processes(not math.isfinite(value), device)
        if bad:
            where = f"{value}" if not distributed else f"not finite on {bad} of {dist.get_world_size()} processes"
            when = f"epoch {epoch}, step {step + 1} of {steps}" if epoch is not None else f"step {step + 1} of {steps}"
            raise NonFiniteLossError(
                f"training loss is {where} at {when}; stopped before the update. "
                "Lower --lr, set --clip-grad, or check the input data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        on_step()
        total += torch.tensor([value * images.shape[0], images.shape[0]], dtype=torch.float64, device=device)
        if show_progress:
            bar.set_postfix(loss=f"{value:.4f}")
    total = all_reduce_sum(total)
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    device: torch.device,
    *,
    amp: str = "auto",
    show_progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (%) over every sample of every process."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # (loss sum, top-1 hits, top-5 hits, samples)
    for images, targets in _progress(loader, steps, desc, show_progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, k)
        hits = top == targets[:, None]
        total += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=-1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
        ])  # fmt: skip
    total = all_reduce_sum(total)
    if total[3].item() == 0:
        raise ValueError("loader: the evaluation set is empty")
    loss, top1, top5, n = total.tolist()
    return {"loss": loss / n, "acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n}
