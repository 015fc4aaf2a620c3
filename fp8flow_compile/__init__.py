"""fp8flow: FP8-Flow-MoE training as a torch.compile backend.

    cmodel = torch.compile(model, backend="fp8flow")
    ...
    print(fp8flow_compile.last_report())
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernels  # noqa: F401  (registers torch.ops.fp8flow.*)
from .backend import fp8flow, last_report
from .errors import Fp8Unsupported
from .kernels.cublas import gemm_backend, set_gemm_backend
from .kernels.weight_cache import clear_weight_cache, weight_cache_info
from .recipe import BLOCKWISE, DEFAULT, Recipe
from .report import Report

__all__ = ["BLOCKWISE", "DEFAULT", "Fp8Unsupported", "Recipe", "Report", "clear_weight_cache",
           "explain", "fp8flow", "gemm_backend", "last_report", "set_gemm_backend",
           "weight_cache_info"]
__version__ = "0.1.0"


def explain(model: torch.nn.Module, *inputs: Any, options: dict | None = None) -> Report:
    """Compile `model` with fp8flow (graphs run eagerly), run one forward and backward on
    `inputs`, and return the report of what was rewritten. The model's gradients are left as
    they were."""
    import torch._dynamo

    opts = {"inner": "eager", **(options or {})}
    grads = {n: p.grad for n, p in model.named_parameters()}
    last_report().records.clear()
    torch._dynamo.reset()
    out = torch.compile(model, backend=fp8flow, options=opts)(*inputs)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.requires_grad]
    if outs:
        torch.autograd.backward([o.float().sum() for o in outs])
    for n, p in model.named_parameters():
        p.grad = grads[n]
    torch._dynamo.reset()
    return last_report()
