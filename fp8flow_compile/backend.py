"""The `fp8flow` torch.compile backend (entry point `torch_dynamo_backends: fp8flow`).

The graph rewrite (find GEMMs, insert Q/DQ, flow rewrites, lowering, report) is not built yet;
the name is reserved so that `backend="fp8flow"` resolves after `pip install`, and it fails with
a clear message instead of silently compiling a BF16 model as if it were FP8.
"""

from __future__ import annotations

from typing import Any

import torch


def fp8flow(gm: torch.fx.GraphModule, example_inputs: list[Any], **options: Any):
    raise NotImplementedError(
        "the fp8flow graph rewrite is not available in this version; the FP8 op set is "
        "available as torch.ops.fp8flow.* and the hand-wired FP8 flow as "
        "fp8flow_compile.flow.moe_experts_fp8_flow / linear_fp8_flow")
