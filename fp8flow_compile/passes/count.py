"""Count explicit casts: nodes whose only job is to change the precision of a tensor.

Activation/gradient casts (1x128 quantize, either axis) are counted apart from weight casts
(128x128 quantize) and dequantizes. Fused producers (swiglu_quant; swiglu_quant_save, which also
writes the FP8 copy of its input for the backward), the scaling-aware transpose
and FP8 data movement (permute_pad_fp8) are not casts; they are counted as FP8 ops.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx

from .graph import given_args

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
        elif n.target in WEIGHT:  # one per weight (`below`: two weights in one pass)
            c["weight"] += 1 if given_args(n).get("below") is None else 2
        elif n.target in DEQ:
            c["dequant"] += 1
        elif getattr(n.target, "namespace", None) == "fp8flow":
            c[n.target._opname] += 1
    return dict(c)


_PASS_THROUGH = {"getitem", "scaling_aware_transpose", "permute_pad_fp8", "permute", "t",
                 "transpose", "view", "clone", "alias", "cat"}


def by_module(gm: fx.GraphModule, gemms: list, bwd: set) -> dict[str, dict[str, int]]:
    """Activation/gradient casts per module: each cast is charged to the module that owns the
    weight of the GEMMs it feeds (their common parent when it feeds several, e.g. q/k/v), per
    phase. `gemms` are find_gemms' decisions (their nodes are the rewritten GEMMs), `bwd` the
    backward nodes (graph.backward_nodes)."""
    owner = {g.node: g.weight.rsplit(".", 1)[0] if "." in g.weight else "(root)"
             for g in gemms if g.weight}
    out: dict[str, dict[str, int]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in ACT:
            continue
        mods, stack, seen = set(), [n], set()
        while stack:
            m = stack.pop()
            for u in m.users:
                if u in seen:
                    continue
                seen.add(u)
                if u in owner:
                    mods.add(owner[u])
                elif getattr(u.target, "_opname", getattr(u.target, "__name__", "")) in \
                        _PASS_THROUGH:
                    stack.append(u)
        parts = [m.split(".") for m in sorted(mods)]
        common = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        name = ".".join(common) or ("(several)" if mods else "(no GEMM)")
        phase = "backward" if n in bwd else "forward"
        out.setdefault(name, {"forward": 0, "backward": 0})[phase] += 1
    return dict(sorted(out.items()))
