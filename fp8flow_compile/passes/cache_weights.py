"""Cache weights (option ``cache_weights``): the weight GEMMs read FP8 weights kept across calls.

Expects: a joint graph after insert_qdq (and the flow passes and schedule, if on).
Guarantees: every `quantize_128x128_dual(w)` of a parameter `w` whose four outputs feed only the
b operand of `gemm_fp8` / `grouped_gemm_fp8` is gone; each of those GEMMs is replaced by
`gemm_fp8_cached_weight(a_q, a_s, w, transposed_copy, ...)` (the GEMM's other arguments, and
`ready`), which takes the FP8 forms from kernels/weight_cache.py (quantized when w is new or has
changed since).
In the quantization's place (where the schedule pass put it) goes `ready = weight_cache_fill(w)`,
which the forward's GEMMs take: after an optimizer step the weight is quantized there, early,
as the uncached graph does, not inside the first GEMM. A weight whose FP8 forms have another
reader keeps its quantization node; the log says why.

The backward's dgrad then reads w itself, which the partitioner passes to the backward for free
(a graph input), instead of an FP8 copy the forward saved. The cast counters run before this
pass: the weight quantization still happens, once per change of the weight rather than once per
call, and is counted as it was.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import Ctx, backward_nodes, call, finish, given_args

ops = torch.ops.fp8flow
_GEMMS = (ops.gemm_fp8.default, ops.grouped_gemm_fp8.default)


def _readers(q: fx.Node) -> list[tuple[fx.Node, bool, dict]] | None:
    """[(gemm, transposed_copy, its arguments)] reading the dual quantization q's outputs as
    their b operand (trans_b True), or None if any output has another reader."""
    index: dict[fx.Node, int] = {}  # getitem node -> output index (duplicates allowed)
    for u in q.users:
        if u.target is not operator.getitem:
            return None
        index[u] = u.args[1]
    found: dict[fx.Node, tuple[bool, dict]] = {}
    for g in index:
        for r in g.users:
            if r.target not in _GEMMS:
                return None
            given = given_args(r)
            pair = (index.get(given.get("b_q")), index.get(given.get("b_s")))
            if pair not in ((0, 1), (2, 3)):
                return None
            rest = [v for k, v in given.items() if k not in ("b_q", "b_s")]
            if any(isinstance(a, fx.Node) and a in index for a in rest) or \
                    given.get("trans_b", True) is not True:
                return None  # also read as another operand, or b not read as [.., N, K]
            found[r] = (pair == (2, 3), given)
    return [(r, tcopy, given) for r, (tcopy, given) in found.items()]


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    if not ctx.options.get("cache_weights", False):
        return gm
    done = []
    bwd = backward_nodes(gm)
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target is not ops.quantize_128x128_dual.default:
            continue
        w = q.args[0]
        is_param, pname = ctx.params.get(w.name, (False, ""))
        name = pname or str(w)
        if given_args(q).get("below") is not None:
            ctx.log.append(f"cache_weights: {name} is quantized with another weight below it; "
                           "quantized every call")
            continue
        if not (w.op == "placeholder" and is_param):
            ctx.log.append(f"cache_weights: {name} is not a parameter; quantized every call")
            continue
        readers = _readers(q)
        if readers is None:
            ctx.log.append(f"cache_weights: {name}'s FP8 forms have readers other than GEMMs; "
                           "quantized every call")
            continue
        # The fill takes the quantization's place (the schedule's: early in the forward), so
        # that a call after an optimizer step quantizes there rather than inside its first GEMM.
        with gm.graph.inserting_before(q):
            fill = call(gm, ops.weight_cache_fill.default, (w,), name=f"fill_{w.name}")
        fill_used = False
        for r, tcopy, given in readers:
            # offs (grouped only), out_dtype and offs_host as the GEMM had them; the cached
            # op's defaults are the GEMMs' own
            kwargs = {k: v for k, v in given.items() if k in ("offs", "out_dtype", "offs_host")}
            kwargs["ready"] = None if r in bwd else fill
            fill_used |= kwargs["ready"] is not None
            with gm.graph.inserting_before(r):
                new = call(gm, ops.gemm_fp8_cached_weight.default,
                           (given["a_q"], given["a_s"], w, tcopy), kwargs)
            new.meta["fp8flow"] = dict(r.meta.get("fp8flow", {}), cached_weight=name)
            r.replace_all_uses_with(new)
            for g in ctx.gemms:
                if g.node is r:
                    g.node = new
            gm.graph.erase_node(r)
        for g in list(q.users):
            gm.graph.erase_node(g)
        gm.graph.erase_node(q)
        if not fill_used:  # read by the backward only (the forward had no use for w's FP8)
            gm.graph.erase_node(fill)
        done.append(name)
    if done:
        ctx.log.append("cache_weights: FP8 forms kept across calls, quantized again when the "
                       f"parameter changes: {', '.join(done)}")
        finish(gm)
    return gm
