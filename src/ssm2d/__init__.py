"""ssm2d: 2-D spatial layers for vision models, exact and fast in pure PyTorch."""

from . import layers, ops
from .layers import SSM2D, apply_on_tokens
from .optim import param_groups

__version__ = "0.1.0"

__all__ = ["SSM2D", "apply_on_tokens", "layers", "ops", "param_groups"]
