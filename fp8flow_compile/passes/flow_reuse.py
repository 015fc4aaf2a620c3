"""Flow rewrite "reuse": no column-wise quantization of a tensor that has a row-wise FP8 form.

Expects: the Q/DQ graph of insert_qdq. Guarantees: every `quantize_1x128_col(x, offs)` whose `x`
also has a `quantize_1x128(x)` (no groups along its last dim, whose length is a multiple of 128)
is replaced by `scaling_aware_transpose` of that row-wise form, in the same group layout (offs,
align): no second rounding from the high-precision value and no dequantize -> requantize (the
transpose is exact wherever the shifted value stays representable, see kernels/transpose.py).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import Ctx, call_multi, finish, val

ops = torch.ops.fp8flow


def _outputs(n: fx.Node) -> list[fx.Node]:
    outs = [None, None]
    for u in n.users:
        if u.target is operator.getitem:
            outs[u.args[1]] = u
    return outs


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    rows = {}
    for n in gm.graph.nodes:
        if n.target is ops.quantize_1x128.default and (len(n.args) < 2 or n.args[1] is None):
            rows.setdefault(n.args[0], n)
    for n in list(gm.graph.nodes):
        if n.target is not ops.quantize_1x128_col.default:
            continue
        src = n.args[0]
        offs = n.args[1] if len(n.args) > 1 else None
        align = n.args[2] if len(n.args) > 2 else 1
        row = rows.get(src)
        if row is None or val(src).shape[-1] % 128:
            continue
        q, s = _outputs(row)
        pos = {m: i for i, m in enumerate(gm.graph.nodes)}
        if pos[row] > pos[n]:
            # The row-wise form is made later (say for a dgrad after this wgrad): move it up.
            # Its only input is src, which n reads too, so this keeps the graph topological.
            for m in (row, *(o for o in (q, s) if o is not None)):
                n.prepend(m)
        with gm.graph.inserting_before(n):
            args = (q, s, offs) + ((align,) if align > 1 else ())
            tq, ts = call_multi(gm, ops.scaling_aware_transpose.default, args, 2,
                                name=f"t_{src.name}")
        for old, new in zip(_outputs(n), (tq, ts)):
            if old is not None:
                old.replace_all_uses_with(new)
                gm.graph.erase_node(old)
        gm.graph.erase_node(n)
        ctx.log.append(f"reuse: column-wise quantization of {src.name} -> scaling_aware_transpose")
    finish(gm)
    return gm

