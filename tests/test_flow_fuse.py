"""The flow rewrites on the ways people write the same MoE layer, and on edge routing.

The rules are about dataflow: every spelling of SwiGLU below must reach the same 2 casts (the
MoE input in forward, the output gradient in backward), and a gate that is not SwiGLU (clamped,
GELU) must keep its explicit quantization, with the right numerics either way.
"""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from test_backend import FP8_REL, _after_graph, compiled, fwd_bwd, rel

import fp8flow_compile as ff
from examples.moe import MoE

H, I, E, K = 256, 128, 4, 2


class Spelled(MoE):
    """The canonical layer with the SwiGLU and the routing weight written another way."""

    def __init__(self, act: str, weight_before_down: bool = False, reads_y: bool = False,
                 **kw):
        super().__init__(H, I, E, K, **kw)
        self.act, self.weight_before_down, self.reads_y = act, weight_before_down, reads_y

    def swiglu(self, h):
        if self.act == "chunk":
            g, u = h.chunk(2, dim=-1)
            return F.silu(g) * u
        if self.act == "slice_sigmoid":  # gate * sigmoid(gate), operands swapped
            g, u = h[:, :I], h[:, I:]
            return u * (g * torch.sigmoid(g))
        if self.act == "split_fp32":  # the activation in fp32, cast back once
            g, u = h.float().split(I, dim=-1)
            return (F.silu(g) * u).to(h.dtype)
        if self.act == "clamped":  # GPT-OSS style: not SwiGLU, must stay unfused
            g, u = h.chunk(2, dim=-1)
            g = g.clamp(max=7.0)
            return g * torch.sigmoid(1.702 * g) * (u.clamp(-7.0, 7.0) + 1)
        if self.act in ("scaled", "shifted", "scaled_gate"):  # near-SwiGLU: must not fuse
            g, u = h.chunk(2, dim=-1)
            if self.act == "scaled":
                return F.silu(g) * u * 1.03
            if self.act == "shifted":
                return F.silu(g) * u + 0.05
            return F.silu(1.05 * g) * u
        if self.act == "gelu":
            g, u = h.chunk(2, dim=-1)
            return F.gelu(g) * u
        raise ValueError(self.act)

    def gather_rows(self, x, token):
        return x[token]

    def experts_act(self, xr, offs):
        """The SwiGLU of the routed rows: one FC1 GEMM over w13, then the spelled gate."""
        return self.swiglu(torch._grouped_mm(xr, self.w13.transpose(-2, -1), offs=offs))

    def forward(self, x):
        topw, topi = self.route(x)
        flat = topi.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k
        offs = torch.bincount(flat, minlength=self.num_experts).cumsum(0).to(torch.int32)
        w = topw.flatten()[order].unsqueeze(-1).to(x.dtype)
        a = self.experts_act(self.gather_rows(x, token), offs)
        if self.weight_before_down:
            a = a * w
        y = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        out = torch.zeros_like(x).index_add_(0, token, y if self.weight_before_down else y * w)
        # reads_y: the FC2 output is read once more (its mean over rows added to the output)
        return out + y.mean(0) if self.reads_y else out


def _pair(act, weight_before_down=False, **kw):
    torch.manual_seed(0)
    ref = Spelled(act, weight_before_down, dtype=torch.float32, **kw)
    bf = Spelled(act, weight_before_down, **kw)
    bf.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    return ref, bf


def _check_numerics(ref, bf, x, gy, options=None):
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", **(options or {})),
                          x.bfloat16(), gy.bfloat16())
    assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    for n in ("w13", "w2"):
        assert rel(gf[n], g32[n]) < FP8_REL, n
    return ff.last_report()


@pytest.mark.parametrize("act,weight_before_down", [
    ("chunk", False), ("slice_sigmoid", False), ("split_fp32", False), ("chunk", True)])
def test_every_swiglu_spelling_reaches_two_casts(act, weight_before_down):
    ref, bf = _pair(act, weight_before_down)
    torch.manual_seed(1)
    x, gy = torch.randn(80, H), torch.randn(80, H)
    rep = _check_numerics(ref, bf, x, gy)
    s = rep.summary()
    assert s["casts_before"] == 8 and s["casts_after"] == 2, str(rep)
    log = "\n".join(line for r in rep.records for line in r.log)
    assert "-> swiglu_quant" in log and "-> swiglu_quant_backward" in log
    if weight_before_down:
        # The combine is a plain gather-sum now, so its gradient is a row gather of the output
        # gradient: quantized once in token order [T, H] and permuted in FP8, as in the paper.
        bwd = rep.records[-1].casts_after["backward"]
        assert bwd.get("permute_pad_fp8") == 1, str(rep)


@pytest.mark.parametrize("act", ["clamped", "gelu", "scaled", "shifted", "scaled_gate"])
def test_gates_that_are_not_swiglu_keep_their_quantization(act):
    ref, bf = _pair(act)
    torch.manual_seed(1)
    x, gy = torch.randn(80, H), torch.randn(80, H)
    rep = _check_numerics(ref, bf, x, gy)
    s = rep.summary()
    assert s["gemms_fp8"] == 6
    log = [line for r in rep.records for line in r.log]
    if act == "shifted":
        # silu(g) * u + 0.05 is not a SwiGLU, but its gradient is exactly SwiGLU's: only the
        # backward fuses.
        assert s["casts_after"] == 3, str(rep)
        assert not any("-> swiglu_quant\n" in line + "\n" for line in log)
        assert any("-> swiglu_quant_backward" in line for line in log)
    else:
        # Still one consistent flow (transposes, FP8 gather), A and dH quantized explicitly.
        assert s["casts_after"] == 4, str(rep)
        assert not any("-> swiglu" in line for line in log)
    # The report says why: the clamp is an op the rule does not follow; GELU fails the check.
    assert any("not fused into a SwiGLU op" in line for line in log), log


class FixedRoute(MoE):
    """The canonical layer with the routing given, to reach edge cases a router rarely makes."""

    def __init__(self, topi, **kw):
        super().__init__(H, I, E, K, **kw)
        self.register_buffer("topi", topi)

    def route(self, x):
        w = torch.softmax(self.router(x).float(), -1).gather(1, self.topi)
        return w / w.sum(-1, keepdim=True), self.topi


@pytest.mark.parametrize("case", ["one_expert", "empty_experts", "single_token", "t37"])
def test_edge_routing_through_the_backend(case):
    T = {"single_token": 1, "t37": 37}.get(case, 64)
    g = torch.Generator().manual_seed(3)
    if case == "one_expert":  # top-k slots are distinct experts: slot 0 all on expert 1,
        # slot 1 all on expert 2, experts 0 and 3 empty
        topi = torch.tensor([[1, 2]]).repeat(T, 1)
    elif case == "empty_experts":
        topi = torch.stack([torch.zeros(T, dtype=torch.long),
                            torch.randint(1, 3, (T,), generator=g)], 1)  # expert 3 empty
    else:  # 1 or 37 tokens: group sizes that are not multiples of 16 or 128
        topi = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    torch.manual_seed(0)
    ref = FixedRoute(topi, dtype=torch.float32)
    bf = FixedRoute(topi)
    bf.load_state_dict({n: (p.bfloat16() if p.is_floating_point() else p)
                        for n, p in ref.state_dict().items()})
    x, gy = torch.randn(T, H), torch.randn(T, H)
    # The fixed route gathers the router's probabilities instead of taking top-k, so the
    # router-detection rule does not see it: keep it BF16 by path.
    rep = _check_numerics(ref, bf, x, gy, {"exclude": ["router"]})
    assert rep.summary()["casts_after"] == 2


def test_nan_input_comes_out_nan_not_finite():
    _, bf = _pair("chunk")
    x = torch.randn(32, H, dtype=torch.bfloat16)
    x[5, 17] = float("nan")
    y = compiled(bf, inner="eager")(x)
    ref = bf(x)
    # The recipe's rule: NaN propagates (E4M3 NaN in place, scales from the finite values).
    # Every output row the BF16 layer makes NaN is NaN here too, and no other row.
    assert torch.equal(torch.isnan(y).any(1), torch.isnan(ref).any(1))
    assert torch.isnan(y[5]).all()
    finite = ~torch.isnan(ref).any(1)
    assert rel(y[finite].float(), ref[finite].float()) < FP8_REL


def test_no_new_graph_breaks_against_a_plain_backend():
    _, bf = _pair("chunk")
    x = torch.randn(32, H, dtype=torch.bfloat16)
    torch._dynamo.reset()
    plain = torch._dynamo.explain(bf)(x)
    # Every graph Dynamo hands the backend leaves one record; a graph break the backend caused
    # (a failed compile falling back to eager, a split) would show as more graphs than the plain
    # capture has.
    compiled(bf, inner="eager")(x)
    assert len(ff.last_report().records) == plain.graph_count
    assert plain.graph_break_count == plain.graph_count - 1


class CatLinear(torch.nn.Module):
    """a and b each feed a GEMM of their own and, concatenated, another one: the concatenation
    can move their FP8 forms instead of being quantized again."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.lin = torch.nn.Linear(256, 256, bias=False, dtype=dtype)
        self.p = torch.nn.Linear(256, 256, bias=False, dtype=dtype)

    def forward(self, a, b):
        return self.lin(torch.cat([a, b], 0)) + torch.cat([self.p(a), self.p(b)], 0)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_hoist_above_a_row_concatenation(inner):
    torch.manual_seed(0)
    ref = CatLinear(torch.float32)
    m = CatLinear()
    m.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()})
    a, b = torch.randn(40, 256), torch.randn(24, 256)
    want = ref(a, b)
    got = compiled(m, inner=inner)(a.bfloat16(), b.bfloat16())
    log = [line for r in ff.last_report().records for line in r.log]
    assert any("row concatenation" in line for line in log), log
    assert ff.last_report().records[-1].casts_after["forward"]["act"] == 2  # a and b only
    assert rel(got, want) < FP8_REL


class GatherMoE(Spelled):
    """The token gather written as index_select, or as indexing with negative indices (which
    torch wraps, and which the FP8 gather must not read as padding rows)."""

    def __init__(self, gather, **kw):
        super().__init__("chunk", **kw)
        self.gather = gather

    def gather_rows(self, x, token):
        if self.gather == "index_select":
            return x.index_select(0, token)
        return x[token - x.shape[0]]


@pytest.mark.parametrize("gather", ["index_select", "negative_index"])
def test_hoist_above_other_row_gathers(gather):
    torch.manual_seed(0)
    ref = GatherMoE(gather, dtype=torch.float32)
    bf = GatherMoE(gather)
    bf.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    x, gy = torch.randn(40, H), torch.randn(40, H)
    rep = _check_numerics(ref, bf, x, gy)
    assert any("row gather" in line for r in rep.records for line in r.log)
    assert rep.summary()["casts_after"] == 2


def test_fused_backward_when_the_input_needs_no_gradient():
    # No FC1 dgrad: dH is only read column-wise by the FC1 wgrad; the fused op still makes it,
    # through the scaling-aware transpose.
    ref, bf = _pair("chunk")
    torch.manual_seed(1)
    x, gy = torch.randn(80, H), torch.randn(80, H)
    c = compiled(copy.deepcopy(bf), inner="eager")
    c(x.bfloat16()).backward(gy.bfloat16())
    ref(x).backward(gy)
    rep = ff.last_report()
    bwd = rep.records[-1].casts_after["backward"]
    assert bwd["act"] == 1 and bwd.get("swiglu_quant_backward") == 1, str(rep)
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in c.named_parameters()}
    for n in ("w13", "w2"):
        assert rel(grads[n], dict(ref.named_parameters())[n].grad) < FP8_REL


def test_probs_stay_after_fc2_when_its_output_has_other_readers():
    """flow_probs leaves the routing weight after FC2 when the FC2 output has a reader besides
    the combine and the weight's gradient, says so, and the layer stays right."""
    ref, bf = _pair("chunk", reads_y=True)
    x, gy = torch.randn(96, H), torch.randn(96, H)
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    y, dx, g = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager"), x.bfloat16(), gy.bfloat16())
    rec, gm = _after_graph()
    assert any(line.startswith("probs: ") and "kept after FC2" in line for line in rec.log)
    sw = [n for n in gm.graph.nodes if n.target is torch.ops.fp8flow.swiglu_quant_save.default]
    assert len(sw) == 1 and sw[0].args[1] is None
    assert rel(y, y32) < FP8_REL and rel(dx, dx32) < FP8_REL
    for n in ("w13", "w2", "router.weight"):
        assert rel(g[n], g32[n]) < FP8_REL, n


class TwoGemms(Spelled):
    """Gate and up from two grouped GEMMs over weights of their own (torchtitan's w1 and w3),
    the same values as Spelled's halves of w13."""

    def __init__(self, act, weight_before_down=False, **kw):
        super().__init__(act, weight_before_down, **kw)
        w13 = self.w13.detach()
        self.w1 = torch.nn.Parameter(w13[:, :I].clone())
        self.w3 = torch.nn.Parameter(w13[:, I:].clone())
        del self.w13

    def swiglu2(self, g, u):
        if self.act == "silu":
            return F.silu(g) * u
        if self.act == "swapped_sigmoid":  # up first, gate * sigmoid(gate)
            return u * (g * torch.sigmoid(g))
        if self.act == "fp32":
            return (F.silu(g.float()) * u.float()).to(g.dtype)
        if self.act == "gelu":  # not SwiGLU: must stay unfused
            return F.gelu(g) * u
        if self.act == "up_gated":  # silu(up) * gate: a SwiGLU whose gate is the w3 GEMM
            return F.silu(u) * g
        raise ValueError(self.act)

    def experts_act(self, xr, offs):
        g = torch._grouped_mm(xr, self.w1.transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(xr, self.w3.transpose(-2, -1), offs=offs)
        return self.swiglu2(g, u)


def _two_gemms(act, weight_before_down=False, **options):
    torch.manual_seed(0)
    ref = TwoGemms(act, weight_before_down, dtype=torch.float32)
    bf = TwoGemms(act, weight_before_down)
    bf.load_state_dict({n: p.bfloat16() for n, p in ref.state_dict().items()})
    torch.manual_seed(1)
    x, gy = torch.randn(80, H), torch.randn(80, H)
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    yf, dxf, gf = fwd_bwd(compiled(copy.deepcopy(bf), inner="eager", **options), x.bfloat16(),
                          gy.bfloat16())
    assert rel(yf, y32) < FP8_REL and rel(dxf, dx32) < FP8_REL
    for n in ("w1", "w3", "w2", "router.weight"):
        assert rel(gf[n], g32[n]) < FP8_REL, n
    return ff.last_report()


@pytest.mark.parametrize("act,weight_before_down", [
    ("silu", False), ("swapped_sigmoid", False), ("fp32", False), ("silu", True),
    ("up_gated", False)])
def test_gate_and_up_from_two_gemms_reach_two_casts(act, weight_before_down):
    # the split form as flow_fuse makes it (merge_gate_up, which would join the two GEMMs, off)
    rep = _two_gemms(act, weight_before_down, merge_gate_up=False)
    s = rep.summary()
    assert s["gemms_fp8"] == 9 and s["casts_after"] == 2, str(rep)
    rec = _after_graph()[0]
    # With the weight applied before the down projection the graph's own gradient of the
    # weight, sum(dA * silu(g) * u), reads gate and up in the backward, so they stay BF16 there
    # (as for one h; the log says why); otherwise the backward keeps them in FP8.
    fused = "swiglu_quant" if weight_before_down else "swiglu_quant_save"
    assert rec.casts_after["forward"].get(fused) == 1, str(rep)
    assert rec.casts_after["backward"].get("swiglu_quant_backward") == 1, str(rep)
    log = "\n".join(rec.log)
    assert "plane 0" in log and "plane 1" in log, log
    # the two FC1 dgrads reach the routed rows' gradient summed inside the scatter
    assert "reading add" in log and "two terms" in log, log
    if act == "up_gated":  # the rule found which GEMM is the gate
        assert "SwiGLU(grouped_gemm_fp8_default_1, grouped_gemm_fp8_default)" in log, log
    gm = rec.graphs["after"]
    bwd = [n for n in gm.graph.nodes
           if n.target is torch.ops.fp8flow.swiglu_quant_backward.default]
    assert len(bwd) == 1 and bwd[0].args[5] is True  # split planes
    op = getattr(torch.ops.fp8flow, fused).default
    fwd = [n for n in gm.graph.nodes if n.target is op]
    # the routing weight is in the SwiGLU either way (before the down projection, or moved
    # there by flow_probs), and the separate up is kept
    assert fwd[0].args[1] is not None and fwd[0].args[2] is not None
    if weight_before_down:
        assert any("kept in torch.bfloat16 for the backward" in line for line in rec.log)
    else:  # the backward reads the FP8 copy of gate and up
        assert bwd[0].args[3] is not None and bwd[0].args[4] is None


def test_two_gemm_gate_that_is_not_swiglu_keeps_its_quantization():
    rep = _two_gemms("gelu")
    s = rep.summary()
    assert s["gemms_fp8"] == 9 and s["casts_after"] > 2
    log = [line for r in rep.records for line in r.log]
    assert not any("-> swiglu" in line for line in log), log
    assert any("not fused into a SwiGLU op" in line for line in log), log


class DenseMLP(torch.nn.Module):
    """A Llama-style MLP on [B, S, H] activations: gate_proj and up_proj are Linears of their
    own, so each GEMM reads a [B*S, H] view and its output is viewed back to [B, S, I]."""

    def __init__(self, hidden=256, inter=256):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def dense_against_fp32(cls, **options):
    """A dense MLP of class cls compiled in BF16 (eager inner) against its float32 self on
    [2, 40, 256] inputs: output, input and weight gradients within the FP8 tolerance.
    Returns the compiled run's (y, dx, grads) and the inputs (x, gy)."""
    torch.manual_seed(0)
    ref = cls()
    bf = copy.deepcopy(ref).bfloat16()
    x, gy = torch.randn(2, 40, 256), torch.randn(2, 40, 256)
    y32, dx32, g32 = fwd_bwd(ref, x, gy)
    y, dx, g = fwd_bwd(compiled(bf, inner="eager", **options), x.bfloat16(), gy.bfloat16())
    assert rel(y, y32) < FP8_REL and rel(dx, dx32) < FP8_REL
    for n in g32:
        assert rel(g[n], g32[n]) < FP8_REL, n
    return (y, dx, g), (x, gy)


def test_dense_mlp_on_3d_activations_reaches_two_casts():
    dense_against_fp32(DenseMLP)
    rep = ff.last_report()
    s = rep.summary()
    # the input in forward, the output gradient in backward; SwiGLU output and d_gate / d_up
    # come from the fused ops
    assert s["gemms_fp8"] == 9 and s["casts_after"] == 2, str(rep)
    after = rep.records[0].casts_after
    assert after["forward"].get("swiglu_quant_save") == 1, after
    assert after["backward"].get("swiglu_quant_backward") == 1, after


class WeightedDenseMLP(DenseMLP):
    """A dense MLP whose SwiGLU output is weighted per row by a [B, S, 1] gate of its own."""

    def __init__(self):
        super().__init__()
        self.score = torch.nn.Linear(256, 1, bias=False)

    def forward(self, x):
        # one weight per row, computed on the [B*S, H] rows and viewed as [B, S, 1] (a weight
        # computed elementwise inside the expression, sigmoid(score(x)) on [B, S, 1], is not a
        # leaf: the rule does not take it for a row weight)
        w = torch.sigmoid(self.score(x.reshape(-1, x.shape[-1]))).view(*x.shape[:-1], 1)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x) * w)


def test_dense_mlp_with_a_3d_row_weight():
    """The row weight reaches the fused ops as one value per row, [B*S], whatever its view."""
    dense_against_fp32(WeightedDenseMLP, exclude=["score"])
    log = "\n".join(ff.last_report().records[0].log)
    assert "-> swiglu_quant\n" in log + "\n" and "(split), plane 0" in log, log

