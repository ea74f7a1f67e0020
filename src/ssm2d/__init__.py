"""ssm2d: 2-D spatial layers for vision models, exact and fast in pure PyTorch."""

from . import layers, models, ops
from .layers import (
    S4ND,
    SS2D,
    SSM2D,
    V2M,
    MegaEMA,
    MovingAverageGatedAttention,
    SPAttention,
    VimMixer,
    VimMixer2d,
    apply_on_tokens,
)
from .models import add_spatial_layers, create_model, list_models
from .optim import param_groups

__version__ = "0.1.0"

__all__ = [
    "MegaEMA",
    "MovingAverageGatedAttention",
    "S4ND",
    "SPAttention",
    "SS2D",
    "SSM2D",
    "V2M",
    "VimMixer",
    "VimMixer2d",
    "add_spatial_layers",
    "apply_on_tokens",
    "create_model",
    "layers",
    "list_models",
    "models",
    "ops",
    "param_groups",
]
