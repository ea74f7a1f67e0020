"""Parameter-free math: kernel generation and 2-D convolution, each with a `_ref` twin."""

from . import conv2d, fftconv, roesser
from .conv2d import *  # noqa: F403  (re-export; the names are listed in each module's __all__)
from .fftconv import *  # noqa: F403
from .roesser import *  # noqa: F403

__all__ = [*conv2d.__all__, *fftconv.__all__, *roesser.__all__]
