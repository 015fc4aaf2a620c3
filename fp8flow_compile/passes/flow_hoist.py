"""Flow rewrite "hoist": quantize before data movement, so tokens move in FP8.

Expects: a graph with fp8flow quantize nodes. Guarantees: `quantize_1x128(index(s, [idx]))` (a
row gather of a 2-D tensor, as the MoE token permutation and the gradient of a combine that
gathers are; seen through same-shape views, expands and clones) becomes
`permute_pad_fp8(quantize_1x128(s), idx)`: the rows and their scales move together, which is
exact because 1x128 tiles along the last dim never mix rows. The quantization of `s` is shared
with any other user of it (dedupe runs after).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import Ctx, call, call_multi, val

aten = torch.ops.aten
prims = torch.ops.prims
ops = torch.ops.fp8flow


_SAME = {aten.expand.default, aten.view.default, aten._unsafe_view.default, aten.alias.default,
         aten.clone.default, aten.reshape.default}


def _row_gather(x: fx.Node):
    # Ops that keep the shape and the element order (a no-op expand, a same-shape view, a clone)
    # between the gather and the quantization move along: quantize(expand(x[idx])) is
    # quantize(x[idx]), as autograd writes the gradient of a gather.
    while (x.op == "call_function" and x.target in _SAME
           and tuple(val(x).shape) == tuple(val(x.args[0]).shape)):
        x = x.args[0]
    if x.op != "call_function" or x.target is not aten.index.Tensor:
        return None
    src, idx = x.args
    if len(idx) != 1 or idx[0] is None or val(src).dim() != 2 or val(idx[0]).dim() != 1:
        return None
    if val(idx[0]).dtype not in (torch.int64, torch.int32):
        return None
    return src, idx[0]


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    for n in list(gm.graph.nodes):
        if n.target is not ops.quantize_1x128.default or (len(n.args) > 1 and n.args[1]):
            continue
        g = _row_gather(n.args[0])
        if g is None:
            continue
        src, idx = g
        gathered = n.args[0].name
        if not val(src).is_contiguous():
            continue
        with gm.graph.inserting_before(n):
            sq, ss = call_multi(gm, ops.quantize_1x128.default, (src, None), 2,
                                name=f"q_{src.name}")
            sq.args[0].meta["fp8flow"] = {"role": "act", "src": src}
            idx32 = idx if val(idx).dtype == torch.int32 else call(
                gm, prims.convert_element_type.default, (idx, torch.int32))
            pq, ps = call_multi(gm, ops.permute_pad_fp8.default, (sq, ss, idx32), 2,
                                name=f"perm_{src.name}")
        for u in list(n.users):
            if u.target is operator.getitem:
                u.replace_all_uses_with(pq if u.args[1] == 0 else ps)
                gm.graph.erase_node(u)
        gm.graph.erase_node(n)
        ctx.log.append(f"hoist: quantization of {gathered} moved above the row gather "
                       f"of {src.name}")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
