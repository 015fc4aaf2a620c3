"""Flow rewrite "gather": a scaling-aware transpose of gathered FP8 rows reads them through the
gather's index instead.

Expects: a graph after flow_probs (row gathers of FP8 data are `permute_pad_fp8` nodes, the
wgrad operands `scaling_aware_transpose` nodes). Runs before flow_recompute.
Guarantees: every `scaling_aware_transpose(q', s', offs, align)` whose q' and s' are the two
outputs of one `permute_pad_fp8(q, s, idx)` becomes `scaling_aware_transpose(q, s, offs, align,
idx)`: the same bytes and scales (the gather is a copy; kernels/transpose.py). A gather left with
no reader is dropped. Where the backward reads the transpose, the elementwise nodes that make idx
from graph inputs are marked for recompute, as flow_recompute marks them for a second gather.

Why: the FC1 wgrad needs the routed tokens column-wise. The backward used to gather the saved
FP8 tokens again (flow_recompute: keeping the gathered rows costs top-k times the memory) only
to transpose them, writing and reading the gathered rows once more (at the DeepSeek-V3 shard
65536 x 7168 bytes; on the H100 gather 0.22 ms + transpose 0.45 ms, against 0.36 ms for the
transpose through the index, which reads each token's row top-k times, mostly from L2). Where
the gathered rows have other readers (the output gradient's gather feeds the FC2 dgrad too)
the gather stays for them, and the transpose reads the same number of rows either way.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .flow_recompute import index_chain
from .graph import Ctx, finish, forward_required

ops = torch.ops.fp8flow


def _gather_outputs(q: fx.Node, s: fx.Node) -> fx.Node | None:
    """The permute_pad_fp8 node whose outputs 0 and 1 are q and s, if they are."""
    if q.target is not operator.getitem or s.target is not operator.getitem:
        return None
    p = q.args[0]
    if p is not s.args[0] or q.args[1] != 0 or s.args[1] != 1:
        return None
    if p.target is not ops.permute_pad_fp8.default or len(p.args) != 3 or p.kwargs:
        return None
    return p


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    fwd = forward_required(gm)
    changed = []
    for n in list(gm.graph.nodes):
        if n.target is not ops.scaling_aware_transpose.default or n.kwargs:
            continue
        args = list(n.args) + [None, 1, None][len(n.args) - 2:]
        q, s, offs, align, src_row = args
        if src_row is not None:
            continue
        p = _gather_outputs(q, s)
        if p is None:
            continue
        q0, s0, idx = p.args
        n.args = (q0, s0, offs, align, idx)
        changed.append((n, p))
        if n not in fwd:
            # The backward reads the index now: like flow_recompute's second gather, it makes
            # it again from the token index it keeps anyway (with a symbolic token count the
            # partitioner would otherwise keep an intermediate of flow_hoist's index wrap).
            for m in index_chain(idx):
                m.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    for n, p in changed:
        kept = any(o.target is not operator.getitem or o.users for o in p.users)
        ctx.log.append(f"gather: {n.name} (scaling_aware_transpose) reads the rows of {p.name} "
                       f"(permute_pad_fp8) through its index"
                       + ("" if kept else "; the gather is dropped"))
    if changed:
        finish(gm, dead_code=True)  # drops the gathers nothing reads any more
    return gm
