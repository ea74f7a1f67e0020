"""A depthwise convolution as a 2-D spatial layer: the control for the learned global kernels.

It puts a plain local, per-channel k x k convolution where the 2-D SSM goes, so that a study can
tell what the 2-D SSM adds beyond any depthwise spatial mixing (ConvNeXt's 7 x 7 is the default).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checks import check_grid_input, check_positive_ints

__all__ = ["DWConv2d"]


class DWConv2d(nn.Module):
    """y = depthwise_conv_k(x) + bias, zero-padded to the same H x W ("same" padding).

    Input and output are (B, H, W, C), any H x W (grids smaller than the kernel see zeros).

    Args:
        dim: channels C.
        kernel_size: odd k, the kernel spans k x k cells centered on the output cell.
        bias: a per-channel bias.
    """

    def __init__(self, dim: int, kernel_size: int = 7, bias: bool = True) -> None:
        super().__init__()
        check_positive_ints(dim=dim, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd integer (a centered kernel), got {kernel_size}")
        self.dim, self.kernel_size = dim, kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: center tap 1, every other tap and the bias 0."""
        self.conv.weight.zero_()[:, 0, self.kernel_size // 2, self.kernel_size // 2] = 1.0
        if self.conv.bias is not None:
            self.conv.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        w = self.conv.weight.to(x.dtype)
        b = None if self.conv.bias is None else self.conv.bias.to(x.dtype)
        y = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=self.kernel_size // 2, groups=self.dim)
        return y.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"
