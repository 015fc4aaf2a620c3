"""Small things every op module shares: dtypes and the device dispatch rule."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
HIGH = (torch.bfloat16, torch.float16, torch.float32)


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA; every other device runs the torch reference.

    Tests run the Triton kernels on CPU through the interpreter by calling the `*_triton`
    launchers directly with TRITON_INTERPRET=1.
    """
    return t.is_cuda


def is_block_scaled(s: torch.Tensor, rows: int) -> bool:
    """Whether the column-wise scales `s` of a wgrad operand with `rows` rows come in 128x128
    blocks ([cdiv(rows, 128), T], one scale per 128 rows of a token tile) rather than one row
    of scales per operand row ([rows, T]). For rows <= 1 the two forms are the same tensor."""
    return s.shape[0] != rows


def expand_block_scales(s: torch.Tensor, rows: int, tile: int = 128) -> torch.Tensor:
    """The per-row form [rows, T] of 128x128-block column-wise scales [cdiv(rows, tile), T]:
    row r takes the scales of its block r // tile. The same tensor where s is per-row already."""
    if not is_block_scaled(s, rows):
        return s
    return s.repeat_interleave(tile, dim=0)[:rows]
