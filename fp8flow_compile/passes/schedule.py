"""Scheduling: the forward quantizes the weights while the host is still catching up.

Expects: a joint graph after insert_qdq (and the flow passes, if on).
Guarantees: in a forward that copies group ends to the host (`offsets_to_host`), the first
weight quantization (`quantize_128x128_dual` / `quantize_128x128` of graph inputs) moves to the
start of the graph, and every later one whose inputs are made before the last preceding
`offsets_to_host` moves to right after it, in their order. Nothing else moves; data
dependencies are kept (a node only moves earlier, past nodes it does not read). Without a host
copy the order is left alone.

Why: an MoE forward reaches the compiled region with the GPU idle. The routing before it waits
on the device (`bincount`, or a `.tolist()` of the expert loads), and the grouped GEMMs read the
group ends on the host (`offsets_to_host`, waited for where the first grouped GEMM reads it).
Until the host has issued enough GPU work to run ahead, every op it launches runs on an idle GPU
and the GPU waits for each launch. The weight quantization is long device work that needs
nothing from the routing (1.5 + 0.7 ms at the DeepSeek-V3 shard on the H100): issued early, it
keeps the GPU busy while the host launches the routing's short ops, the copy and the
activation quantization and gather, and then waits on the copy. In its place before each GEMM
it ran after those short launches, each of which had found the GPU idle.
The order is a hint: Inductor keeps the order of these calls (opaque custom ops) in the
training graphs it compiles.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import Ctx, backward_nodes, finish

ops = torch.ops.fp8flow

_WEIGHT_QUANT = (ops.quantize_128x128_dual.default, ops.quantize_128x128.default)


#: Issue the first weight quantization at the start of the forward rather than after the host
#: copy (the others go after the copy either way): the GPU then works on it while the host
#: launches the routing ops and the copies, and the copy, queued behind it, is done by the
#: time the first grouped GEMM reads it, the rest of the weight quantization still queued.
FIRST_AT_START = True


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    bwd = backward_nodes(gm)
    if not any(n.target is ops.offsets_to_host.default for n in nodes if n not in bwd):
        return gm  # nothing waits on the host: leave the order alone
    start = None  # the last placeholder: the first weight quantization goes after it
    anchor = None
    moved = []
    for n in nodes:
        if n.op == "placeholder":
            start = n
        if n in bwd or n.op != "call_function":
            continue
        if n.target is ops.offsets_to_host.default:
            anchor = n
        elif n.target in _WEIGHT_QUANT:
            if FIRST_AT_START and not moved and start is not None and \
                    all(pos[i] <= pos[start] for i in n.all_input_nodes):
                start.append(n)
                moved.append(n.name)
            elif anchor is not None and all(pos[i] < pos[anchor] for i in n.all_input_nodes):
                anchor.append(n)  # moves n to right after the anchor
                anchor = n
                moved.append(n.name)
    if moved:
        ctx.log.append(f"schedule: weight quantization issued early: {', '.join(moved)}")
        finish(gm)
    return gm
