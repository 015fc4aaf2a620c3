"""Flow rewrite "probs": the routing weight moves from the FC2 output into the SwiGLU.

Expects: a graph after flow_combine (the combine is `index_add_rows` with its row weight fused),
flow_fuse and flow_save. Guarantees: where the MoE layer weighs the down projection's output by
the routing probability,

    y = FC2(swiglu(h));  out = index_add_rows(idx, y, w)          (w [P, 1], one per row)

and the backward derives from it, through the product rule,

    dY = w * G          (G = dout[idx], the gradient of the combine's rows) -> FC2 dgrad, wgrad
    dw = sum(G * y, 1)  (which keeps y, [P, H], alive for the backward; absent when the
                         weight needs no gradient, e.g. a fixed routing)

the graph becomes what the paper's flow computes (FP8-Flow-MoE: "probs * SwiGLU + quantize"):

    y' = FC2(swiglu_quant(h, w)) = w * y;  out = index_add_rows(idx, y', None)
    dY' = G: quantize_1x128(dout) gathered in FP8 (flow_hoist), no weighted BF16 copy
    (dh, dw) = swiglu_quant_backward(FC2_dgrad(dY'), h, w)

Row scaling commutes with a GEMM (each output row is its input row times the weight matrix), so
y' = w * y exactly in real arithmetic, and the FC2 wgrad reads (w * a)^T G = a^T (w * G), the
same product. What changes is rounding only: w * a is quantized instead of a (the same 1x128
relative error bound), and dw is summed over the I columns of the SwiGLU rather than the H
columns of y. The backward then reads neither y nor a weighted BF16 gradient: at DeepSeek-V3
shapes that is 946 MB of y saved for the backward, and a gather-weight-reduce pass plus a
quantization over [P, H] BF16 replaced by a quantization of dout [T, H] and an FP8 row gather.

Taken only when every piece is there and nothing else reads what goes away: y is read by the
combine and (if at all) by the dw product alone; the weighted gradient only by its row-wise
quantization,
which feeds the FC2 dgrad; that dgrad feeds the SwiGLU's fused backward of the same h; the
SwiGLU takes no weight yet. Anything else is left as it was, with the reason in the log. Off
with `options["probs_in_swiglu"] = False`.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import flow_hoist
from .graph import Ctx, call, fake_mode_of, finish, val

aten = torch.ops.aten
prims = torch.ops.prims
ops = torch.ops.fp8flow

_GEMMS = (ops.grouped_gemm_fp8.default, ops.gemm_fp8.default)
_SWIGLU = (ops.swiglu_quant.default, ops.swiglu_quant_save.default)


def _getitem_of(n, i: int | None = None):
    """The multi-output node n is output i of (any i if None), else None."""
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and (i is None or n.args[1] == i)):
        return n.args[0]
    return None


def _output(node: fx.Node, i: int) -> fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == i), None)


def _other(mul: fx.Node, x: fx.Node):
    """The other operand of the product mul = x * o (either order), else None."""
    if mul.op != "call_function" or mul.target is not aten.mul.Tensor or len(mul.args) != 2:
        return None
    a, b = mul.args
    return b if a is x else a if b is x else None


def _same_up(bwd: fx.Node, swiglu: fx.Node) -> bool:
    """The backward reads the forward's separate up projection, if it has one (or the FP8
    copy of gate and up the forward saved, which only that forward makes)."""
    up = swiglu.args[2] if len(swiglu.args) > 2 else None
    if up is None or bwd.args[1] is _output(swiglu, 2):
        return True
    return len(bwd.args) > 4 and bwd.args[4] is up


def _row_sum(n: fx.Node) -> bool:
    """n sums a 2-D tensor over its last dim, keeping it: [P, H] -> [P, 1]."""
    if n.op != "call_function" or n.target is not aten.sum.dim_IntList:
        return False
    dims = n.args[1]
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    return (val(n.args[0]).dim() == 2 and list(dims) in ([1], [-1]) and keep
            and not n.kwargs.get("dtype"))


def _match(c: fx.Node, why: list[str]):
    """The pieces of one weighted combine this pass rewrites, or None with a reason in why."""
    y, w = c.args[2], c.args[3]
    if not isinstance(w, fx.Node) or y.op != "call_function" or y.target not in _GEMMS:
        return None  # not the weighted combine of an FP8 GEMM's rows: nothing to say
    swiglu = _getitem_of(y.args[0], 0)
    if swiglu is None or swiglu.target not in _SWIGLU:
        why.append(f"{y.name}'s input is not a fused SwiGLU's output")
        return None
    if (swiglu.args[1] if len(swiglu.args) > 1 else swiglu.kwargs.get("probs")) is not None:
        why.append(f"{swiglu.name} already takes a row weight")
        return None
    wv, yv = val(w), val(y)
    if tuple(wv.shape) != (yv.shape[0], 1) or wv.dtype not in (torch.bfloat16, torch.float16,
                                                                torch.float32):
        why.append(f"the weight {w.name} is not one value per row of {y.name}")
        return None
    h_bwd = {swiglu.args[0], _output(swiglu, 2)} - {None}
    # The weighted gradient dY = G * w: quantized row-wise for the FC2 dgrad alone, whose
    # output the fused SwiGLU backward of the same h reads alone.
    chain = None
    for m3 in w.users:
        g = _other(m3, w)
        q = next(iter(m3.users)) if g is not None and len(m3.users) == 1 else None
        if q is None or q.target is not ops.quantize_1x128.default or (
                len(q.args) > 1 and q.args[1] is not None):
            continue
        dq = _output(q, 0)
        dgrads = [u for u in (dq.users if dq is not None else ()) if u.target in _GEMMS
                  and u.args[0] is dq]
        bwd = [b for d in dgrads for b in d.users
               if b.target is ops.swiglu_quant_backward.default and b.args[0] is d
               and b.args[1] in h_bwd and (len(b.args) < 3 or b.args[2] is None)
               and _same_up(b, swiglu)]
        # the FP8 rows feed the dgrad and the transpose for the FC2 wgrad, nothing else
        readers = {u for o in (dq, _output(q, 1)) if o is not None for u in o.users}
        if (len(dgrads) == 1 and len(bwd) == 1 and len(dgrads[0].users) == 1
                and all(u in dgrads or u.target is ops.scaling_aware_transpose.default
                        for u in readers)):
            chain = g, m3, q, bwd[0]
    if chain is None:
        why.append(f"no gradient of {y.name} weighted by {w.name} that only the FC2 dgrad "
                   f"reads, feeding the fused SwiGLU backward of {swiglu.args[0].name}")
        return None
    g, m3, q, bwd = chain
    # y's other reader, if the weight needs a gradient: dw = sum(G * y, -1)
    others = [u for u in y.users if u is not c]
    m2 = dw = None
    if others:
        m2 = others[0]
        if (len(others) != 1 or _other(m2, y) is not g or len(m2.users) != 1
                or not _row_sum(next(iter(m2.users)))):
            why.append(f"{y.name} is read besides the combine, not only by the weight's "
                       f"gradient sum(G * {y.name}, -1)")
            return None
        dw = next(iter(m2.users))
    return y, w, swiglu, g, m2, dw, m3, q, bwd


def _move_before(n: fx.Node, anchor: fx.Node, order: dict) -> None:
    """Move n, and whatever it needs that comes after anchor, to just before anchor."""
    if n.op != "call_function" or order[n] < order[anchor]:
        return
    for a in n.all_input_nodes:
        _move_before(a, anchor, order)
    anchor.prepend(n)
    order[n] = order[anchor] - 0.5


def _refresh(gm: fx.GraphModule, n: fx.Node) -> None:
    """Recompute n's fake value after its arguments changed."""
    with fake_mode_of(gm):
        n.meta["val"] = n.target(*fx.node.map_arg(n.args, val), **fx.node.map_arg(n.kwargs, val))


def _move_after(nodes: list[fx.Node], anchor: fx.Node) -> None:
    for n in nodes:
        anchor.append(n)
        anchor = n


def _users_closure(n: fx.Node) -> set[fx.Node]:
    out, todo = set(), list(n.users)
    while todo:
        u = todo.pop()
        if u not in out and u.op != "output":
            out.add(u)
            todo.extend(u.users)
    return out


def _weight_gradient(gm: fx.GraphModule, bwd: fx.Node, dw: fx.Node, m2: fx.Node) -> None:
    """Replace dw = sum(G * y, -1) by the SwiGLU backward's dprobs ([P] fp32) in dw's dtype and
    shape [P, 1]; erase dw and the product."""
    d = _output(bwd, 2)
    if d is None:
        with gm.graph.inserting_after(bwd):
            d = gm.graph.call_function(operator.getitem, (bwd, 2))
    d.meta["val"] = val(bwd)[2]
    with gm.graph.inserting_after(d):
        cast = call(gm, prims.convert_element_type.default, (d, val(dw).dtype))
    with gm.graph.inserting_after(cast):
        new_dw = call(gm, aten.unsqueeze.default, (cast, -1), name="dprobs")  # [P, 1]
    # What reads the sum may come before the SwiGLU backward in the graph: those nodes move
    # right after the new sum, in their order (their other inputs all come earlier).
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    early = sorted((n for n in _users_closure(dw) if order[n] < order[new_dw]),
                   key=order.__getitem__)
    dw.replace_all_uses_with(new_dw)
    _move_after(early, new_dw)
    gm.graph.erase_node(dw)
    gm.graph.erase_node(m2)


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    if not ctx.options.get("probs_in_swiglu", True):
        return gm
    changed = False
    for c in list(gm.graph.nodes):
        if c.target is not ops.index_add_rows.default:
            continue
        why: list[str] = []
        m = _match(c, why)
        if m is None:
            if why:
                ctx.log.append(f"probs: the row weight of {c.name} kept after FC2: {why[0]}")
            continue
        y, w, swiglu, g, m2, dw, m3, q, bwd = m
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        _move_before(w, swiglu, order)  # the weight is often computed after the SwiGLU
        with gm.graph.inserting_before(swiglu):
            probs = call(gm, aten.view.default, (w, [-1]), name=f"probs_{w.name}")
        swiglu.args = (swiglu.args[0], probs, *swiglu.args[2:])  # keeps a separate up
        c.args = (*c.args[:3], None, *c.args[4:])
        q.args = (g, *q.args[1:])
        bwd.args = (bwd.args[0], bwd.args[1], probs, *bwd.args[3:])
        for n in (swiglu, c, q, bwd):
            _refresh(gm, n)
        if dw is not None:
            _weight_gradient(gm, bwd, dw, m2)
        gm.graph.erase_node(m3)
        # the unweighted gradient rows are a gather of dout: quantize dout, gather in FP8
        hoisted = flow_hoist.hoist_gather(gm, q, ctx)
        ctx.log.append(f"probs: the row weight {w.name} of {c.name} moved from the output of "
                       f"{y.name} into {swiglu.name}"
                       + (f"; its gradient comes from {bwd.name}" if dw is not None else "")
                       + ("; the FC2 output gradient is gathered in FP8" if hoisted else ""))
        changed = True
    if changed:
        finish(gm, dead_code=True)
    return gm
