"""Dedupe: one fp8flow op per (op, inputs), e.g. one quantization per (tensor, axis).

Expects: any graph. Guarantees: no two fp8flow nodes (or getitems of them, or pure views) with
the same target and the same arguments; the later ones are replaced by the first.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import Ctx, finish

aten = torch.ops.aten
# Pure view ops: in the functional joint graph two with the same arguments are the same tensor.
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
         aten.permute.default, aten.transpose.int, aten.unsqueeze.default}


def _key(n: fx.Node):
    def k(a):
        if isinstance(a, (list, tuple)):
            return tuple(k(x) for x in a)
        return a
    return (n.target, k(n.args), tuple(sorted((name, k(v)) for name, v in n.kwargs.items())))


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    seen: dict = {}
    removed = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        is_ours = getattr(n.target, "namespace", None) == "fp8flow"
        is_item = n.target is operator.getitem and getattr(
            n.args[0].target, "namespace", None) == "fp8flow"
        # Identical views too: each Linear flattens its input with a view of its own, and two
        # quantizations of two equal views of one tensor are one quantization.
        if not (is_ours or is_item or n.target in VIEWS):
            continue
        key = _key(n)
        if key in seen:
            n.replace_all_uses_with(seen[key])
            gm.graph.erase_node(n)
            removed += 1
        else:
            seen[key] = n
    if removed:
        ctx.log.append(f"dedupe: {removed} duplicate fp8flow nodes removed")
        finish(gm)
    return gm
