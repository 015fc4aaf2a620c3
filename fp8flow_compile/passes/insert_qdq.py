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

A grouped wgrad whose two operands are both quantized column-wise gets them in the aligned group
layout (`align` = the recipe's group_align, 16; kernels/groups.py): each expert group starts on a
16-token boundary, with zero tokens between groups, and the wgrad reads them with
`pad_offsets(offs, 16)` as its group ends. Zero tokens add nothing and change no scale, so
the result is the same; cuBLAS can then take every group's columns as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import cublas, gemm
from ..recipe import BLOCKWISE
from .graph import Ctx, after_made, call, call_multi, contiguous, finish, size_hint, strip, val

aten = torch.ops.aten
GROUP_ALIGN = BLOCKWISE.group_align
ops = torch.ops.fp8flow


def quantize(gm, target, x, offs, role, align: int = 1) -> tuple[fx.Node, fx.Node]:
    """(data, scales) of `target(x[, offs[, align]])` inserted here, tagged for the counters."""
    args = (x,) if target is ops.quantize_128x128.default else (x, offs)
    args += (align,) if align > 1 else ()
    q, s = call_multi(gm, target, args, 2, name=f"q_{x.name}")
    q.args[0].meta["fp8flow"] = {"role": role, "src": x}
    return q, s


def _col(x: fx.Node, of_t: bool) -> bool:
    """Whether quant_rows (of_t False) / quant_rows_of_t (True) quantizes x column-wise."""
    src, transposed = strip(x)
    return (transposed and val(src).dim() == 2) != of_t


def quant_rows(gm, x: fx.Node, offs=None, align: int = 1):
    """1x128 tiles along the last dim of the 2-D operand x (the contracted axis). align: the
    group layout of a column-wise form (kernels.groups); the row-wise form is never padded."""
    src, _ = strip(x)
    if _col(x, False):
        return quantize(gm, ops.quantize_1x128_col.default, contiguous(gm, src), offs, "act",
                        align)
    return quantize(gm, ops.quantize_1x128.default, contiguous(gm, x), offs, "act")


def quant_rows_of_t(gm, x: fx.Node, offs=None, align: int = 1):
    """1x128 tiles along dim 0 of the 2-D operand x, returned in the layout of x^T."""
    src, _ = strip(x)
    if _col(x, True):
        return quantize(gm, ops.quantize_1x128_col.default, contiguous(gm, x), offs, "act",
                        align)
    return quantize(gm, ops.quantize_1x128.default, contiguous(gm, src), offs, "act")


def padded_offsets(gm: fx.GraphModule, offs: fx.Node, align: int, cache: dict) -> fx.Node:
    """`pad_offsets(offs, align)`, one per offs and align, right after offs is made: the forward
    makes it (and its host copy) once per step, unless the partitioner recomputes it."""
    if (offs, align) not in cache:
        with after_made(gm, offs):
            cache[offs, align] = call(gm, ops.pad_offsets.default, (offs, align), name="offs_pad")
    return cache[offs, align]


def host_offsets(gm: fx.GraphModule, offs: fx.Node, cache: dict) -> fx.Node:
    """`offsets_to_host(offs)`, one per offs node, inserted right after offs is made."""
    if offs not in cache:
        with after_made(gm, offs):
            cache[offs] = call(gm, ops.offsets_to_host.default, (offs,), name="offs_host")
    return cache[offs]


def may_loop_on_host(kind: str, a: fx.Node, b: fx.Node, offs: fx.Node) -> bool:
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
    pads: dict = {}
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
                              if may_loop_on_host("grouped", aq, bq, g.offs) else None)
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
                # Column-wise operands are written in the aligned group layout (every group on
                # 16 tokens) when both are, read with the padded group ends: cuBLAS then needs
                # no zero-padded copy per group (kernels/cublas.py).
                align = (GROUP_ALIGN if _col(g.a, False) and _col(g.b, True) else 1)
                aq, as_ = quant_rows(gm, g.a, g.offs, align)
                bq, bs = quant_rows_of_t(gm, g.b, g.offs, align)
                offs = g.offs
                if align > 1:
                    offs = padded_offsets(gm, g.offs, align, pads)
                oh = (host_offsets(gm, offs, host)
                      if may_loop_on_host("grouped_wgrad", aq, bq, offs) else None)
                new = call(gm, ops.grouped_gemm_fp8_wgrad.default,
                           (aq, as_, bq, bs, offs, out_dtype, oh))
        new.meta["fp8flow"] = {"role": "gemm", "replaces": n.name}
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        g.node = new
    finish(gm)
    return gm
