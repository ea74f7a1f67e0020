"""Heat maps of 2-D kernels, written as PNG with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..errors import ConfigError
from ..layers import SSM2D
from ..models.retrofit import layer_grids
from ..ops import DIRECTION_FLIPS, fold_directions

__all__ = ["layer_kernel_panels", "model_kernel_panels", "save_kernel_heatmaps"]

DIRECTION_NAMES = ("top-left", "bottom-right", "top-right", "bottom-left")


@torch.no_grad()
def layer_kernel_panels(layer: SSM2D, grid: tuple[int, int]) -> dict[str, Tensor]:
    """Kernels of an `SSM2D` on `grid`, drawn as receptive fields.

    Each panel holds the weight on the input at every offset from the output cell: first
    each direction's (C, H, W) kernel (the output sits in the corner opposite its name),
    then the folded (C, 2H-1, 2W-1) kernel that the layer applies (the output at the center).
    """
    kernels = layer.kernels(grid).float().cpu()  # (d, C, H, W)
    panels = {}
    d = len(kernels)
    for name, k, flips in zip(DIRECTION_NAMES[:d], kernels, DIRECTION_FLIPS[:d], strict=True):
        # k(p, q) weighs the input p rows and q columns towards the direction's own corner;
        # grid axes 1, 2 of (B, H, W, C) are kernel axes -2, -1 of (C, H, W).
        panels[f"from {name}"] = k.flip([axis - 3 for axis in (1, 2) if axis not in flips])
    panels["folded"] = fold_directions(kernels).flip(-2, -1)  # now entry (H-1+p, W-1+q) weighs x(i+p, j+q)
    return panels


@torch.no_grad()
def model_kernel_panels(model: nn.Module, input_size: Sequence[int]) -> dict[str, dict[str, Tensor]]:
    """`layer_kernel_panels` of every `SSM2D` in `model`, on the grid each sees at `input_size`.

    Args:
        model: any model holding `SSM2D` modules (registered or retrofitted).
        input_size: (C, H, W) of one input image; one forward of zeros records the grids.

    Returns:
        Module name -> panels, in module order.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SSM2D)}
    if not layers:
        raise ConfigError(f"model: {type(model).__name__} has no 2-D SSM layers, so it has no 2-D kernels to draw")
    grids = layer_grids(model, layers, input_size)
    return {name: layer_kernel_panels(layer, grids[name]) for name, layer in layers.items() if name in grids}


def save_kernel_heatmaps(
    kernels: Mapping[str, Tensor], path: str | Path, channels: int = 6, title: str | None = None
) -> Path:
    """Write one row per entry and one column per channel.

    Args:
        kernels: name -> (C, h, w) real kernels.
        path: PNG file to write (parent folders are created).
        channels: how many channels (the first ones) to show.
        title: figure title.

    Returns:
        The path written.
    """
    if not kernels:
        raise ValueError("kernels: expected at least one (C, h, w) kernel, got none")
    for name, k in kernels.items():
        if k.ndim != 3:
            raise ValueError(f"kernels[{name!r}]: expected shape (C, h, w), got {tuple(k.shape)}")
    cols = min(channels, min(k.shape[0] for k in kernels.values()))
    fig = Figure(figsize=(1.9 * cols + 1.2, 1.9 * len(kernels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kernels), cols, squeeze=False)
    for row, (name, k) in enumerate(kernels.items()):
        for col in range(cols):
            ax = axes[row][col]
            img = k[col].detach().float().cpu()
            limit = float(img.abs().max()) or 1.0
            ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"channel {col}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
