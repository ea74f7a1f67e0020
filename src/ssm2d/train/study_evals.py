"""Evaluations a study runs at the end of a training run and keeps in the run's record, so that its
report is rendered from the JSON alone: zero-shot accuracy at other input sizes, and the singular
values of the learned 2-D kernels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader

from ..data import build_dataset, build_transform, class_balanced_subset, dataset_info
from ..layers import S4ND, SSM2D
from ..models.retrofit import layer_grids
from ..ops import fold_directions
from .config import TrainConfig
from .distributed import resolve_device
from .engine import evaluate

__all__ = ["kernel_rank", "learned_kernels", "resolution_accuracy", "spectrum_summary"]


def _train_size(cfg: TrainConfig, model_args: dict[str, Any]) -> int:
    size = cfg.img_size if cfg.img_size is not None else model_args["img_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@torch.no_grad()
def resolution_accuracy(
    model: nn.Module, cfg: TrainConfig, model_args: dict[str, Any], sizes: list[int]
) -> list[dict[str, Any]]:
    """Top-1 and loss on the validation set resized to each of `sizes`, without any training there.

    ViT position embeddings are interpolated by timm (`dynamic_img_size`). S4ND layers are run at
    rate = training size / size (their kernels resampled to the new grid, as S4ND's zero-shot
    resolution change does) and, for comparison, also at rate 1 (method "rate 1").

    Returns:
        [{"img_size", "train_size", "method", "acc1", "acc5", "loss"}], by size.
    """
    info = dataset_info(cfg.dataset, cfg.data_dir)
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    s4nd = [m for m in model.modules() if isinstance(m, S4ND)]
    base = _train_size(cfg, model_args)
    results = []
    for size in sizes:
        val_set = build_dataset(info, "val", build_transform(info, False, size))
        if cfg.val_fraction < 1:  # the validation images of training
            val_set = class_balanced_subset(val_set, cfg.val_fraction, 0)
        loader = DataLoader(val_set, cfg.val_batch_size or 2 * cfg.batch_size, num_workers=cfg.workers)
        methods = [("rate change", base / size), ("rate 1", 1.0)] if s4nd else [("interpolated", None)]
        for method, rate in methods:
            for layer in s4nd:
                layer.rate = rate
            metrics = evaluate(model, loader, len(loader), device, amp=cfg.amp)
            results.append({"img_size": size, "train_size": base, "method": method, **metrics})
    for layer in s4nd:
        layer.rate = 1.0
    return results



@torch.no_grad()
def learned_kernels(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Tensor]:
    """The 2-D kernel each `SSM2D` and `S4ND` layer applies at `input_size` (C, H, W), without its skip.

    SSM2D: its directions folded into one (C, 2h-1, 2w-1) kernel; S4ND: the outer product of its
    axis kernels, (G C, 2h-1, 2w-1) (rank 1 per channel by construction).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (SSM2D, S4ND))}
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no SSM2D or S4ND layers, so no learned 2-D kernels")
    grids = layer_grids(model, layers, input_size)
    kernels = {}
    for name, layer in layers.items():
        grid = grids[name]
        if isinstance(layer, SSM2D):
            kernels[name] = fold_directions(layer.kernels(layer.kernel_grid(grid))).float().cpu()
        else:
            kernels[name] = layer.kernel(grid).float().cpu()
    return kernels


def spectrum_summary(kernels: Tensor) -> dict[str, Any]:
    """Singular values of each channel's kernel (C, h, w), summarised.

    effective rank = exp(entropy of s / sum(s)) per channel (1 for a rank-1 kernel, min(h, w) for
    a flat spectrum; Roy & Vetterli 2007); `top1_energy` = s_1^2 / sum s^2; `spectrum` = the mean
    over channels of s / s_1, every singular value.
    """
    s = torch.linalg.svdvals(kernels.double())  # (C, min(h, w)), descending
    total = s.sum(-1, keepdim=True)
    live = total[:, 0] > 0
    s, total = s[live], total[live]
    p = s / total
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    ranks = entropy.exp()
    energy = s.square()
    return {
        "channels": int(kernels.shape[0]), "zero_channels": int((~live).sum()), "kernel_shape": list(kernels.shape[1:]),
        "effective_rank_mean": ranks.mean().item() if len(ranks) else math.nan,
        "effective_rank_std": ranks.std().item() if len(ranks) > 1 else 0.0,
        "effective_rank_min": ranks.min().item() if len(ranks) else math.nan,
        "effective_rank_max": ranks.max().item() if len(ranks) else math.nan,
        "top1_energy_mean": (energy[:, 0] / energy.sum(-1)).mean().item() if len(ranks) else math.nan,
        "spectrum": (s / s[:, :1]).mean(0).tolist() if len(ranks) else [],
    }  # fmt: skip


def kernel_rank(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    """`spectrum_summary` of every SSM2D / S4ND layer of `model` at `input_size` (C, H, W).

    Returns:
        {"layers": [{"name", "type", **summary}], "effective_rank": mean over layers}.
    """
    kernels = learned_kernels(model, input_size)
    types = dict(model.named_modules())
    layers = [{"name": n, "type": type(types[n]).__name__, **spectrum_summary(k)} for n, k in kernels.items()]
    return {"layers": layers, "effective_rank": sum(r["effective_rank_mean"] for r in layers) / len(layers)}
