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
