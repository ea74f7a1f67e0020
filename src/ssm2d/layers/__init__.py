"""nn.Modules that own parameters, initialization and caching."""

from .grid import apply_on_tokens, grid_to_tokens, tokens_to_grid
from .placement import GridSize, SpatialAfter, SpatialOnTokens
from .ssm2d import SSM2D

__all__ = [
    "SSM2D",
    "GridSize",
    "SpatialAfter",
    "SpatialOnTokens",
    "apply_on_tokens",
    "grid_to_tokens",
    "tokens_to_grid",
]
