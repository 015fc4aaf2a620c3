"""Flow rewrite "hoist": quantize before data movement, so tokens move in FP8.

Expects: a graph with fp8flow quantize nodes. Guarantees: `quantize_1x128(index(s, [idx]))` (a row
gather of a 2-D tensor, as the MoE token permutation and the gradient of a combine that gathers are;
seen through same-shape views, expands and clones) becomes `permute_pad_fp8(quantize_1x128(s),
idx)`: the rows and their scales move together, which is exact because 1x128 tiles along the last
dim never mix rows (`index_select` along rows counts as such a gather). Likewise
`quantize_1x128(cat([a, b], 0))` becomes the concatenation of the quantized parts (bytes and scales)
when every part is already quantized row-wise for another GEMM, so that the concatenation moves FP8
bytes and no cast is added. The quantization of `s` is shared with any other user of it (dedupe runs
after).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import Ctx, call, call_multi, finish, replace_outputs, val
from .insert_qdq import quantize

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
    if x.op != "call_function":
        return None
    if x.target is aten.index.Tensor:
        src, idx = x.args
        if len(idx) != 1 or idx[0] is None:
            return None
        idx = idx[0]
    elif x.target is aten.index_select.default and x.args[1] in (0, -2):
        src, idx = x.args[0], x.args[2]
    else:
        return None
    if val(src).dim() != 2 or val(idx).dim() != 1:
        return None
    if val(idx).dtype not in (torch.int64, torch.int32):
        return None
    return src, idx


def _row_cat(x: fx.Node):
    """The parts of cat([a, b, ...], dim=0) of 2-D tensors, or None."""
    if x.op != "call_function" or x.target is not aten.cat.default:
        return None
    parts = x.args[0]
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    if dim not in (0, -2) or len(parts) < 2:
        return None
    if any(val(p).dim() != 2 or not val(p).is_contiguous() for p in parts):
        return None
    return list(parts)


def _quant_rows(gm: fx.GraphModule, x: fx.Node):
    return quantize(gm, ops.quantize_1x128.default, x, None, "act")


def hoist_gather(gm: fx.GraphModule, n: fx.Node, ctx: Ctx) -> bool:
    """`quantize_1x128(x[idx])` at n -> `permute_pad_fp8(quantize_1x128(x), idx)`; whether it
    was one (a row gather of a contiguous 2-D tensor)."""
    moved = n.args[0].name
    g = _row_gather(n.args[0])
    if g is None:
        return False
    src, idx = g
    if not val(src).is_contiguous():
        return False
    with gm.graph.inserting_before(n):
        sq, ss = _quant_rows(gm, src)
        # permute_pad_fp8 reads a negative index as a padding row; torch wraps it.
        rows = val(src).shape[0]
        if not isinstance(rows, int):  # dynamic token count: read it from the graph
            rows = call(gm, aten.sym_size.int, (src, 0))
        wrapped = call(gm, aten.where.self, (
            call(gm, aten.lt.Scalar, (idx, 0)), call(gm, aten.add.Tensor, (idx, rows)), idx))
        idx32 = call(gm, prims.convert_element_type.default, (wrapped, torch.int32))
        pq, ps = call_multi(gm, ops.permute_pad_fp8.default, (sq, ss, idx32), 2,
                            name=f"perm_{src.name}")
    replace_outputs(gm, n, [pq, ps])
    ctx.log.append(f"hoist: quantization of {moved} moved above the row gather of {src.name}")
    return True


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    # Tensors some GEMM already reads in row-wise FP8: a concatenation of those is made from
    # their FP8 forms (dedupe merges the quantizations), so hoisting adds no cast.
    row_quantized = {n.args[0] for n in gm.graph.nodes
                     if n.target is ops.quantize_1x128.default
                     and (len(n.args) < 2 or n.args[1] is None)}
    for n in list(gm.graph.nodes):
        if n.target is not ops.quantize_1x128.default or (len(n.args) > 1 and n.args[1]):
            continue
        moved = n.args[0].name
        parts = _row_cat(n.args[0])
        if parts is not None and all(p in row_quantized for p in parts):
            # 1x128 tiles never mix rows: quantize each part, concatenate bytes and scales.
            with gm.graph.inserting_before(n):
                qs = [_quant_rows(gm, p) for p in parts]
                q = call(gm, aten.cat.default, ([a for a, _ in qs], 0))
                sc = call(gm, aten.cat.default, ([b for _, b in qs], 0))
            replace_outputs(gm, n, [q, sc])
            ctx.log.append(f"hoist: quantization of {moved} moved above the row concatenation "
                           f"of {', '.join(p.name for p in parts)}")
            continue
        hoist_gather(gm, n, ctx)
    finish(gm, dead_code=True)
    return gm
