"""SP-SA, the spatial-prior-enhanced self-attention of SP-ViT (Zhou et al., BMVC 2022).

Glossary: B batch, H x W grid, C = dim channels, L = H * W, h heads, d = C / h head width,
P prefix (class, register) tokens.

- `SpatialPrior`: the per-head MLP over relative 2-D offsets (docs/math.md §11), giving an
  (h, L, L) map on any H x W grid; cached per grid in eval mode.
- `SPAttention`: multi-head self-attention over the grid whose logits the prior multiplies,
  as a (B, H, W, C) -> (B, H, W, C) spatial mixer.
- `SPAttentionOnTokens`: the mixer as the attention of a timm ViT `Block`, on (B, P + L, C)
  tokens; prefix tokens are excluded (docs/math.md §11, "prefix tokens").
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from ..ops import sp_attention, sp_attention_ref, spatial_prior, spatial_prior_ref
from .cache import ParameterCache
from .checks import check_grid_input, check_positive_ints
from .grid import grid_to_tokens, tokens_to_grid
from .placement import GridSize

__all__ = ["SPAttention", "SPAttentionOnTokens", "SpatialPrior"]

HEAD_DIM = 64  # default head width: SP-ViT-S has D 384 and 6 heads (Zhou et al. 2022, Table 1)


class SpatialPrior(nn.Module):
    """SP_h(r) = sum_k w2[h, k] ReLU(W1 r + b1)[h, k] + b2[h] over offsets r = (dx, dy).

    The offsets are unnormalised patch steps (docs/math.md §11), so the MLP extrapolates to
    the larger offsets of a larger or non-square grid. The map is cached per grid in eval mode
    when no gradient through the parameters is needed (`ParameterCache`: keyed on the grid,
    the path and the parameters' version counters, so any in-place update invalidates it).

    Args:
        num_heads: h, one prior per head.
        hidden: k, hidden units per head (SP-ViT: the head width d, so that W1 is Linear(2 -> D)).
    """

    def __init__(self, num_heads: int, hidden: int) -> None:
        super().__init__()
        check_positive_ints(num_heads=num_heads, hidden=hidden)
        self.num_heads, self.hidden = num_heads, hidden
        self.fc1 = nn.Linear(2, num_heads * hidden)  # W1, b1; hidden units grouped (h, k)
        self.w2 = nn.Parameter(torch.empty(num_heads * hidden))  # viewed as (h, k)
        self.b2 = nn.Parameter(torch.empty(num_heads))
        self._cache = ParameterCache()  # the map, in eval mode
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W1 trunc_normal(.02), b1 = 0, w2 = 0, b2 = 1, so SP == 1 (docs/math.md §11)."""
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        self.w2.zero_()
        self.b2.fill_(1.0)

    def train(self, mode: bool = True) -> SpatialPrior:
        self._cache.clear()
        return super().train(mode)

    def forward(self, grid: tuple[int, int], fast_path: bool = True) -> Tensor:
        """The (h, L, L) map on an H x W grid; `fast_path=False` evaluates every pair."""
        grid = (int(grid[0]), int(grid[1]))
        params = list(self.parameters())

        def compute() -> Tensor:
            fn = spatial_prior if fast_path else spatial_prior_ref
            h, k = self.num_heads, self.hidden
            w1 = rearrange(self.fc1.weight, "(h k) c -> h k c", h=h)  # (h, k, 2)
            return fn(w1, self.fc1.bias.view(h, k), self.w2.view(h, k), self.b2, grid)  # (h, L, L)

        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return compute()
        return self._cache.fetch((grid, fast_path), params, compute)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, hidden={self.hidden}"


class SPAttention(nn.Module):
    """Multi-head self-attention over the grid with a learned 2-D spatial prior (SP-SA).

    y = proj(concat_h softmax_j(q_i . k_j / sqrt(d) * SP_h(r_ij)) v_h), docs/math.md §11, on
    (B, H, W, C) maps of any H x W. At initialization SP == 1: plain attention.

    Args:
        dim: channels C.
        num_heads: h; must divide dim. None: one head per 64 channels when 64 divides dim
            (SP-ViT-S's head width), else a single head.
        proj_drop: dropout after the output projection.
        skip: add the input to the output, y = x + SP-SA(x). Not part of SP-SA (its residual
            lives in the transformer block); it makes the layer an exact identity after
            `reset_to_identity()`, for insertion into trained models.

    Attributes:
        fast_path: one MLP evaluation per offset and batched matmuls when True (default);
            the per-pair prior and per-row attention of `spatial_prior_ref` and
            `sp_attention_ref` when False.
    """

    def __init__(self, dim: int, num_heads: int | None = None, proj_drop: float = 0.0, skip: bool = False) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")
        if num_heads is None:
            num_heads = dim // HEAD_DIM if dim % HEAD_DIM == 0 else 1
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: expected an integer >= 1 that divides dim={dim}, got {num_heads!r}")
        self.dim, self.num_heads, self.head_dim, self.skip = dim, num_heads, dim // num_heads, skip
        self.fast_path = True
        self.qk = nn.Linear(dim, 2 * dim, bias=False)  # as SP-ViT's code: qk and v without bias
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.prior = SpatialPrior(num_heads, self.head_dim)  # W1: Linear(2 -> D), grouped h x d
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear layers trunc_normal(.02) with zero bias (LV-ViT's `_init_weights`, which SP-ViT
        uses); the prior starts at SP == 1."""
        for linear in (self.qk, self.v, self.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.prior.reset_parameters()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Make the layer the identity map: zero output projection, so y = x + 0.

        Needs `skip=True`: without the skip no setting of SP-SA's parameters gives the identity.
        """
        if not self.skip:
            raise ValueError(
                "reset_to_identity: expected skip=True (SP-SA alone cannot be the identity), got skip=False; "
                "use functools.partial(SPAttention, skip=True)"
            )
        self.proj.weight.zero_()
        self.proj.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        check_grid_input(x, self.dim)
        _, height, width, _ = x.shape
        tokens = rearrange(x, "b y x c -> b (y x) c")  # (B, L, C), row-major as the prior
        q, k = rearrange(self.qk(tokens), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        v = rearrange(self.v(tokens), "b l (h d) -> b h l d", h=self.num_heads)  # (B, h, L, d)
        prior = self.prior((height, width), fast_path=self.fast_path).to(q.dtype)  # (h, L, L)
        attend = sp_attention if self.fast_path else sp_attention_ref
        y = rearrange(attend(q, k, v, prior), "b h (y x) d -> b y x (h d)", y=height)  # (B, H, W, C)
        y = self.proj_drop(self.proj(y))
        return x + y if self.skip else y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, skip={self.skip}, fast_path={self.fast_path}"


class SPAttentionOnTokens(nn.Module):
    """An `SPAttention` as the attention of a timm ViT `Block`, on (B, P + H*W, C) tokens.

    The patch tokens attend to each other through the mixer; the P prefix tokens neither
    attend nor are attended to, and their attention output is zero, so the block's residual
    leaves them as they were. This is SP-ViT's split (docs/math.md §11): the class token joins
    after the SP-SA blocks, and until then stays independent of the image.

    Args:
        mixer: the SP-SA layer; built without `skip`, since the block adds the residual.
        grid: the model's `GridSize`, set by a pre-hook on its patch embedding.
        num_prefix_tokens: P, the class and register tokens that lead the sequence.
    """

    def __init__(self, mixer: SPAttention, grid: GridSize, num_prefix_tokens: int) -> None:
        super().__init__()
        if not isinstance(mixer, SPAttention) or mixer.skip:
            raise ValueError(
                f"mixer: expected an SPAttention with skip=False (the block adds the residual), got {mixer!r}"
            )
        self.mixer = mixer
        self.grid = grid  # shared by all attention layers of one model; not a submodule
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """x: (B, P + H*W, C) -> (B, P + H*W, C); timm's attention signature, without masks."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask, is_causal: SP-SA attends over the whole grid; masks are not supported")
        size = self.grid.lookup(x.shape[1] - self.num_prefix_tokens)
        if size is None:
            raise RuntimeError(
                "grid: no patch grid recorded; run the whole model (or set `.grid.size = (H, W)` before a block)"
            )
        prefix, patches = tokens_to_grid(x, size, self.num_prefix_tokens)
        return grid_to_tokens(torch.zeros_like(prefix), self.mixer(patches))

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"
