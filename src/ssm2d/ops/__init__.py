"""Parameter-free math: kernel generation and 2-D convolution, each with a `_ref` twin."""

from . import conv2d, roesser
from .conv2d import *  # noqa: F403  (re-export; the names are listed in conv2d.__all__)
from .roesser import *  # noqa: F403

__all__ = [*conv2d.__all__, *roesser.__all__]
