"""Parameter-free math: kernel generation and 2-D convolution, each with a `_ref` twin."""

from .conv2d import (
    DIRECTION_FLIPS,
    choose_conv_method,
    direct_conv2d,
    directional_conv2d,
    directional_conv2d_ref,
    fft_conv2d,
    fft_shape,
    fold_directions,
    kernel_spectrum,
)
from .roesser import roesser_kernel, roesser_kernel_ref

__all__ = [
    "DIRECTION_FLIPS",
    "choose_conv_method",
    "direct_conv2d",
    "directional_conv2d",
    "directional_conv2d_ref",
    "fft_conv2d",
    "fft_shape",
    "fold_directions",
    "kernel_spectrum",
    "roesser_kernel",
    "roesser_kernel_ref",
]
