"""nn.Modules that own parameters, initialization and caching."""

from .grid import apply_on_tokens, grid_to_tokens, tokens_to_grid
from .ssm2d import SSM2D

__all__ = ["SSM2D", "apply_on_tokens", "grid_to_tokens", "tokens_to_grid"]
