"""Parameter-free math: kernel generation and 2-D convolution, each with a `_ref` twin."""

from . import causal_conv1d as _causal_conv1d  # the star import below rebinds `causal_conv1d` to the op
from . import conv2d, fftconv, roesser, s4d, selective_scan as _selective_scan
from . import step_sizes as _step_sizes  # the star import below rebinds `step_sizes` to the op
from . import cross_scan as _cross_scan  # the star import below rebinds `cross_scan` to the op
from . import ema as _ema  # the star import below rebinds `ema` to the op
from . import sp_attention as _sp_attention  # the star import below rebinds `sp_attention` to the op
from .causal_conv1d import *  # noqa: F403  (re-export; the names are listed in each module's __all__)
from .conv2d import *  # noqa: F403
from .cross_scan import *  # noqa: F403
from .ema import *  # noqa: F403
from .fftconv import *  # noqa: F403
from .roesser import *  # noqa: F403
from .s4d import *  # noqa: F403
from .selective_scan import *  # noqa: F403
from .sp_attention import *  # noqa: F403
from .step_sizes import *  # noqa: F403

__all__ = [*conv2d.__all__, *fftconv.__all__, *roesser.__all__, *s4d.__all__, *_sp_attention.__all__,
           *_causal_conv1d.__all__, *_selective_scan.__all__, *_ema.__all__, *_cross_scan.__all__,
           *_step_sizes.__all__]
