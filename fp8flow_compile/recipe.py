"""The FP8 numeric recipe: one frozen dataclass that every kernel and pass reads.

The default is the FP8-Flow-MoE recipe (arXiv 2511.02302): E4M3 everywhere, activations and
gradients in 1x128 tiles along the axis the consuming GEMM contracts, weights in 128x128 blocks,
fp32 scales that are powers of two.

Scale rule (per tile, amax over the tile's finite values):
    scale = 2 ** ceil(log2(amax / fp8_max))   computed exactly (no rounding of the division),
    amax == 0 -> scale = 1, and the scale is clamped to [2**-126, 2**126] (normal fp32).
Values are divided by the scale (exact: a power of two), saturated to +-fp8_max and rounded to
nearest-even on the E4M3 grid.

Non-finite input (the documented rule): NaN and +-Inf become E4M3 NaN in place (E4M3FN has no
infinity); the tile's scale is computed from its finite values, so the rest of the tile keeps its
precision and the NaN reaches every GEMM output that reads it. A NaN never becomes a finite number.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

Granularity = Literal["blockwise", "rowwise", "tensorwise"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """FP8 training recipe. Only the blockwise power-of-two E4M3 recipe has kernels today;
    the other fields are the room left for E5M2 gradients and per-row/per-tensor scaling."""

    act_dtype: torch.dtype = torch.float8_e4m3fn
    weight_dtype: torch.dtype = torch.float8_e4m3fn
    grad_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: Granularity = "blockwise"
    # Activations and gradients: 1 x tile along the contracted axis.
    tile: int = 128
    # Weights: block x block.
    block: int = 128
    pow2_scales: bool = True
    # Rows each expert group is padded to by permute_pad_fp8 (grouped GEMM alignment).
    group_align: int = 16

    def fp8_max(self, dtype: torch.dtype | None = None) -> float:
        return float(torch.finfo(dtype or self.act_dtype).max)

    def check_supported(self) -> None:
        """Raise NotImplementedError for recipes that have no kernels yet."""
        for name in ("act_dtype", "weight_dtype", "grad_dtype"):
            if getattr(self, name) != torch.float8_e4m3fn:
                raise NotImplementedError(
                    f"recipe.{name}={getattr(self, name)}: only float8_e4m3fn has kernels")
        if self.granularity != "blockwise" or not self.pow2_scales:
            raise NotImplementedError(
                "only the blockwise recipe with power-of-two scales has kernels")
        if self.tile != 128 or self.block != 128:
            raise NotImplementedError("tile and block sizes other than 128 have no kernels")


#: The default recipe (FP8-Flow-MoE): E4M3, 1x128 / 128x128, power-of-two scales.
BLOCKWISE = Recipe()
DEFAULT = BLOCKWISE

# Derived constants for kernels; everything else reads the recipe.
E4M3_MAX = BLOCKWISE.fp8_max()  # 448.0
TILE = BLOCKWISE.tile  # 128
