"""Flow rewrite "recompute": the backward gathers FP8 rows again instead of keeping them.

Expects: a graph after flow_hoist (row gathers of FP8 data are `permute_pad_fp8` nodes).
Guarantees: every forward `permute_pad_fp8(q, s, idx)` whose output the backward reads, and whose
output is larger than its inputs (a top-k gather repeats each token k times), is marked for
recompute (`meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE`, the tag activation checkpointing
uses): the partitioner then keeps q, s and idx for the backward, which gathers again, rather than
the gathered rows. At the DeepSeek-V3 shard the gathered input is 65536 x 7168 E4M3 bytes (448 MiB)
against 8192 x 7168 for the ungathered one (56 MiB); the second gather costs one pass over the
gathered bytes (about 0.3 ms on the H100). The values are bit-identical (the gather is a copy).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .graph import Ctx, forward_required, size_hint, val

aten = torch.ops.aten
prims = torch.ops.prims
ops = torch.ops.fp8flow


def _nbytes(v) -> int:
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, torch.Tensor):
        return size_hint(v.numel()) * v.element_size()
    return 0


def _fmt(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


_INDEX_OPS = {aten.lt.Scalar, aten.add.Tensor, aten.add.Scalar, aten.where.self,
              prims.convert_element_type.default}


def index_chain(idx: fx.Node) -> list[fx.Node]:
    """The elementwise nodes that make the gather's index from graph inputs (flow_hoist's
    wrap of negative indices and its int32 cast), or [] if it is made otherwise. They are
    recomputed with the gather, so the backward keeps the token index it needs anyway rather
    than one more index (which one the partitioner would keep differs between static and
    dynamic shapes)."""
    chain, todo = [], [idx]
    while todo:
        n = todo.pop()
        if n.op == "placeholder" or n in chain or n.target is aten.sym_size.int:
            continue  # a size (dynamic shapes) reaches the backward as a symbol, not a tensor
        if n.op != "call_function" or n.target not in _INDEX_OPS:
            return []
        chain.append(n)
        todo.extend(n.all_input_nodes)
    return chain


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    fwd = forward_required(gm)
    for n in gm.graph.nodes:
        if n.target is not ops.permute_pad_fp8.default or n not in fwd:
            continue
        outs = [u for u in n.users if u.target is operator.getitem]
        # read by the backward: by a node the forward outputs do not need (the transpose for a
        # wgrad, a dgrad), which the partitioner computes in the backward graph
        if not any(user not in fwd for o in outs for user in o.users):
            continue
        size_in = sum(_nbytes(val(a)) for a in n.args if isinstance(a, fx.Node))
        size_out = _nbytes(val(n))
        if size_out <= size_in:
            continue
        for m in (n, *outs, *index_chain(n.args[2])):
            m.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        ctx.log.append(f"recompute: {n.name} (permute_pad_fp8, {_fmt(size_out)} out from "
                       f"{_fmt(size_in)} in) is gathered again in the backward instead of saved")
    return gm
