"""Count explicit casts: nodes whose only job is to change the precision of a tensor.

Activation/gradient casts (1x128 quantize, either axis) are counted apart from weight casts
(128x128 quantize) and dequantizes. Fused producers (swiglu_quant), the scaling-aware transpose
and FP8 data movement (permute_pad_fp8) are not casts; they are counted as FP8 ops.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx

ops = torch.ops.fp8flow
ACT = {ops.quantize_1x128.default, ops.quantize_1x128_col.default}
WEIGHT = {ops.quantize_128x128.default, ops.quantize_128x128_dual.default}
DEQ = {ops.dequantize_1x128.default, ops.dequantize_128x128.default}


def casts(gm: fx.GraphModule, nodes: set | None = None) -> dict[str, int]:
    c: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function" or (nodes is not None and n not in nodes):
            continue
        if n.target in ACT:
            c["act"] += 1
        elif n.target in WEIGHT:
            c["weight"] += 1
        elif n.target in DEQ:
            c["dequant"] += 1
        elif getattr(n.target, "namespace", None) == "fp8flow":
            c[n.target._opname] += 1
    return dict(c)
