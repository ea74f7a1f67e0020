"""nn.Modules that own parameters, initialization and caching."""

from .grid import apply_on_tokens, grid_to_tokens, tokens_to_grid
from .placement import GridSize, SpatialAfter, SpatialOnTokens
from .sp_attention import SPAttention, SPAttentionOnTokens, SpatialPrior
from .s4nd import S4ND
from .ssm2d import SSM2D
from .mamba import MambaInner
from .v2m import V2M
from .vim import VimMixer, VimMixer2d

__all__ = [
    "SPAttention",
    "SPAttentionOnTokens",
    "SpatialPrior",
    "S4ND",
    "SSM2D",
    "MambaInner",
    "V2M",
    "VimMixer",
    "VimMixer2d",
    "GridSize",
    "SpatialAfter",
    "SpatialOnTokens",
    "apply_on_tokens",
    "grid_to_tokens",
    "tokens_to_grid",
]
