"""merge_gate_up: gate and up GEMMs over weights of their own run as one GEMM over both.

The weight quantization of two weights (`below=`) is checked bit for bit against the
quantization of their concatenation; the layer with separate w1, w3 against the same layer with
the stacked w13 (the graphs the backend makes for the two are then the same ops on the same
bytes, but for the weight gradients, two GEMMs over the row halves of one transposed operand);
the dense Llama-style MLP against float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_backend import FP8_REL, _after_graph, compiled, fwd_bwd, rel
from test_flow_fuse import DenseMLP, TwoGemms, dense_against_fp32

import fp8flow_compile as ff
from fp8flow_compile.errors import Fp8Unsupported
from fp8flow_compile.kernels import quantize as Q
from fp8flow_compile.passes import insert_qdq
from fp8flow_compile.passes.graph import val

ops = torch.ops.fp8flow


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("lead,n1,n2,k", [((), 256, 128, 384), ((3,), 128, 128, 200),
                                          ((2,), 384, 96, 256)])
def test_quantize_with_below_is_the_quantization_of_the_concatenation(lead, n1, n2, k):
    g = torch.Generator().manual_seed(n1 + n2 + k)
    w = (torch.randn(*lead, n1, k, generator=g) * 0.05).bfloat16()
    below = (torch.randn(*lead, n2, k, generator=g) * 3.0).bfloat16()  # other block scales
    cat = torch.cat([w, below], -2)
    want = Q.quantize_128x128_dual_ref(cat)
    assert _same(Q.quantize_128x128_dual_ref(w, below), want)
    assert _same(Q.quantize_128x128_dual_triton(w, below), want)  # the interpreter
    assert _same(ops.quantize_128x128_dual(w, below), want)
    assert _same(Q.quantize_128x128_triton(w, below=below), Q.quantize_128x128_ref(cat))
    assert _same(ops.quantize_128x128(w, below), Q.quantize_128x128_ref(cat))


def test_quantize_with_below_rejects_what_it_cannot_stack():
    w = torch.randn(2, 200, 256).bfloat16()
    with pytest.raises(Fp8Unsupported, match="multiple of 128"):
        ops.quantize_128x128_dual(w, w)
    w = torch.randn(2, 128, 256).bfloat16()
    with pytest.raises(Fp8Unsupported, match="match w but in dim -2"):
        ops.quantize_128x128_dual(w, torch.randn(2, 128, 128).bfloat16())
    with pytest.raises(Fp8Unsupported, match="dtype"):
        ops.quantize_128x128_dual(w, w.float())


def _layer(layout, options, dims=(64, 256, 128, 4, 2)):
    from benchmarks.moe_layer import RoutedMoE, build, grad_w13, make_routing
    T, H, I, E, k = dims
    g = torch.Generator().manual_seed(0)
    topw, topi, _ = make_routing("skewed", T, E, k, 16, 0, "cpu")
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    x, dy = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.bfloat16, layout)
    y, dx, _ = fwd_bwd(compiled(m, inner="eager", **options), x.bfloat16(), dy.bfloat16())
    # the report object is cleared by the next compile: keep what the tests read
    rep = ff.last_report()
    return (y, dx, grad_w13(m), m.w2.grad), (_after_graph()[0],
                                               {**rep.summary(), "text": str(rep)})


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op)


def test_separate_gate_and_up_run_as_the_stacked_layer():
    stacked, (rec_s, _) = _layer("stacked", {})
    merged, (rec, s) = _layer("separate", {})
    apart, (rec_a, s_a) = _layer("separate", {"merge_gate_up": False})
    gm = rec.graphs["after"]
    log = "\n".join(rec.log)
    assert "merge:" in log and "one GEMM over both" in log and "kept apart" not in log, log
    # forward FC1 + FC2, backward FC2 dgrad + one FC1 dgrad; three wgrads (w1, w3, w2)
    assert _count(gm, ops.grouped_gemm_fp8.default) == 4
    assert _count(gm, ops.grouped_gemm_fp8_wgrad.default) == 3
    gm_s = rec_s.graphs["after"]
    assert _count(gm_s, ops.grouped_gemm_fp8.default) == 4
    assert _count(rec_a.graphs["after"], ops.grouped_gemm_fp8.default) == 6
    q = [n for n in gm.graph.nodes if n.target is ops.quantize_128x128_dual.default]
    assert sorted(len(n.args) for n in q) == [1, 2]  # w1 with w3 below it, and w2
    bwd = [n for n in gm.graph.nodes if n.target is ops.swiglu_quant_backward.default]
    assert len(bwd) == 1 and bwd[0].args[5] is False  # dh [P, 2I], not two planes
    adds = [n for n in gm.graph.nodes if n.target is ops.index_add_rows.default]
    assert all(n.kwargs.get("src2") is None for n in adds)  # one dgrad: no second term
    assert s["casts_after"] == 2 and s["gemms_fp8"] == 9, s
    # the report keeps one record per GEMM of the model, and counts the calls they run as
    assert s["gemm_calls_fp8"] == 7 and s_a["gemm_calls_fp8"] == s_a["gemms_fp8"] == 9, s_a
    assert "9 GEMMs in FP8 (run as 7 calls)" in s["text"], s["text"]
    assert s["text"].count("one call with") == 4 and "one call with" not in s_a["text"]
    # The stacked layer's graph on the same bytes: forward output, input gradient and w2's
    # gradient are the same ops on the same bytes, bit for bit; w13's gradient is one wgrad
    # there and two over the row halves of the same operand here, the same dot products.
    for name, a, b in zip(("y", "dx", "w13", "w2"), stacked, merged, strict=True):
        assert torch.equal(a, b), name
    # the two dgrads summed in the scatter round each to BF16 first: close, not equal
    assert rel(apart[1], stacked[1]) < 2 ** -7, rel(apart[1], stacked[1])
    assert torch.equal(apart[0], stacked[0]) and torch.equal(apart[2], stacked[2])


def test_merged_gemms_get_the_host_copy_of_the_group_ends(monkeypatch):
    """A GEMM twice as wide as the halves may run as cuBLAS calls per group where the halves
    would not (insert_qdq asked for each half): the merged forward GEMM and dgrad then read the
    group ends from the host copy, not through a device sync per call."""
    T, H, I, E, k = dims = (64, 384, 128, 4, 2)

    def only_merged(kind, a, b, offs):  # stands in for the size rule of the cuBLAS path
        return kind == "grouped" and 2 * I in val(b).shape

    monkeypatch.setattr(insert_qdq, "may_loop_on_host", only_merged)
    merged, (rec, _) = _layer("separate", {}, dims)
    gm = rec.graphs["after"]
    fc1 = [n for n in gm.graph.nodes if n.target is ops.grouped_gemm_fp8.default
           and 2 * I in val(n.args[2]).shape]
    assert len(fc1) == 2, [n.name for n in fc1]  # the forward GEMM and the dgrad
    for n in fc1:
        oh = n.args[7] if len(n.args) > 7 else n.kwargs.get("offs_host")
        assert oh is not None and oh.target is ops.offsets_to_host.default, n.format_node()
    monkeypatch.undo()
    stacked, _ = _layer("stacked", {}, dims)
    for name, a, b in zip(("y", "dx", "w13", "w2"), stacked, merged, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("act", ["silu", "swapped_sigmoid", "up_gated"])
def test_two_gemm_spellings_merge(act):
    """The SwiGLUs flow_fuse recognises over two GEMMs merge too; with up_gated the gate is the
    w3 GEMM, so the stacked weight is [w3; w1]. Against the same layer with merge_gate_up off:
    the forward and the weight gradients are the same bits, the input gradient within BF16
    rounding (the two dgrads were rounded to BF16 each before their sum)."""
    torch.manual_seed(0)
    m = TwoGemms(act)
    m = m.bfloat16()
    torch.manual_seed(1)
    x, gy = torch.randn(80, 256).bfloat16(), torch.randn(80, 256).bfloat16()
    outs, logs = [], []
    for on in (True, False):
        outs.append(fwd_bwd(compiled(copy.deepcopy(m), inner="eager", merge_gate_up=on), x, gy))
        logs.append([line for r in ff.last_report().records for line in r.log])
    assert any(line.startswith("merge:") and "one GEMM over both" in line for line in logs[0])
    assert not any(line.startswith("merge:") for line in logs[1])
    (y1, dx1, g1), (y2, dx2, g2) = outs
    assert torch.equal(y1, y2)
    for n in ("w1", "w3", "w2", "router.weight"):  # the router's through the SwiGLU's dprobs
        assert torch.equal(g1[n], g2[n]), n
    assert 0 < rel(dx1, dx2) < 2 ** -7


def test_a_frozen_up_weight_keeps_gate_and_up_apart():
    """Only d_gate's weight gradient is computed: the pattern is not the stacked layer's (one
    plane has a transpose, the other none); the pass says so and leaves the graph alone."""
    torch.manual_seed(0)
    ref = TwoGemms("silu", dtype=torch.float32)
    bf = copy.deepcopy(ref).bfloat16()
    for m in (ref, bf):
        m.w3.requires_grad_(False)
    torch.manual_seed(1)
    x, gy = torch.randn(80, 256), torch.randn(80, 256)
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    y, dx, g = fwd_bwd(compiled(bf, inner="eager"), x.bfloat16(), gy.bfloat16())
    assert "w3" not in g and rel(y, y32) < FP8_REL and rel(dx, dx32) < FP8_REL
    assert rel(g["w1"], g32["w1"]) < FP8_REL
    log = [line for r in ff.last_report().records for line in r.log]
    assert any("kept apart: only one of d_gate and d_up" in line for line in log), log


def test_cache_weights_keeps_gate_and_up_apart():
    _, (rec, _) = _layer("separate", {"cache_weights": True})
    log = "\n".join(rec.log)
    assert "kept apart: cache_weights" in log, log
    assert _count(rec.graphs["after"], ops.grouped_gemm_fp8.default) == 0  # all cached
    assert _count(rec.graphs["after"], ops.gemm_fp8_cached_weight.default) == 6


def test_dense_mlp_gate_and_up_merge():
    (y, dx, g), (x, gy) = dense_against_fp32(DenseMLP)
    rec = ff.last_report().records[0]
    gm = rec.graphs["after"]
    assert any("merge:" in line and "one dgrad" in line for line in rec.log), rec.log
    # FC1 and FC2 forward, FC2 dgrad and one FC1 dgrad; the input gradient is that GEMM's
    # output through the views the two dgrads went through (no add left)
    assert _count(gm, ops.gemm_fp8.default) == 4
    assert _count(gm, ops.gemm_fp8_wgrad.default) == 3
    assert _count(gm, torch.ops.aten.add.Tensor) == 0
    # against the same MLP with the two GEMMs kept: the forward is the same bytes
    torch.manual_seed(0)
    y2, dx2, g2 = fwd_bwd(compiled(DenseMLP().bfloat16(), inner="eager", merge_gate_up=False),
                          x.bfloat16(), gy.bfloat16())
    assert torch.equal(y, y2)
    assert torch.equal(g["gate_proj.weight"], g2["gate_proj.weight"])
    assert torch.equal(g["up_proj.weight"], g2["up_proj.weight"])
    assert rel(dx, dx2) < 2 ** -7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_separate_gate_and_up_match_the_stacked_layer():
    from benchmarks.moe_layer import RoutedMoE, build, grad_w13, make_routing
    T, H, I, E, k = dims = (512, 512, 256, 4, 2)
    g = torch.Generator().manual_seed(0)
    topw, topi, _ = make_routing("skewed", T, E, k, 16, 0, "cuda")
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).cuda()
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).cuda()
    x, dy = torch.randn(T, H, generator=g).cuda(), torch.randn(T, H, generator=g).cuda()
    out = {}
    for layout in ("stacked", "separate"):
        m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.bfloat16, layout)
        # fp8_min_intensity=0: these small GEMMs would stay BF16 by the size rule on CUDA
        y, dx, _ = fwd_bwd(compiled(m, fp8_min_intensity=0), x.bfloat16(), dy.bfloat16())
        out[layout] = (y, dx, grad_w13(m), m.w2.grad)
        rec = _after_graph()[0]
        if layout == "separate":
            assert any("merge:" in line for line in rec.log), rec.log
    # cuBLAS may pick other kernels for the halves' wgrads (other M): same products, fp32
    # accumulation in another order, so the gradients agree to BF16 rounding, not bit for bit
    for name, a, b in zip(("y", "dx", "w13", "w2"), out["stacked"], out["separate"],
                          strict=True):
        assert rel(b, a) < 2 ** -7, (name, rel(b, a))
