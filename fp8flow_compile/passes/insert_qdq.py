"""Insert Q/DQ: the naive FP8 graph, as TransformerEngine's blockwise recipe runs it.

Expects: `ctx.gemms` from find_gemms. Guarantees: every GEMM marked fp8 is replaced by an
fp8flow GEMM whose operands are quantized from their high-precision values on the axis that
GEMM contracts: activations and gradients in 1x128 tiles (`quantize_1x128` when the contracted
axis is the tensor's last dim, `quantize_1x128_col` when it is dim 0, i.e. the GEMM reads a
transposed view), weights in 128x128 blocks (`quantize_128x128` of the parameter itself; its
blocks serve the fprop orientation and the dgrad orientation alike; `quantize_128x128_dual`
writes them once more transposed for the dgrad). Quantize nodes carry
`meta["fp8flow"] = {"role": "act" | "weight", "src": node}` for the counters.

Grouped GEMMs that may loop over their groups on the host (cuBLAS per group, see
kernels/cublas.py; decided here from the shapes) also get `offsets_to_host(offs)`: one CPU copy
of the group ends per offs, started right where offs is made without waiting, shared by the
forward and (saved) by the backward, so a step copies offs once instead of synchronising once per
grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import cublas, gemm
from .graph import Ctx, call, call_multi, contiguous, size_hint, strip, val

aten = torch.ops.aten
ops = torch.ops.fp8flow


def quantize(gm, target, x, offs, role) -> tuple[fx.Node, fx.Node]:
    """(data, scales) of `target(x[, offs])` inserted here, tagged for the counters."""
    args = (x,) if target is ops.quantize_128x128.default else (x, offs)
    q, s = call_multi(gm, target, args, 2, name=f"q_{x.name}")
    q.args[0].meta["fp8flow"] = {"role": role, "src": x}
    return q, s


def quant_rows(gm, x: fx.Node, offs=None):
    """1x128 tiles along the last dim of the 2-D operand x (the contracted axis)."""
    src, transposed = strip(x)
    if transposed and val(src).dim() == 2:
        return quantize(gm, ops.quantize_1x128_col.default, contiguous(gm, src), offs, "act")
    return quantize(gm, ops.quantize_1x128.default, contiguous(gm, x), offs, "act")


def quant_rows_of_t(gm, x: fx.Node, offs=None):
    """1x128 tiles along dim 0 of the 2-D operand x, returned in the layout of x^T."""
    src, transposed = strip(x)
    if transposed and val(src).dim() == 2:
        return quantize(gm, ops.quantize_1x128.default, contiguous(gm, src), offs, "act")
    return quantize(gm, ops.quantize_1x128_col.default, contiguous(gm, x), offs, "act")


def host_offsets(gm: fx.GraphModule, offs: fx.Node, cache: dict) -> fx.Node:
    """`offsets_to_host(offs)`, one per offs node, inserted right after offs is made."""
    if offs not in cache:
        if offs.op == "placeholder":
            at = next(n for n in gm.graph.nodes if n.op != "placeholder")
            ctxm = gm.graph.inserting_before(at)
        else:
            ctxm = gm.graph.inserting_after(offs)
        with ctxm:
            cache[offs] = call(gm, ops.offsets_to_host.default, (offs,), name="offs_host")
    return cache[offs]


def _may_loop_on_host(kind: str, a: fx.Node, b: fx.Node, offs: fx.Node) -> bool:
    """Whether the grouped GEMM may run as cuBLAS calls per group (shapes and backend only)."""
    av, bv, ov = val(a), val(b), val(offs)
    groups = size_hint(ov.shape[0])
    if kind == "grouped":
        dims, work, tiles = gemm.grouped_fwd_sizes(size_hint(av.shape[0]),
                                                   [size_hint(d) for d in bv.shape], True,
                                                   groups)
        return cublas.may_choose(ov.device, "fwd", dims, work, tiles)
    dims, work = gemm.grouped_wgrad_sizes(size_hint(av.shape[0]), size_hint(av.shape[1]),
                                          size_hint(bv.shape[0]), groups)
    return cublas.may_choose(ov.device, "wgrad", dims, work)


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    host: dict = {}
    for g in ctx.gemms:
        if not g.fp8:
            continue
        n = g.node
        out_dtype = val(n).dtype
        with gm.graph.inserting_before(n):
            if g.kind in ("mm", "addmm", "grouped"):
                aq, as_ = quant_rows(gm, g.a, None)
                if g.b_is_weight:
                    w, transposed = strip(g.b)
                    wq, ws, wqt, wst = call_multi(gm, ops.quantize_128x128_dual.default, (w,),
                                                  4, name=f"q_{w.name}")
                    wq.args[0].meta["fp8flow"] = {"role": "weight", "src": w}
                    # b = W^T reads W [N, K] as stored; b = W contracts W's first dim and reads
                    # the transposed copy, so the tensor cores always get B K-major.
                    bq, bs = (wq, ws) if transposed else (wqt, wst)
                    if g.kind == "grouped":
                        oh = (host_offsets(gm, g.offs, host)
                              if _may_loop_on_host("grouped", aq, bq, g.offs) else None)
                        new = call(gm, ops.grouped_gemm_fp8.default,
                                   (aq, as_, bq, bs, g.offs, True, out_dtype, oh))
                    else:
                        new = call(gm, ops.gemm_fp8.default, (aq, as_, bq, bs, True, out_dtype))
                else:
                    bq, bs = quant_rows_of_t(gm, g.b, None)
                    new = call(gm, ops.gemm_fp8_wgrad.default, (aq, as_, bq, bs, out_dtype))
                if g.kind == "addmm":
                    new = call(gm, aten.add.Tensor, (new, n.args[0]))
            else:  # grouped_wgrad: out[e] = A_e @ B_e, contracted over the grouped token axis
                aq, as_ = quant_rows(gm, g.a, g.offs)
                bq, bs = quant_rows_of_t(gm, g.b, g.offs)
                oh = (host_offsets(gm, g.offs, host)
                      if _may_loop_on_host("grouped_wgrad", aq, bq, g.offs) else None)
                new = call(gm, ops.grouped_gemm_fp8_wgrad.default,
                           (aq, as_, bq, bs, g.offs, out_dtype, oh))
        new.meta["fp8flow"] = {"role": "gemm", "replaces": n.name}
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        g.node = new
    gm.graph.lint()
    gm.recompile()
    return gm
