"""The fp8flow backend end to end on CPU: capture, rewrite, report, numerics."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import fp8flow_compile as ff
from examples.moe import MoE
from fp8flow_compile.backend import fp8flow

# Relative Frobenius error of an FP8 layer against float32: each GEMM operand carries E4M3
# rounding (RMS 2^-4/sqrt(3) ~ 0.036 relative), two chained GEMMs and the SwiGLU give ~0.07
# (measured 0.065 for the hand-wired flow); 0.12 leaves room for tails, while a wrong route,
# scale or missing rows gives errors of order 1.
FP8_REL = 0.12


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fwd_bwd(model, x, gy):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(gy)
    return y.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad.clone()
                                for n, p in model.named_parameters() if p.grad is not None}


def compiled(model, **options):
    torch._dynamo.reset()
    ff.last_report().records.clear()
    return torch.compile(model, backend=fp8flow, options=options)


@pytest.fixture
def moe_setup():
    torch.manual_seed(0)
    H, I, E, k, T = 256, 128, 4, 2, 96
    ref = MoE(H, I, E, k, dtype=torch.float32)
    bf = MoE(H, I, E, k)
    bf.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    x, gy = torch.randn(T, H), torch.randn(T, H)
    return ref, bf, x, gy


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_moe_layer_flow_numerics_and_casts(moe_setup, inner):
    ref, bf, x, gy = moe_setup
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), inner=inner), x.bfloat16(), gy.bfloat16())
    s = ff.last_report().summary()
    assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    for n in ("w13", "w2", "router.weight"):
        assert rel(gf[n], g32[n]) < FP8_REL, n
    # Naive blockwise: X, A = SwiGLU(H), dY, dH each quantized row- and column-wise = 8 casts.
    # The flow replaces the four column-wise ones with scaling-aware transposes, moves the
    # quantization of X above the token gather and fuses A's and dH's into the SwiGLU ops: what
    # is left is the MoE input in forward and the output gradient in backward.
    assert s["casts_before"] == 8
    assert s["casts_after"] == 2
    rec = ff.last_report().records[-1]
    assert rec.casts_after["forward"]["act"] == 1 and rec.casts_after["backward"]["act"] == 1
    # the fused SwiGLU also writes h in FP8 for the backward (flow_save)
    assert rec.casts_after["forward"].get("swiglu_quant_save") == 1
    assert rec.casts_after["backward"].get("swiglu_quant_backward") == 1
    assert s["gemms_fp8"] == 6  # fprop, dgrad, wgrad of the two expert GEMMs
    assert s["gemms_bf16"] == 3  # the router: forward, dgrad, wgrad
    rec = ff.last_report().records[-1]
    assert any("router" in g["reason"] for r in ff.last_report().records for g in r.gemms
               if not g["fp8"])
    # The backward consumes FP8 saved activations, and saves less than the BF16 graph.
    assert rec.saved_bytes["fp8flow"].get("float8_e4m3fn", 0) > 0
    assert s["saved_activation_bytes"] < s["saved_activation_bytes_bf16"]


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_gpu_moe_layer_flow_matches_float32(gemm):
    """The canonical layer compiled by the backend (Inductor) on the GPU, every expert GEMM in
    FP8 (fp8_min_intensity=0: at this size the default keeps them BF16), on either GEMM
    backend ("cublas" runs its per-group loop where the shapes allow it, Triton elsewhere):
    output and gradients within FP8 error of float32, the flow's casts, and both wgrad
    transposes reading their rows through the gather's index."""
    torch.manual_seed(0)
    H, I, E, k, T = 512, 256, 8, 2, 512
    ref = MoE(H, I, E, k, dtype=torch.float32, device="cuda")
    bf = MoE(H, I, E, k, device="cuda")
    bf.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    x, gy = torch.randn(T, H, device="cuda"), torch.randn(T, H, device="cuda")
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    before = ff.gemm_backend()
    ff.set_gemm_backend(gemm)
    try:
        yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), fp8_min_intensity=0), x.bfloat16(),
                              gy.bfloat16())
        torch.cuda.synchronize()
    finally:
        ff.set_gemm_backend(before)
    assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    for n in ("w13", "w2"):
        assert rel(gf[n], g32[n]) < FP8_REL, n
    s = ff.last_report().summary()
    assert s["casts_after"] == 2 and s["gemms_fp8"] == 6
    rec = ff.last_report().records[-1]
    assert sum("through its index" in line for line in rec.log) == 2


def test_naive_mode_runs_and_flow_is_as_accurate(moe_setup):
    ref, bf, x, gy = moe_setup
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yn, dxn, gn = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", flow=False),
                          x.bfloat16(), gy.bfloat16())
    sn = ff.last_report().summary()
    assert sn["casts_before"] == sn["casts_after"] == 8
    yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", fp8_swiglu_input=False),
                          x.bfloat16(), gy.bfloat16())
    assert rel(yn, y32) < FP8_REL
    # The flow rounds each tensor once (the transpose moves exponents exactly), like the naive
    # graph does; allow 10% for which elements happen to round which way.
    assert rel(yf, y32) <= 1.1 * rel(yn, y32)
    assert rel(dxf, dx32) <= 1.1 * rel(dxn, dx32)
    assert rel(gf["w13"], g32["w13"]) <= 1.1 * rel(gn["w13"], g32["w13"])
    # By default the backward reads h from its FP8 copy: one more E4M3 rounding (RMS 2^-4/sqrt(3)
    # relative) on the input of the SwiGLU backward, independent of the others, so it adds in
    # quadrature to the gradients below it; the forward is untouched.
    ys, dxs, gs = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager"), x.bfloat16(),
                          gy.bfloat16())
    assert torch.equal(ys, yf)
    one = 2.0**-4 / 3**0.5
    for got, naive, want in ((dxs, dxn, dx32), (gs["w13"], gn["w13"], g32["w13"])):
        assert rel(got, want) <= ((1.1 * rel(naive, want))**2 + one**2)**0.5


class MLP(nn.Module):
    def __init__(self, d=256, h=384, dtype=torch.bfloat16):
        super().__init__()
        self.up = nn.Linear(d, h, dtype=dtype)
        self.down = nn.Linear(h, d, bias=False, dtype=dtype)

    def forward(self, x):
        # A smooth activation: with ReLU the rounding of h flips the gradient mask near zero,
        # and even BF16 lands at 10x its forward error in dx (measured 0.037 vs 0.0036).
        return self.down(nn.functional.gelu(self.up(x)))


def test_dense_linear_layers_go_to_fp8():
    torch.manual_seed(1)
    ref = MLP(dtype=torch.float32)
    m = MLP()
    m.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    x, gy = torch.randn(64, 256), torch.randn(64, 256)
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yf, dxf, gf = fwd_bwd(compiled(m, inner="eager"), x.bfloat16(), gy.bfloat16())
    s = ff.last_report().summary()
    assert s["gemms_fp8"] >= 5 and s["casts_after"] < s["casts_before"]
    assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    assert rel(gf["up.weight"], g32["up.weight"]) < FP8_REL
    assert rel(gf["down.weight"], g32["down.weight"]) < FP8_REL


def test_unsupported_shapes_and_dtypes_stay_bf16_with_reasons():
    torch.manual_seed(2)
    m = MLP(d=200, h=96)  # contracted dims 200 and 96: not multiples of 128
    x = torch.randn(32, 200, dtype=torch.bfloat16)
    y = compiled(m, inner="eager")(x)
    s = ff.last_report().summary()
    reasons = [g["reason"] for r in ff.last_report().records for g in r.gemms if not g["fp8"]]
    assert any("not a multiple of 128" in r for r in reasons)
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)  # BF16 GEMMs: bit-identical
    m32 = MLP(dtype=torch.float32)
    x32 = torch.randn(32, 256)
    y32 = compiled(m32, inner="eager")(x32)
    s = ff.last_report().summary()
    assert s["gemms_fp8"] == 0 and s["casts_after"] == 0
    assert "float32" in str(ff.last_report())
    torch.testing.assert_close(y32, m32(x32))


def test_small_weights_stay_bf16_by_intensity(moe_setup):
    """A weight goes to FP8 only where 1 / (1/M + 1/K + 1/N) of its forward GEMM reaches
    options["fp8_min_intensity"]. Here P = 96 x 2 rows over 4 groups, M = 48: w13 (K 256,
    N 256) has 35.6, w2 (K 128, N 256) 31.0; a threshold between them splits the two."""
    from fp8flow_compile.passes.find_gemms import MIN_INTENSITY_CUDA, min_intensity
    ref, bf, x, gy = moe_setup
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", fp8_min_intensity=33.0),
                          x.bfloat16(), gy.bfloat16())
    gemms = [g for r in ff.last_report().records for g in r.gemms]
    by_weight = {w: {g["fp8"] for g in gemms if g["weight"] == w} for w in ("w13", "w2")}
    assert by_weight == {"w13": {True}, "w2": {False}}
    why = {g["reason"] for g in gemms if g["weight"] == "w2"}
    assert len(why) == 1 and "intensity 31 " in why.pop()
    assert rel(yf, y32) < FP8_REL and rel(gf["w2"], g32["w2"]) < FP8_REL

    # Above every GEMM: the layer is BF16 throughout; its error is BF16's, not FP8's.
    yb, dxb, gb = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", fp8_min_intensity=1e6),
                          x.bfloat16(), gy.bfloat16())
    s = ff.last_report().summary()
    assert s["gemms_fp8"] == 0 and s["casts_after"] == 0
    # BF16 rounding of inputs, weights and two GEMM outputs: ~2^-8 each, ~1e-2 together;
    # FP8 here measures 6e-2.
    assert rel(yb, y32) < 2e-2 and rel(dxb, dx32) < 2e-2
    assert min_intensity({}, torch.device("cuda")) == MIN_INTENSITY_CUDA
    assert min_intensity({}, torch.device("cpu")) == 0.0
    for bad in (-1, "big", True):
        # Dynamo wraps the backend's ValueError in BackendCompilerFailed.
        with pytest.raises((ValueError, torch._dynamo.exc.BackendCompilerFailed),
                           match="fp8_min_intensity"):
            compiled(copy.deepcopy(bf), fp8_min_intensity=bad)(x.bfloat16())


def test_report_renders_text_and_html(tmp_path, moe_setup):
    _, bf, x, _ = moe_setup
    rep = ff.explain(bf, x.bfloat16())
    text = str(rep)
    assert "FP8" in text and "casts" in text
    path = rep.save_html(str(tmp_path))
    page = open(path).read()
    assert page.count("<svg") >= 3 and "#f4a6a6" in page  # casts drawn red
    assert all(p.grad is None for p in bf.parameters())


def test_state_dict_stays_bf16_and_loads_into_plain_model(moe_setup):
    _, bf, x, gy = moe_setup
    c = compiled(bf, inner="eager")
    fwd_bwd(c, x.bfloat16(), gy.bfloat16())
    plain = MoE(256, 128, 4, 2)
    plain.load_state_dict(bf.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in bf.state_dict().values())


def test_no_recompiles_across_steps(moe_setup):
    _, bf, x, gy = moe_setup
    c = compiled(bf, inner="eager")
    for _ in range(3):
        fwd_bwd(c, torch.randn_like(x).bfloat16(), gy.bfloat16())
    n_graphs = len(ff.last_report().records)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    plain = torch.compile(bf, backend=counter)
    for _ in range(3):
        fwd_bwd(plain, torch.randn_like(x).bfloat16(), gy.bfloat16())
    assert n_graphs == counter.frame_count


def test_backend_found_by_name():
    assert "fp8flow" in torch._dynamo.list_backends(exclude_tags=())


def test_torch_logs_prints_the_rewritten_graphs(tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import torch, fp8flow_compile as ff\n"
        "m = torch.nn.Linear(256, 256, dtype=torch.bfloat16)\n"
        "x = torch.randn(32, 256, dtype=torch.bfloat16)\n"
        "torch.compile(m, backend=ff.fp8flow, options={'inner': 'eager'})(x).sum().backward()\n")
    env = dict(os.environ, TORCH_LOGS="+fp8flow_compile",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fp8flow graph_0 after graph" in out.stderr
    assert "torch.ops.fp8flow.gemm_fp8" in out.stderr


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_new_token_count_recompiles_dynamic_and_stays_right(moe_setup, inner):
    # The second call with another token count makes Dynamo mark the token dim dynamic: the
    # rewritten graph must not bake in the first count (the gather's index wrap reads it).
    ref, bf, x, gy = moe_setup
    c = compiled(copy.deepcopy(bf), inner=inner)
    for t in (96, 64):
        y32, dx32, _ = fwd_bwd(ref, x[:t], gy[:t])
        yf, dxf, _ = fwd_bwd(c, x[:t].bfloat16(), gy[:t].bfloat16())
        assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    s = ff.last_report().summary()
    assert s["casts_after"] >= 2 and s["saved_activation_bytes"] > 0


def test_dynamic_token_count_saves_what_a_static_one_saves(moe_setup):
    """With a symbolic token count the backward keeps the same tensors as with a static one:
    nothing the rewrite inserts (the padded group ends of the wgrads, say) may keep a BF16
    activation alive only to read its size."""
    _, bf, x, _ = moe_setup

    def saved(dynamic):
        c = torch.compile(copy.deepcopy(bf), backend=ff.fp8flow, options={"inner": "eager"},
                          dynamic=dynamic)
        got = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: got.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
            c(x[:96].bfloat16().requires_grad_(True))
        return sorted(got, key=str)

    assert saved(True) == saved(False)


def _after_graph():
    """The rewritten joint graph of the experts (the graph holding the grouped GEMMs)."""
    for r in ff.last_report().records:
        gm = r.graphs["after"]
        if any(n.target is torch.ops.fp8flow.index_add_rows.default for n in gm.graph.nodes):
            return r, gm
    raise AssertionError("no graph with the combine")


def test_probs_move_into_the_swiglu(moe_setup):
    """The routing weight is applied in the SwiGLU (FP8-Flow-MoE's probs * SwiGLU + quantize)
    instead of on the FC2 output: the FC2 output is no longer saved for the backward (2 P H
    bytes of BF16 fewer), the output gradient is quantized once per token and gathered in FP8,
    the weight's gradient comes from the SwiGLU backward; all within FP8 error of float32."""
    ref, bf, x, gy = moe_setup
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    ops = torch.ops.fp8flow

    def run(flag):
        out = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", probs_in_swiglu=flag),
                      x.bfloat16(), gy.bfloat16())
        return out, *_after_graph()

    (y, dx, g), rec, gm = run(True)
    (y0, dx0, g0), rec0, gm0 = run(False)
    assert any(line.startswith("probs: ") for line in rec.log)
    assert not any(line.startswith("probs: ") for line in rec0.log)
    for graph, moved in ((gm, True), (gm0, False)):
        nodes = list(graph.graph.nodes)
        sw = [n for n in nodes if n.target is ops.swiglu_quant_save.default]
        bw = [n for n in nodes if n.target is ops.swiglu_quant_backward.default]
        fwd_combine = [n for n in nodes if n.target is ops.index_add_rows.default
                       and n.args[1].op == "placeholder" and not n.args[5]]
        assert len(sw) == len(bw) == len(fwd_combine) == 1
        assert (sw[0].args[1] is not None) == moved and (bw[0].args[2] is not None) == moved
        assert (fwd_combine[0].args[3] is None) == moved
        # the backward gathers the FP8 output gradient (and the forward the FP8 input)
        perms = [n for n in nodes if n.target is ops.permute_pad_fp8.default]
        assert len(perms) == (2 if moved else 1)
    P, H = x.shape[0] * bf.top_k, bf.hidden
    after, before = rec.saved_bytes["fp8flow"], rec0.saved_bytes["fp8flow"]
    assert before["bfloat16"] - after["bfloat16"] == 2 * P * H
    assert not torch.equal(y, y0)  # the forward really quantized w * SwiGLU(h)
    assert rel(y, y32) < FP8_REL and rel(dx, dx32) < FP8_REL
    for n in ("w13", "w2", "router.weight"):
        assert rel(g[n], g32[n]) < FP8_REL, n


class FixedRouteMoE(MoE):
    """Routing given from outside (buffers): the weights need no gradient, so the backward has
    no dw = sum(G * y, -1) and y is read by the combine alone."""

    def route(self, x):
        return self.topw, self.topi


def test_probs_move_with_a_fixed_routing(moe_setup):
    ref32, bf, x, gy = moe_setup
    topw, topi = ref32.route(x)
    mods = []
    for m0, dt in ((ref32, torch.float32), (bf, torch.bfloat16)):
        m = FixedRouteMoE(bf.hidden, bf.inter, bf.num_experts, bf.top_k, dtype=dt)
        m.load_state_dict(m0.state_dict())
        m.register_buffer("topw", topw.detach().to(dt))
        m.register_buffer("topi", topi)
        mods.append(m)
    y32, dx32, g32 = fwd_bwd(mods[0], x, gy)
    y, dx, g = fwd_bwd(compiled(mods[1], inner="eager"), x.bfloat16(), gy.bfloat16())
    rec, gm = _after_graph()
    assert any(line.startswith("probs: ") and "moved" in line for line in rec.log)
    perms = [n for n in gm.graph.nodes if n.target is torch.ops.fp8flow.permute_pad_fp8.default]
    assert len(perms) == 2
    assert rel(y, y32) < FP8_REL and rel(dx, dx32) < FP8_REL
    for n in ("w13", "w2"):
        assert rel(g[n], g32[n]) < FP8_REL, n


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_report_keeps_the_partitioned_graphs(moe_setup, inner):
    """The report holds the forward and backward graphs as compiled: the forward has no tangent
    inputs, the backward does, and between them they run every fp8flow op of the joint graph
    (the backward may gather again what the forward gathered: flow_recompute)."""
    ref, bf, x, gy = moe_setup
    fwd_bwd(compiled(copy.deepcopy(bf), inner=inner), x.bfloat16(), gy.bfloat16())
    r, joint = _after_graph()
    fw, bw = r.graphs["forward"], r.graphs["backward"]

    def tangents(g):
        return [n for n in g.graph.nodes if n.op == "placeholder" and "tangents" in n.name]

    assert not tangents(fw) and tangents(bw)

    def fp8_ops(g):
        return {n.target for n in g.graph.nodes
                if getattr(n.target, "namespace", None) == "fp8flow"}

    assert fp8_ops(joint) == fp8_ops(fw) | fp8_ops(bw)
    assert torch.ops.fp8flow.grouped_gemm_fp8_wgrad.default in fp8_ops(bw)
    assert torch.ops.fp8flow.grouped_gemm_fp8_wgrad.default not in fp8_ops(fw)
