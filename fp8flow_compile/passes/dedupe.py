"""Dedupe: one fp8flow op per (op, inputs), e.g. one quantization per (tensor, axis).

Expects: any graph. Guarantees: no two fp8flow nodes (or getitems of them) with the same target
and the same arguments; the later ones are replaced by the first.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .graph import Ctx


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
        if not (is_ours or is_item):
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
        gm.graph.lint()
        gm.recompile()
    return gm
