"""Graph passes of the fp8flow backend, one module each with one entry `run(gm, ctx) -> gm`.

Order on the joint graph: find_gemms -> insert_qdq (the naive FP8 graph, counted) ->
flow_reuse -> flow_hoist -> flow_fuse -> dedupe (counted again) -> flow_save (the backward keeps
the SwiGLU input in FP8) -> flow_combine (the MoE combine's scatter-adds, no casts involved) ->
flow_probs (the routing weight moves into the SwiGLU; the FC2 output gradient is gathered in FP8) ->
flow_gather (transposes of gathered rows read them through the gather's index) ->
flow_recompute (the backward gathers FP8 rows again rather than keeping them) -> block_scales
(the wgrads read the transposes' scales as 128x128 blocks) -> merge_gate_up (gate and up
weights of their own: one FC1 GEMM over both, as for a stacked weight) -> align_groups (the
expert rows re-laid with every group on 128 rows where DeepGEMM runs the GEMMs); with the flow or
without, schedule (the forward issues the weight quantization while the host catches up), and
with the option `cache_weights`, cache_weights last (weight GEMMs read FP8 weights kept across
calls; after the cast counts, which still count the weight quantization).
"""

from __future__ import annotations

import copy

import torch.fx as fx

from . import (
    align_groups,
    block_scales,
    cache_weights,
    count,
    dedupe,
    find_gemms,
    flow_combine,
    flow_fuse,
    flow_gather,
    flow_hoist,
    flow_probs,
    flow_recompute,
    flow_reuse,
    flow_save,
    insert_qdq,
    merge_gate_up,
    schedule,
)
from .graph import Ctx, backward_nodes

FLOW = (flow_reuse, flow_hoist, flow_fuse, dedupe, flow_save, flow_combine, flow_probs,
        flow_gather, flow_recompute, block_scales, merge_gate_up, align_groups)


def _phase_counts(gm: fx.GraphModule, bwd: set) -> dict[str, dict[str, int]]:
    fwd = {n for n in gm.graph.nodes if n not in bwd}
    return {"forward": count.casts(gm, fwd), "backward": count.casts(gm, bwd)}


def run_joint(gm: fx.GraphModule, ctx: Ctx) -> dict:
    """Rewrite the joint graph in place; return the record the report is built from."""
    record = {"before": copy.deepcopy(gm)}
    find_gemms.run(gm, ctx)
    insert_qdq.run(gm, ctx)
    dedupe.run(gm, ctx)
    record["naive"] = copy.deepcopy(gm)
    record["casts_naive"] = _phase_counts(gm, backward_nodes(gm))
    if ctx.options.get("flow", True):
        for p in FLOW:
            p.run(gm, ctx)
    schedule.run(gm, ctx)
    record["after"] = gm
    bwd = backward_nodes(gm)
    record["casts_after"] = _phase_counts(gm, bwd)
    record["casts_by_module"] = count.by_module(gm, ctx.gemms, bwd)
    cache_weights.run(gm, ctx)
    return record
