"""The one error the op set raises for inputs it cannot take in FP8.

The passes catch it to leave a GEMM in BF16 and put `str(err)` in the report as the reason.
"""

from __future__ import annotations

import torch


class Fp8Unsupported(ValueError):
    """An input violates a constraint of the FP8 op set; the message names the constraint."""


def require(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise Fp8Unsupported(f"fp8flow::{op}: {msg}")


def require_2d(t: torch.Tensor, op: str, name: str) -> None:
    require(t.dim() == 2, op, f"{name} must be 2-D, got shape {tuple(t.shape)}")


def require_dtype(t: torch.Tensor, dtypes: tuple[torch.dtype, ...], op: str, name: str) -> None:
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    require(t.dtype in dtypes, op, f"{name} must have dtype in ({names}), got {t.dtype}")


def require_contiguous(t: torch.Tensor, op: str, name: str) -> None:
    require(t.is_contiguous(), op,
            f"{name} must be contiguous (row-major), got strides {tuple(t.stride())}")


def require_multiple(n: int, m: int, op: str, what: str) -> None:
    require(n % m == 0, op, f"{what} = {n} must be a multiple of {m}")
