"""align_groups: the expert rows re-laid with every group on a multiple of 128 rows.

The layer compiled with the pass against the same layer without it, bit for bit (output, input
gradient, every weight gradient), at skewed loads that put the groups off the 128 grid, one
expert empty; the maps against the aligned layout's reference (`groups.pad_groups`); what the
pass leaves alone and says why; "auto" on a machine without DeepGEMM changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from test_backend import _after_graph, compiled, fwd_bwd

import fp8flow_compile as ff
from fp8flow_compile.kernels import groups as G

ops = torch.ops.fp8flow


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("align", [16, 128])
def test_align_maps_are_the_aligned_layout(align):
    """src_row gathers exactly `pad_groups` (zero rows in the padding and tail), pos puts each
    row of a group back where pad_groups put it, -1 for rows past the last group; offs that go
    back (read as their running max), empty groups and ends past the rows included."""
    g = torch.Generator().manual_seed(align)
    for trial in range(200):
        E = int(torch.randint(1, 7, (1,), generator=g))
        rows = int(torch.randint(1, 300, (1,), generator=g))
        offs = torch.randint(-5, rows + 40, (E,), generator=g)
        if trial % 2:
            offs = offs.sort().values
        offs = offs.to(torch.int32)
        pos, src_row = ops.align_maps(offs, rows, align)
        assert pos.dtype == src_row.dtype == torch.int32
        assert src_row.shape[0] == G.aligned_width(rows, E, align)
        x = torch.arange(1, rows + 1, dtype=torch.float32).unsqueeze(1)
        want = G.pad_groups(x, offs, align)
        got = torch.where(src_row.unsqueeze(1) >= 0, x[src_row.clamp(min=0).long()], 0.0)
        assert torch.equal(got, want)
        ends = G._running_ends(offs)
        placed = pos >= 0
        assert torch.equal(placed, torch.arange(rows) < min(int(ends[-1]), rows)) or \
            not placed[torch.arange(rows) >= int(ends[-1])].any()
        assert torch.equal(want[pos[placed].long()], x[placed])
    torch.library.opcheck(ops.align_maps, (offs, rows, align),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_align_maps_kernel_is_the_reference():
    """The one-launch kernel (CUDA's path; here the interpreter) against the torch form."""
    g = torch.Generator().manual_seed(3)
    for trial in range(12):
        E = int(torch.randint(1, 40, (1,), generator=g))
        rows = int(torch.randint(0, 600, (1,), generator=g))
        offs = torch.randint(-5, rows + 40, (E,), generator=g)
        offs = (offs.sort().values if trial % 2 else offs).to(torch.int32)
        for align in (1, 16, 128):
            want = G.align_maps(offs, rows, align)
            got = G.align_maps_triton(offs, rows, align)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _layer(layout, options, routing="skewed", dims=(64, 256, 128, 8, 2)):
    from benchmarks.moe_layer import RoutedMoE, build, grad_w13, make_routing
    T, H, I, E, k = dims
    g = torch.Generator().manual_seed(1)
    topw, topi, loads = make_routing(routing, T, E, k, 16, 0, "cpu")
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    x, dy = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.bfloat16, layout)
    y, dx, _ = fwd_bwd(compiled(m, **options), x.bfloat16(), dy.bfloat16())
    rep = ff.last_report()
    log = [line for r in rep.records for line in r.log if line.startswith("align_groups")]
    return [y, dx, grad_w13(m), m.w2.grad], _after_graph()[1], log, loads


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op)


@pytest.mark.parametrize("layout,inner", [("stacked", "eager"), ("separate", "eager"),
                                          ("stacked", "inductor")])
def test_layer_is_the_same_bit_for_bit(layout, inner):
    """Loads in units of 16 (Zipf-like, one expert empty): the groups start off the 128 grid, so
    the pass moves rows; every result equals the unaligned graph's. The GEMMs read the aligned
    group ends, the transposes and wgrads the same groups, the combine and the backward of the
    token gather read their rows through pos."""
    want, _, log0, loads = _layer(layout, {"align_groups": 0, "inner": inner})
    assert log0 == []
    starts = torch.tensor([0] + loads[:-1]).cumsum(0)
    assert (starts % 128 != 0).any() and 0 in loads  # the case the pass is for
    got, gm, log, _ = _layer(layout, {"align_groups": 128, "inner": inner})
    for a, b in zip(got, want, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert len(log) == 1 and "every group on a multiple of 128 rows" in log[0], log
    assert _count(gm, ops.align_maps.default) == 1
    offs_al = [n for n in gm.graph.nodes if n.target is ops.pad_offsets.default
               and n.args[1] == 128]
    assert len(offs_al) == 1
    gemms = [n for n in gm.graph.nodes if n.target is ops.grouped_gemm_fp8.default]
    assert gemms and all(n.args[4] is offs_al[0] for n in gemms)
    wgrads = [n for n in gm.graph.nodes if n.target is ops.grouped_gemm_fp8_wgrad.default]
    assert wgrads and all(n.args[4] is offs_al[0] for n in wgrads)
    combines = [n for n in gm.graph.nodes if n.target is ops.index_add_rows.default]
    assert combines and all(n.kwargs.get("src_row") is not None for n in combines)
    # no group-ends tensor of the old layout is read by an fp8flow op any more
    pads16 = [n for n in gm.graph.nodes if n.target is ops.pad_offsets.default
              and n.args[1] == 16]
    assert pads16 == []


def test_balanced_loads_give_the_same_results_too():
    """Groups already on the grid: nothing moves but the static width; same bits."""
    want, _, _, _ = _layer("stacked", {"align_groups": 0, "inner": "eager"}, "balanced")
    got, _, log, _ = _layer("stacked", {"align_groups": 128, "inner": "eager"}, "balanced")
    assert len(log) == 1
    for a, b in zip(got, want, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_rows_read_by_another_op_leave_the_layer_alone():
    """With the routing weight left on the FC2 output (probs_in_swiglu=False), BF16 ops read the
    expert rows and make the FC2 dgrad's operand from them: the pass cannot take those through
    an index, so it leaves the layer as the router laid it out and says which node stopped it."""
    opts = {"probs_in_swiglu": False, "inner": "eager"}
    want, _, _, _ = _layer("stacked", {**opts, "align_groups": 0})
    got, gm, log, _ = _layer("stacked", {**opts, "align_groups": 128})
    assert len(log) == 1 and "left as it is: " in log[0], log
    assert "come from no gather" in log[0] or "reads the rows of" in log[0], log
    assert _count(gm, ops.align_maps.default) == 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_auto_without_deepgemm_changes_nothing():
    """On the CPU "auto" (the default) aligns nothing and says nothing."""
    _, gm, log, _ = _layer("stacked", {"inner": "eager"})
    assert log == [] and _count(gm, ops.align_maps.default) == 0


@pytest.mark.parametrize("bad", ["yes", -16, 2.5])
def test_bad_option(bad):
    # Dynamo wraps the backend's ValueError in BackendCompilerFailed.
    with pytest.raises((ValueError, torch._dynamo.exc.BackendCompilerFailed),
                       match="align_groups"):
        _layer("stacked", {"align_groups": bad})


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["stacked", "separate"])
def test_gpu_deepgemm_on_aligned_rows_is_the_cublas_loop_bit_for_bit(layout):
    """On Hopper with DeepGEMM: loads in units of 16 (off the 128 grid), compiled with the
    defaults ("auto": aligned, DeepGEMM runs the grouped GEMMs; every GEMM in FP8 at this small
    shape) against the same layer with
    DeepGEMM off (nothing aligned, the cuBLAS loop): the same bits everywhere."""
    from test_deepgemm import _real_deepgemm

    from benchmarks.moe_layer import RoutedMoE, build, grad_w13, make_routing
    from fp8flow_compile.kernels import deepgemm as DG
    if not _real_deepgemm():
        pytest.skip("needs DeepGEMM and a Hopper GPU")
    T, H, I, E, k = dims = (2048, 1024, 512, 8, 2)
    topw, topi, loads = make_routing("skewed", T, E, k, 16, 0, "cuda")
    assert (torch.tensor([0] + loads[:-1]).cumsum(0) % 128 != 0).any()
    g = torch.Generator().manual_seed(2)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    x = torch.randn(T, H, generator=g).cuda().bfloat16()
    dy = torch.randn(T, H, generator=g).cuda().bfloat16()
    res, logs = [], []
    for on in (True, False):
        DG.set_enabled(on)
        try:
            m = build(RoutedMoE, dims, w13.cuda(), w2.cuda(), topw, topi, torch.bfloat16,
                      layout)
            y, dx, _ = fwd_bwd(compiled(m, fp8_min_intensity=0), x, dy)
            torch.cuda.synchronize()
            res.append([y, dx, grad_w13(m), m.w2.grad])
            logs.append([line for r in ff.last_report().records for line in r.log
                         if line.startswith("align_groups")])
        finally:
            DG.set_enabled(True)
    assert len(logs[0]) == 1 and "multiple of 128 rows" in logs[0][0], logs[0]
    assert logs[1] and "turned off" in logs[1][0], logs[1]
    for a, b in zip(*res, strict=True):
        assert torch.equal(a, b)
