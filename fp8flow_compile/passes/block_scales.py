"""Block scales: the wgrad GEMMs read the scaling-aware transpose's scales as 128x128 blocks.

Expects: the flow's joint graph (after flow_recompute). Guarantees: every `gemm_fp8_wgrad` /
`grouped_gemm_fp8_wgrad` one of whose scale arguments is the scales output of a
`scaling_aware_transpose` (b's if both are) reads those scales in the block form
[rows / 128, T]: every 128th row, copied once per transpose. Nothing else changes.

Why this is exact: the transpose gives all 128 rows of a block the same scale per token tile
(kernels/transpose.py: sT[k, t] = sc for every k of the block), so the block form holds every
value the per-row form does. Why it pays: cuBLAS has no kernel that knows 1x128 scales to be
equal across rows; given the block form it runs the wgrad with the scaling pair of the fprop,
1x128 x 128x128, instead of 1x128 x 1x128. On the H100 (cuBLAS 13.1) that took a grouped FC1
wgrad of the DeepSeek-V3 shard from 838 to 1007 TFLOP/s, the same bits (kernels/cublaslt.py,
MODES). The Triton kernel and the reference read the block form by expanding it to rows.

Option `block_scales=False` keeps the per-row form (for comparisons).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..recipe import TILE
from .graph import Ctx, call, contiguous, finish, given_args, set_arg, val

ops = torch.ops.fp8flow
aten = torch.ops.aten
_WGRADS = (ops.gemm_fp8_wgrad.default, ops.grouped_gemm_fp8_wgrad.default)
_END = 2**63 - 1  # slice to the end, as traced graphs write it


def _transpose_scales(s) -> bool:
    """Whether s is the scales output (index 1) of a scaling_aware_transpose."""
    return (isinstance(s, fx.Node) and s.target is operator.getitem and s.args[1] == 1
            and isinstance(s.args[0], fx.Node)
            and s.args[0].target is ops.scaling_aware_transpose.default)


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    if not ctx.options.get("block_scales", True):
        return gm
    blocks: dict[fx.Node, fx.Node] = {}
    changed = False
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in _WGRADS:
            continue
        given = given_args(n)
        for name in ("b_s", "a_s"):
            s = given.get(name)
            if not _transpose_scales(s):
                continue
            blk = blocks.get(s)
            if blk is None:
                # before the first GEMM that reads it (nodes are visited in order, so it also
                # comes before every later reader)
                with gm.graph.inserting_before(n):
                    sl = call(gm, aten.slice.Tensor, (s, 0, 0, _END, TILE))
                    blk = blocks[s] = contiguous(gm, sl)
                blk.name = gm.graph._graph_namespace.create_name(f"{s.name}_blocks", None)
            set_arg(n, name, blk)
            changed = True
            rows = val(s).shape[0]
            ctx.log.append(f"block_scales: {n.name} reads {name} ({s.name}, {rows} rows) as "
                           f"{TILE}x{TILE} blocks")
            break
    if changed:
        finish(gm, dead_code=False)
    return gm
