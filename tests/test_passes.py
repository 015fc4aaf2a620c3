"""Each pass on its own, on the small joint graphs of a MoE layer and an MLP.

The joint graph and the pass context are captured as the backend hands them to the passes;
each test then runs the passes up to the one under test on a copy and checks what that pass
guarantees in its docstring.
"""

import copy
import dataclasses
import operator

import pytest
import torch
from test_backend import FP8_REL, MLP, compiled, fwd_bwd, moe_setup, rel  # noqa: F401  (moe_setup: a fixture)

import fp8flow_compile as ff
from examples.moe import MoE
from fp8flow_compile import passes
from fp8flow_compile.passes import (
    count,
    dedupe,
    find_gemms,
    flow_fuse,
    flow_hoist,
    flow_reuse,
    insert_qdq,
)

ops = torch.ops.fp8flow
aten = torch.ops.aten


def capture(model, x, monkeypatch):
    """(joint graph, ctx) of every graph the backend compiles, before any pass runs."""
    got = []
    real = passes.run_joint

    def spy(gm, ctx):
        got.append((copy.deepcopy(gm), copy.deepcopy(ctx)))
        return real(gm, ctx)

    monkeypatch.setattr(passes, "run_joint", spy)
    compiled(model, inner="eager")(x.clone().requires_grad_(True)).float().sum().backward()
    return got


@pytest.fixture
def moe_joint(monkeypatch):
    torch.manual_seed(0)
    got = capture(MoE(256, 128, 4, 2), torch.randn(48, 256, dtype=torch.bfloat16), monkeypatch)
    # The layer breaks at bincount: the router graph, then the experts graph.
    return next((gm, ctx) for gm, ctx in got if any(
        n.target is aten._grouped_mm.default for n in gm.graph.nodes))


def upto(gm, ctx, *stages):
    # The decisions in ctx.gemms point at nodes of the graph they were made on: start afresh.
    gm, ctx = copy.deepcopy(gm), dataclasses.replace(ctx, gemms=[], log=[])
    for p in stages:
        p.run(gm, ctx)
    gm.graph.lint()
    return gm, ctx


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_find_gemms_classifies_every_gemm_and_leaves_the_graph(moe_joint):
    gm, ctx = moe_joint
    before = targets(gm)
    gm, ctx = upto(gm, ctx, find_gemms)
    assert targets(gm) == before  # decisions only
    kinds = sorted((g.phase, g.kind) for g in ctx.gemms)
    assert kinds == [("backward", "grouped"), ("backward", "grouped"),
                     ("backward", "grouped_wgrad"), ("backward", "grouped_wgrad"),
                     ("forward", "grouped"), ("forward", "grouped")]
    assert all(g.fp8 for g in ctx.gemms)
    # wgrads know their weight through the gradient outputs; fprop/dgrad read it as B
    assert sorted(g.weight for g in ctx.gemms) == ["w13"] * 3 + ["w2"] * 3
    assert sum(g.b_is_weight for g in ctx.gemms) == 4


def test_find_gemms_router_and_shape_reasons(monkeypatch):
    torch.manual_seed(0)
    got = capture(MoE(256, 128, 4, 2), torch.randn(48, 256, dtype=torch.bfloat16), monkeypatch)
    router = got[0]
    gm, ctx = upto(*router, find_gemms)
    assert ctx.gemms and all(not g.fp8 and "router" in g.reason for g in ctx.gemms)
    got = capture(MLP(d=200, h=96), torch.randn(16, 200, dtype=torch.bfloat16), monkeypatch)
    gm, ctx = upto(*got[0], find_gemms)
    reasons = [g.reason for g in ctx.gemms if not g.fp8]
    assert any("contracted dim 200 is not a multiple of 128" in r for r in reasons)


def test_insert_qdq_feeds_every_fp8_gemm_quantized_operands(moe_joint):
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq)
    assert not any(t is aten._grouped_mm.default for t in targets(gm))
    quant = {ops.quantize_1x128.default, ops.quantize_1x128_col.default,
             ops.quantize_128x128_dual.default}
    for n in gm.graph.nodes:
        if n.target in (ops.grouped_gemm_fp8.default, ops.grouped_gemm_fp8_wgrad.default):
            for arg in (n.args[0], n.args[2]):  # data operands: getitem of a quantize op
                assert arg.target is operator.getitem and arg.args[0].target in quant
    c = count.casts(gm)
    # before dedupe every GEMM quantizes its own operands: each weight twice (fprop, dgrad)
    assert c["act"] == 8 and c["weight"] == 4


def test_dedupe_leaves_one_quantization_per_tensor_and_axis(moe_joint):
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe)
    keys = [(n.target, n.args) for n in gm.graph.nodes
            if getattr(n.target, "namespace", None) == "fp8flow" and "quantize" in str(n.target)]
    assert len(keys) == len(set(keys))
    assert count.casts(gm) == {"act": 8, "weight": 2, "grouped_gemm_fp8": 4,
                               "grouped_gemm_fp8_wgrad": 2, "pad_offsets": 1}


def test_count_weight_casts_one_per_weight():
    """A weight quantization counts once per weight it reads: twice with `below` (two weights in
    one launch, merge_gate_up), once without, however the absent `below` is spelled."""
    import torch.fx as fx
    g = fx.Graph()
    w, w3 = g.placeholder("w"), g.placeholder("w3")
    for args, kwargs in (((w,), {}), ((w, None), {}), ((w,), {"below": None}),
                         ((w, w3), {}), ((w,), {"below": w3})):
        g.call_function(ops.quantize_128x128_dual.default, args, kwargs)
    g.output(None)
    assert count.casts(fx.GraphModule({}, g))["weight"] == 1 + 1 + 1 + 2 + 2


def test_reuse_replaces_every_column_quantization_by_a_transpose(moe_joint):
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, flow_reuse)
    t = targets(gm)
    assert ops.quantize_1x128_col.default not in t
    assert t.count(ops.scaling_aware_transpose.default) == 4
    for n in gm.graph.nodes:  # each transpose reads a row-wise form made from the same tensor
        if n.target is ops.scaling_aware_transpose.default:
            assert n.args[0].args[0].target is ops.quantize_1x128.default


def test_hoist_moves_the_token_gather_into_fp8(moe_joint):
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, flow_reuse, flow_hoist)
    perm = [n for n in gm.graph.nodes if n.target is ops.permute_pad_fp8.default]
    assert len(perm) == 1
    q = perm[0].args[0].args[0]  # getitem -> quantize of the ungathered input
    assert q.target is ops.quantize_1x128.default and q.args[0].op == "placeholder"
    for n in gm.graph.nodes:  # no quantization of a gathered tensor is left
        if n.target is ops.quantize_1x128.default:
            assert n.args[0].target is not aten.index.Tensor


def test_fuse_needs_a_swiglu_and_leaves_other_graphs_alone(moe_joint, monkeypatch):
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, flow_reuse, flow_hoist)
    fused, _ = upto(gm, ctx, flow_fuse)  # flow_fuse reads the graph only, not ctx.gemms
    t = targets(fused)
    assert t.count(ops.swiglu_quant.default) == 1
    assert t.count(ops.swiglu_quant_backward.default) == 1
    assert count.casts(fused)["act"] == 2
    got = capture(MLP(), torch.randn(16, 256, dtype=torch.bfloat16), monkeypatch)
    mlp, mctx = upto(*got[0], find_gemms, insert_qdq, dedupe, flow_reuse, flow_hoist)
    again, _ = upto(mlp, mctx, flow_fuse)
    assert targets(again) == targets(mlp)  # GELU MLP: nothing to fuse


def test_grouped_gemms_share_one_host_copy_of_offs(moe_joint, monkeypatch):
    from fp8flow_compile.kernels import cublas
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq)  # CPU shapes: nothing loops on the host
    assert ops.offsets_to_host.default not in targets(gm)
    monkeypatch.setattr(cublas, "may_choose", lambda *a, **k: True)
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, flow_reuse, flow_hoist, flow_fuse)
    host = [n for n in gm.graph.nodes if n.target is ops.offsets_to_host.default]
    grouped = [n for n in gm.graph.nodes if n.target in (ops.grouped_gemm_fp8.default,
                                                         ops.grouped_gemm_fp8_wgrad.default)]
    # one copy of the group ends (fprop, dgrad) and one of their aligned form (wgrads)
    assert len(host) == 2 and len(grouped) == 6
    order = list(gm.graph.nodes)
    for n in grouped:  # every grouped GEMM reads the one copy of its own offs
        fwd = n.target is ops.grouped_gemm_fp8.default
        offs, oh = (n.args[4], n.args[7]) if fwd else (n.args[4], n.args[6])
        assert oh in host and oh.args[0] is offs
        assert order.index(oh) < order.index(n)
        if not fwd:
            assert offs.target is ops.pad_offsets.default and offs.args[1] == 16


def test_schedule_issues_the_weight_quantization_after_the_host_copy(moe_joint, monkeypatch):
    from fp8flow_compile.kernels import cublas
    from fp8flow_compile.passes import schedule
    monkeypatch.setattr(cublas, "may_choose", lambda *a, **k: True)
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, *passes.FLOW)
    before = list(gm.graph.nodes)
    bwd = passes.backward_nodes(gm)
    wq = [n for n in before if n.target is ops.quantize_128x128_dual.default and n not in bwd]
    host = [n for n in before if n.target is ops.offsets_to_host.default and n not in bwd]
    assert len(wq) == 2 and len(host) == 2
    # in the graph as the flow leaves it, each weight is quantized right before its GEMM,
    # after the activation's quantization and gather
    first_act = next(n for n in before if n.target is ops.quantize_1x128.default)
    assert all(before.index(q) > before.index(first_act) for q in wq)
    out, octx = upto(gm, ctx, schedule)
    order = [n.name for n in out.graph.nodes]
    moved = [q.name for q in wq]
    # the first right after the inputs, the second right after the last host copy; both
    # before the activation's quantization
    phs = [n.name for n in out.graph.nodes if n.op == "placeholder"]
    assert order[len(phs)] == moved[0]
    i = order.index(max((h.name for h in host), key=order.index))
    assert order[i + 1] == moved[1]
    assert i + 1 < order.index(first_act.name)
    assert any("schedule:" in line for line in octx.log)
    # nothing else changed place relative to each other
    rest = [n for n in order if n not in moved]
    assert rest == [n.name for n in before if n.name not in moved]
    # with the first one left after the copies too: both right after the last copy
    monkeypatch.setattr(schedule, "FIRST_AT_START", False)
    late, _ = upto(gm, ctx, schedule)
    order = [n.name for n in late.graph.nodes]
    i = order.index(max((h.name for h in host), key=order.index))
    assert order[i + 1:i + 3] == moved
    # without a host copy (CPU shapes: nothing loops on the host) nothing moves
    monkeypatch.setattr(cublas, "may_choose", lambda *a, **k: False)
    plain, pctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, *passes.FLOW)
    again, _ = upto(plain, pctx, schedule)
    assert [n.name for n in again.graph.nodes] == [n.name for n in plain.graph.nodes]


def test_host_offs_is_copied_once_per_step_and_saved_for_backward(monkeypatch):
    from fp8flow_compile.kernels import cublas
    monkeypatch.setattr(cublas, "may_choose", lambda *a, **k: True)
    torch.manual_seed(0)
    m = MoE(256, 128, 4, 2)
    x = torch.randn(48, 256, dtype=torch.bfloat16)
    ref = m(x.clone().requires_grad_(True))
    cm = compiled(m, inner="inductor")
    cm(x.clone().requires_grad_(True)).float().sum().backward()  # compile
    xr = x.clone().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = cm(xr)
        y.float().sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("fp8flow::offsets_to_host") == 2  # offs and its aligned form
    assert names.count("fp8flow::grouped_gemm_fp8_wgrad") == 2  # the backward ran
    # FP8 error of the layer output (the flow tests bound it); the copy changes nothing there
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 0.1


def test_backward_reads_the_fp8_tokens_through_the_gather_index(monkeypatch):
    """The FC1 wgrad's transpose reads the saved FP8 tokens through the gather's index
    (flow_gather); without that pass the backward gathers them again (flow_recompute); without
    either it keeps the gathered rows. Gradients are bit-identical in all three; the first two
    keep the ungathered input (fewer FP8 bytes than its k-fold gather)."""
    from fp8flow_compile.passes import flow_gather, flow_recompute
    torch.manual_seed(0)
    m = MoE(256, 128, 4, 2)
    x = torch.randn(48, 256, dtype=torch.bfloat16)
    gy = torch.randn(48, 256, dtype=torch.bfloat16)

    def run():
        xr = x.clone().requires_grad_(True)
        mm = copy.deepcopy(m)
        y = compiled(mm, inner="inductor")(xr)
        y.backward(gy)
        rec = ff.last_report().records[-1]
        return (y, xr.grad, mm.w13.grad, mm.w2.grad), rec

    def fp8_saved(rec):
        return rec.saved_bytes["fp8flow"]["float8_e4m3fn"]

    via_index, rec = run()
    assert sum("through its index" in line for line in rec.log) == 2  # x and the output grad
    assert not any("gathered again in the backward" in line for line in rec.log)
    monkeypatch.setattr(flow_gather, "run", lambda gm, ctx: gm)
    regather, rec_rc = run()
    assert any("gathered again in the backward" in line for line in rec_rc.log)
    monkeypatch.setattr(flow_recompute, "run", lambda gm, ctx: gm)
    kept, rec0 = run()
    for a, b, c in zip(via_index, regather, kept):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert fp8_saved(rec) == fp8_saved(rec_rc)
    # [48, 256] bytes of x instead of its 2-fold gather [96, 256]: 12288 fewer
    assert fp8_saved(rec0) - fp8_saved(rec) == 48 * 256


def test_save_keeps_the_swiglu_input_in_fp8(moe_setup):  # noqa: F811  (the imported fixture)
    """The backward reads h from the FP8 copy swiglu_quant_save writes: the saved BF16 bytes drop
    by h's, the FP8 bytes grow by half of that, and gradients stay within FP8 error of float32
    (h's own rounding adds at most 2^-4 relative per element to the SwiGLU backward's input)."""
    ref, bf, x, gy = moe_setup
    _, dx32, g32 = fwd_bwd(ref, x, gy)

    def run(flag):
        out = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", fp8_swiglu_input=flag),
                      x.bfloat16(), gy.bfloat16())
        return out, ff.last_report().records[-1]

    (y, dx, g), rec = run(True)
    (y0, dx0, g0), rec0 = run(False)
    assert any(line.startswith("save: ") for line in rec.log)
    assert not any(line.startswith("save: ") for line in rec0.log)
    assert torch.equal(y, y0)  # the forward reads h itself either way
    after, before = rec.saved_bytes["fp8flow"], rec0.saved_bytes["fp8flow"]
    h_elems = x.shape[0] * bf.top_k * 2 * bf.inter
    assert before["bfloat16"] - after["bfloat16"] == 2 * h_elems
    assert after["float8_e4m3fn"] - before["float8_e4m3fn"] == h_elems
    assert after["float32"] - before["float32"] == 4 * h_elems // 128
    assert not torch.equal(g["w13"], g0["w13"])  # the backward really read the FP8 copy
    for got, want in ((dx, dx32), (g["w13"], g32["w13"]), (g["w2"], g32["w2"])):
        assert rel(got, want) < FP8_REL


def test_block_scales_hand_the_wgrads_the_transposes_scales_in_blocks(moe_joint, monkeypatch):
    """After the flow, every wgrad reads the b scales of a transpose in the 128x128-block form
    (every 128th row, one copy per transpose); `block_scales=False` keeps the per-row form.
    Compiled by Inductor both ways, the step's outputs and gradients are the same bits."""
    from fp8flow_compile.passes import FLOW, block_scales
    gm, ctx = upto(*moe_joint, find_gemms, insert_qdq, dedupe, *FLOW)
    wgrads = [n for n in gm.graph.nodes if n.target is ops.grouped_gemm_fp8_wgrad.default]
    assert len(wgrads) == 2
    for w in wgrads:
        names = [a.name for a in w.target._schema.arguments]
        given = dict(zip(names, w.args))
        blk = given["b_s"]
        # a contiguous copy of the slice, unless it has one row (then it is contiguous)
        sl = blk.args[0] if blk.target is aten.clone.default else blk
        assert sl.target is aten.slice.Tensor and sl.args[1:] == (0, 0, 2**63 - 1, 128)
        assert sl.args[0].args[0].target is ops.scaling_aware_transpose.default
        rows = given["b_q"].meta["val"].shape[0]
        assert tuple(blk.meta["val"].shape) == (rows // 128, sl.args[0].meta["val"].shape[1])
        # a's scales stay per row: cuBLAS takes one operand in blocks
        assert given["a_s"].args[0].target is ops.scaling_aware_transpose.default
    assert sum(line.startswith("block_scales:") for line in ctx.log) == 2
    assert aten.clone.default in [w.args[3].target for w in wgrads]  # H = 256: two blocks
    off, octx = upto(*moe_joint, find_gemms, insert_qdq, dedupe,
                     *FLOW[:FLOW.index(block_scales)])
    block_scales.run(off, dataclasses.replace(octx, options={"block_scales": False}))
    assert aten.slice.Tensor not in targets(off)

    torch.manual_seed(0)
    m = MoE(256, 128, 4, 2)
    x = torch.randn(48, 256, dtype=torch.bfloat16)
    gy = torch.randn(48, 256, dtype=torch.bfloat16)
    outs = []
    for on in (True, False):
        xr = x.clone().requires_grad_(True)
        mm = copy.deepcopy(m)
        y = compiled(mm, inner="inductor", block_scales=on)(xr)
        y.backward(gy)
        outs.append((y, xr.grad, mm.w13.grad, mm.w2.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_block_scales_reach_the_dense_wgrads_of_linear_layers():
    """The same for dense layers (gemm_fp8_wgrad): both wgrads of the MLP read their b scales
    in blocks, and the step's bits do not change."""
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    outs = []
    for on in (True, False):
        mm, xr = copy.deepcopy(m), x.clone().requires_grad_(True)
        compiled(mm, inner="inductor", block_scales=on)(xr).float().sum().backward()
        outs.append([xr.grad, *(p.grad for p in mm.parameters())])
        log = [line for r in ff.last_report().records for line in r.log]
        assert sum(line.startswith("block_scales: gemm_fp8_wgrad") for line in log) == \
            (2 if on else 0)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
