"""nn.Modules that own parameters, initialization and caching."""

from .dwconv import DWConv2d
from .ema import MegaEMA
from .grid import apply_on_tokens, grid_to_tokens, tokens_to_grid
from .mega import MovingAverageGatedAttention, NormalizedFFN
from .placement import GridSize, SpatialAfter, SpatialOnTokens
from .sp_attention import SPAttention, SPAttentionOnTokens, SpatialPrior
from .s4nd import S4ND
from .ss2d import SS2D
from .ssm2d import SSM2D
from .mamba import MambaInner
from .v2m import V2M
from .vim import VimMixer, VimMixer2d

__all__ = [
    "DWConv2d",
    "MegaEMA",
    "MovingAverageGatedAttention",
    "NormalizedFFN",
    "SPAttention",
    "SPAttentionOnTokens",
    "SpatialPrior",
    "S4ND",
    "SS2D",
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
