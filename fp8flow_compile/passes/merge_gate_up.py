"""Merge gate and up: the two FC1 GEMMs of a SwiGLU over separate gate and up weights become one.

Expects: the flow's joint graph after block_scales (flow_fuse has fused the SwiGLU of the two
GEMMs' outputs and split its backward into a d_gate and a d_up plane; flow_save may have made the
backward read one FP8 copy of gate and up).
Guarantees: where a fused SwiGLU (`swiglu_quant` / `swiglu_quant_save` with `up`) reads gate and
up from two FP8 GEMMs (`grouped_gemm_fp8` or `gemm_fp8`) of the same input whose weights W1 and W3
are quantized by `quantize_128x128[_dual]` for these GEMMs alone, the graph computes what it
would for a stacked weight cat([W1, W3]):
- one quantization reads both weights (`below=`) and writes the stacked FP8 forms;
- one GEMM writes gate and up as h [P, 2I], which the SwiGLU reads as its one input;
- the SwiGLU backward writes dh [P, 2I] instead of two planes; one dgrad over the stacked
  transposed weight replaces the two whose sum the graph formed (index_add_rows' two terms, or an
  add), and one scaling-aware transpose of dh replaces the planes' two: each weight gradient
  reads its rows of it (rows [0, I) for W1, [I, 2I) for W3).
A pattern that differs in any part is left as it is, and the log says why.

Why: a model with gate and up as weights of their own (torchtitan's w1 / w3, HF's gate_proj /
up_proj) otherwise runs each FC1 GEMM of the forward and backward as two calls of half the width,
and the token gather's gradient reads two dgrad outputs. The bytes are those of the stacked
layer: W1's 128x128 blocks do not reach into W3's (I is a multiple of 128), the forward GEMM's two
halves are the two GEMMs' outputs, and the transpose of dh restricted to a half is the transpose
of that half (its scales depend on the column block and the tokens only). The dgrad sums the two
products in the GEMM's fp32 accumulator and rounds once, where the two GEMMs rounded each to BF16
before their sum. The weight gradients stay two GEMMs: each writes its own parameter's gradient,
contiguous.

Off with `options["merge_gate_up"] = False`; not applied with `cache_weights` (which keeps each
weight's FP8 forms on their own across calls).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..recipe import TILE
from . import insert_qdq
from .graph import Ctx, call, call_multi, finish, given_args, set_arg, val

ops = torch.ops.fp8flow
aten = torch.ops.aten

_GEMMS = (ops.grouped_gemm_fp8.default, ops.gemm_fp8.default)
_SWIGLU = (ops.swiglu_quant.default, ops.swiglu_quant_save.default)
_WQUANT = (ops.quantize_128x128.default, ops.quantize_128x128_dual.default)


class _Skip(Exception):
    """The pattern differs: the reason goes to the log."""


def _outputs(n: fx.Node) -> dict[int, list[fx.Node]]:
    """{output index: its getitem nodes} of a multi-output node; _Skip if read otherwise."""
    out: dict[int, list[fx.Node]] = {}
    for u in n.users:
        if u.target is not operator.getitem:
            raise _Skip(f"{n.name} is read whole by {u.name}")
        out.setdefault(u.args[1], []).append(u)
    return out


def _readers(nodes: list[fx.Node]) -> set[fx.Node]:
    return {u for n in nodes for u in n.users}


def _item(n, of: fx.Node | None = None) -> tuple[fx.Node, int] | None:
    """(source, index) when n is getitem(source, index) (of `of`, if given)."""
    if isinstance(n, fx.Node) and n.target is operator.getitem and \
            (of is None or n.args[0] is of):
        return n.args[0], n.args[1]
    return None


def _weight_quant(gemm: fx.Node) -> fx.Node:
    """The 128x128 quantization whose outputs 0, 1 are this GEMM's b."""
    given = given_args(gemm)
    if given.get("trans_b", True) is not True:
        raise _Skip(f"{gemm.name} reads b as [K, N]")
    bq, bs = _item(given["b_q"]), _item(given["b_s"])
    if bq is None or bs is None or bq[0] is not bs[0] or (bq[1], bs[1]) != (0, 1) or \
            bq[0].target not in _WQUANT:
        raise _Skip(f"{gemm.name}'s b is not the 128x128 quantization of a weight")
    q = bq[0]
    if given_args(q).get("below") is not None:
        raise _Skip(f"{q.name} already quantizes two weights")
    return q


def _plane_readers(sel_q: list[fx.Node], sel_s: list[fx.Node]
                   ) -> tuple[list[fx.Node], list[fx.Node]]:
    """(dgrad GEMMs, scaling-aware transposes) reading a plane (q and s); _Skip otherwise."""
    dgrads, transposes = [], []
    for r in _readers(sel_q) | _readers(sel_s):
        given = given_args(r) if r.op == "call_function" and hasattr(r.target, "_schema") \
            else {}
        if r.target in _GEMMS and given["a_q"] in sel_q and given["a_s"] in sel_s:
            dgrads.append(r)
        elif r.target is ops.scaling_aware_transpose.default and given["q"] in sel_q and \
                given["s"] in sel_s:
            transposes.append(r)
        else:
            raise _Skip(f"a plane of the SwiGLU backward is read by {r.name}")
    return dgrads, transposes


def _same_but(a: fx.Node, b: fx.Node, names: tuple[str, ...]) -> bool:
    ga, gb = given_args(a), given_args(b)
    keys = (set(ga) | set(gb)) - set(names)
    return a.target is b.target and all(ga.get(k) is gb.get(k) or ga.get(k) == gb.get(k)
                                        for k in keys)


def _merge(gm: fx.GraphModule, ctx: Ctx, sw: fx.Node) -> str:
    given = given_args(sw)
    gate, up = given["h"], given["up"]
    for g in (gate, up):
        if not isinstance(g, fx.Node) or g.target not in _GEMMS:
            raise _Skip(f"{getattr(g, 'name', g)} is not an FP8 GEMM")
    if gate is up:
        raise _Skip("gate and up are one GEMM's output")
    if not _same_but(gate, up, ("b_q", "b_s")):
        raise _Skip("the two GEMMs differ in input, groups or output type")
    q1, q3 = _weight_quant(gate), _weight_quant(up)
    if q1.target is not q3.target:
        raise _Skip("the two weights are quantized in different forms")
    w1, w3 = q1.args[0], q3.args[0]
    v1, v3 = val(w1), val(w3)
    if v1.shape != v3.shape or v1.dtype != v3.dtype:
        raise _Skip(f"the weights differ in shape or dtype ({tuple(v1.shape)}, "
                    f"{tuple(v3.shape)})")
    inner = v1.shape[-2]
    if inner % TILE:
        raise _Skip(f"the gate width {inner} is not a multiple of {TILE}")
    out1, out3 = _outputs(q1), _outputs(q3)
    if _readers(out1.get(0, []) + out1.get(1, [])) != {gate} or \
            _readers(out3.get(0, []) + out3.get(1, [])) != {up}:
        raise _Skip("a weight's FP8 form has other readers")

    # the backward: the split SwiGLU backward reading the saved copy, or gate and up
    bwds = {u for u in _readers([gate, up]) if u is not sw}
    sw_out = _outputs(sw)
    bwds |= {u for i in (2, 3) for u in _readers(sw_out.get(i, []))}
    if any(u.target is not ops.swiglu_quant_backward.default for u in bwds) or len(bwds) > 1:
        raise _Skip("gate or up is read by more than the SwiGLU and its backward")
    bwd = next(iter(bwds), None)
    planes: list[tuple[list[fx.Node], list[fx.Node], list[fx.Node], list[fx.Node]]] = []
    combine = None
    if bwd is not None:
        gb = given_args(bwd)
        if gb.get("split") is not True:
            raise _Skip("the SwiGLU backward does not write two planes")
        reads_pair = gb["h"] is gate and gb.get("up") is up and gb.get("h_scales") is None
        reads_copy = (_item(gb["h"], sw) is not None and _item(gb["h"], sw)[1] == 2
                      and _item(gb.get("h_scales"), sw) is not None
                      and _item(gb.get("h_scales"), sw)[1] == 3 and gb.get("up") is None)
        if not (reads_pair or reads_copy):
            raise _Skip("the SwiGLU backward reads another form of gate and up")
        b_out = _outputs(bwd)
        sel: dict[tuple[int, int], list[fx.Node]] = {}
        for i in (0, 1):
            for s in b_out.get(i, []):
                for u in s.users:
                    if u.target is not aten.select.int or u.args[1] != 0:
                        raise _Skip(f"the SwiGLU backward's planes are read by {u.name}")
                    sel.setdefault((i, u.args[2]), []).append(u)
        for j, q in ((0, q1), (1, q3)):
            sq, ss = sel.get((0, j), []), sel.get((1, j), [])
            dgrads, transposes = _plane_readers(sq, ss)
            q_out = out1 if j == 0 else out3
            want_t = set(_readers(q_out.get(2, []) + q_out.get(3, [])))
            if set(dgrads) != want_t or len(dgrads) > 1 or len(transposes) > 1:
                raise _Skip("a plane's dgrad does not read its own weight's transposed copy "
                            "alone, or a plane has several dgrads or transposes")
            for d in dgrads:
                gd = given_args(d)
                if _item(gd["b_q"], q) != (q, 2) or _item(gd["b_s"], q) != (q, 3):
                    raise _Skip(f"{d.name} does not read {q.name}'s transposed copy")
            planes.append((sq, ss, dgrads, transposes))
        (_, _, d0, t0), (_, _, d1, t1) = planes
        if len(d0) != len(d1) or len(t0) != len(t1):
            raise _Skip("only one of d_gate and d_up has a dgrad or a transpose")
        if d0:
            if not _same_but(d0[0], d1[0], ("a_q", "a_s", "b_q", "b_s")):
                raise _Skip("the two dgrads differ in groups or output type")
            views = [_views(d0[0]), _views(d1[0])]
            ends = [v[-1] if v else d for v, d in zip(views, (d0[0], d1[0]))]
            readers = _readers(ends)
            combine = next(iter(readers)) if len(readers) == 1 else None
            if combine is None:
                raise _Skip("the two dgrads are not read by one node only")
            if combine.target is ops.index_add_rows.default:
                gc = given_args(combine)
                # with a row weight the op adds weight * src + src2: not the weighted sum
                if views[0] or views[1] or {gc["src"], gc.get("src2")} != set(ends) or \
                        gc.get("weight") is not None:
                    raise _Skip(f"{combine.name} does not add the two dgrads as its terms")
            elif combine.target is aten.add.Tensor:
                if set(combine.args[:2]) != set(ends) or len(combine.args) > 2 or \
                        combine.kwargs or val(ends[0]).shape != val(ends[1]).shape:
                    raise _Skip(f"{combine.name} is not the plain sum of the two dgrads")
            else:
                raise _Skip(f"the two dgrads are read by {combine.name}")
        if t0 and not _same_but(t0[0], t1[0], ("q", "s")):
            raise _Skip("the planes' transposes differ in groups or layout")
    elif any(out.get(i) for out in (out1, out3) for i in (2, 3)):
        raise _Skip("a weight's transposed copy is read with no SwiGLU backward")

    # -------- rewrite
    graph = gm.graph
    order = _order(gm)
    # before the later of the two: both weights are defined there
    with graph.inserting_before(max((q1, q3), key=order.__getitem__)):
        qs = call_multi(gm, q1.target, (w1, w3), len(val(q1)), name=f"q_{w1.name}_{w3.name}")
    with graph.inserting_before(sw):
        h = _call_like(gm, gate, {"b_q": qs[0], "b_s": qs[1]}, f"gate_up_{gate.name}")
        _host_offsets(gm, h)
        _rebuild(gm, sw, {"h": h, "up": None})
    _retarget(ctx, (gate, up), h, (_pname(ctx, w1), _pname(ctx, w3)))
    dead = [gate, up, q1, q3, sw]
    if bwd is not None:
        change = {"split": False}
        if given_args(bwd)["h"] is gate:
            change.update(h=h, up=None)
        with graph.inserting_before(bwd):
            new_bwd = _rebuild(gm, bwd, change, keep=(2,))
            dq = graph.call_function(operator.getitem, (new_bwd, 0))
            ds = graph.call_function(operator.getitem, (new_bwd, 1))
        dq.meta["val"], ds.meta["val"] = val(new_bwd)[0], val(new_bwd)[1]
        (sq0, ss0, d0, t0), (sq1, ss1, d1, t1) = planes
        dead += [bwd] + sq0 + ss0 + sq1 + ss1
        if d0:
            with graph.inserting_before(combine):
                d = _call_like(gm, d0[0], {"a_q": dq, "a_s": ds, "b_q": qs[2], "b_s": qs[3]},
                               f"dgrad_{h.name}")
                _host_offsets(gm, d)
            _retarget(ctx, (d0[0], d1[0]), d, (_pname(ctx, w1), _pname(ctx, w3)))
            if combine.target is ops.index_add_rows.default:
                set_arg(combine, "src", d)
                set_arg(combine, "src2", None)
            else:  # the sum, through the views the two dgrads went through
                with graph.inserting_before(combine):
                    for v in views[0]:
                        d = call(gm, v.target, (d, *v.args[1:]), dict(v.kwargs))
                combine.replace_all_uses_with(d)
                dead.append(combine)
            dead += [d0[0], d1[0]] + views[0] + views[1]
        if t0:
            with graph.inserting_before(min((t0[0], t1[0]), key=order.__getitem__)):
                tt = _call_like(gm, t0[0], {"q": dq, "s": ds}, f"t_{h.name}")
                outs = []
                for i in range(2):
                    g = graph.call_function(operator.getitem, (tt, i))
                    g.meta["val"] = val(tt)[i]
                    outs.append(g)
                for j, t in ((0, t0[0]), (1, t1[0])):
                    for i, src in enumerate(outs):
                        part = call(gm, aten.slice.Tensor, (src, 0, j * inner, (j + 1) * inner))
                        for g in _outputs(t).get(i, []):
                            g.replace_all_uses_with(part)
                    dead.append(t)
    _erase(gm, dead)
    done = ["one GEMM over both", "one SwiGLU backward output" if bwd is not None else None,
            "one dgrad" if bwd is not None and planes[0][2] else None,
            "one transpose for the two weight gradients"
            if bwd is not None and planes[0][3] else None]
    return (f"merge: {gate.name} and {up.name} (weights {_pname(ctx, w1)}, {_pname(ctx, w3)}) "
            f"-> {h.name}: " + ", ".join(x for x in done if x))


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _views(n: fx.Node) -> list[fx.Node]:
    """The chain of views that is n's only reader, its reader's only reader, and so on."""
    chain = []
    while len(n.users) == 1 and next(iter(n.users)).target in _VIEWS:
        n = next(iter(n.users))
        chain.append(n)
    return chain


def _names(n: fx.Node) -> list[str]:
    return [a.name for a in n.target._schema.arguments]


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _pname(ctx: Ctx, w: fx.Node) -> str:
    return ctx.params.get(w.name, (False, ""))[1] or w.name


def _retarget(ctx: Ctx, pair: tuple[fx.Node, fx.Node], merged: fx.Node,
              weights: tuple[str, str]) -> None:
    """The report's records of the two GEMMs name the merged call, each the other's weight."""
    for g in ctx.gemms:
        for j in (0, 1):
            if g.node is pair[j]:
                g.node, g.merged_with = merged, weights[1 - j]


def _host_offsets(gm: fx.GraphModule, n: fx.Node) -> None:
    """Give the grouped GEMM n the host copy of its group ends where, at its width, it may run
    as cuBLAS calls per group (insert_qdq decided that for each half-width GEMM; without the
    copy such a call would wait for the device to read the group ends)."""
    if n.target is not ops.grouped_gemm_fp8.default:
        return
    given = given_args(n)
    offs = given["offs"]
    if given.get("offs_host") is not None or \
            not insert_qdq.may_loop_on_host("grouped", given["a_q"], given["b_q"], offs):
        return
    cache = {u.args[0]: u for u in offs.users if u.target is ops.offsets_to_host.default}
    set_arg(n, "offs_host", insert_qdq.host_offsets(gm, offs, cache))


def _call_like(gm: fx.GraphModule, n: fx.Node, change: dict, name: str) -> fx.Node:
    """A call of n's op at the insertion point, n's arguments with those in `change` replaced
    (positional up to the first one n left out, keywords after), its fake value computed."""
    given = {**given_args(n), **change}
    args, kwargs = [], {}
    for k in _names(n):
        if k not in given:
            continue
        if len(args) == len(kwargs) == 0 or (not kwargs and len(args) == _names(n).index(k)):
            args.append(given[k])
        else:
            kwargs[k] = given[k]
    return call(gm, n.target, tuple(args), kwargs, name=name)


def _rebuild(gm: fx.GraphModule, n: fx.Node, change: dict, keep: tuple[int, ...] | None = None
             ) -> fx.Node:
    """_call_like(n) under n's name; n's getitem readers move to it (all of them, or those of
    the outputs in `keep`), with their fake values."""
    new = _call_like(gm, n, change, n.name)
    for u in list(n.users):
        if u.target is operator.getitem and (keep is None or u.args[1] in keep):
            u.replace_input_with(n, new)
            u.meta["val"] = val(new)[u.args[1]]
    return new


def _erase(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the nodes (and the getitems of the multi-output ones) once nothing reads them."""
    pending = list(dict.fromkeys(nodes))
    for n in list(pending):
        pending += [u for u in n.users if u.target is operator.getitem and u not in pending]
    while pending:
        progress = False
        for n in list(pending):
            if not n.users:
                gm.graph.erase_node(n)
                pending.remove(n)
                progress = True
        if not progress:
            raise AssertionError("merge_gate_up: nodes still read after the rewrite: "
                                 + ", ".join(f"{n.name} by {[u.name for u in n.users]}"
                                             for n in pending))


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    if not ctx.options.get("merge_gate_up", True):
        return gm
    changed = False
    for sw in list(gm.graph.nodes):
        if sw.op != "call_function" or sw.target not in _SWIGLU or \
                given_args(sw).get("up") is None:
            continue
        gate, up = given_args(sw)["h"], given_args(sw)["up"]
        if ctx.options.get("cache_weights", False):
            ctx.log.append(f"merge: {gate.name} and {up.name} kept apart: cache_weights keeps "
                           "each weight's FP8 forms on their own")
            continue
        try:
            ctx.log.append(_merge(gm, ctx, sw))
            changed = True
        except _Skip as why:
            ctx.log.append(f"merge: {gate.name} and {up.name} kept apart: {why}")
    if changed:
        finish(gm)
    return gm
