"""The torchtitan-style MoE block (examples/titan_moe.py) compiled with fp8flow on CPU."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch._dynamo

import fp8flow_compile as ff
from examples.titan_moe import MoE, TokenChoiceTopKRouter
from fp8flow_compile.backend import fp8flow

# Relative Frobenius error against the same block in BF16 eager (BF16's own error, ~0.004, is
# negligible). Each GEMM operand is rounded to E4M3 (3 mantissa bits: relative error within
# +-2^-4, about uniform, RMS 2^-4/sqrt(3) = 0.036), so one GEMM's output carries
# sqrt(2) * 0.036 = 0.051; the experts chain two GEMMs with the SwiGLU between them (~0.07, as
# the hand-wired flow measures 0.065), the shared expert likewise, and the gradients add one
# more rounded operand (~0.09). 0.12 leaves room for tails; a wrong expert, a lost token or a
# wrong scale gives errors of order 1.
FP8_REL = 0.12
DIM, HIDDEN, EXPERTS, TOP_K, TOKENS = 256, 128, 8, 2, 96

CASES = {
    # DeepSeek-V3 style: sigmoid scores, selection bias, one shared expert.
    "sigmoid_bias_shared": dict(score_func="sigmoid", num_shared_experts=1, load_balance=True),
    # Mixtral style through the same code: softmax, no bias, no shared expert, and the gating
    # values applied to the routed tokens before the experts (torchtitan's default).
    "softmax_score_before": dict(score_func="softmax", num_shared_experts=0,
                                 load_balance=False, score_before_experts=True),
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(case: str) -> MoE:
    torch.manual_seed(0)
    block = MoE(DIM, HIDDEN, EXPERTS, TOP_K, **CASES[case]).bfloat16()
    if block.expert_bias is not None:  # unequal load, as balancing leaves it mid-training
        block.expert_bias.copy_(torch.linspace(0.02, -0.02, EXPERTS))
    return block


def fwd_bwd(block, x, gy):
    x = x.clone().requires_grad_(True)
    y = block(x)
    y.backward(gy)
    return y.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad
                                for n, p in block.named_parameters()}


@functools.cache
def compare(case: str):
    ref = make(case)
    block = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, TOKENS // 2, DIM, generator=g).bfloat16()
    gy = torch.randn(2, TOKENS // 2, DIM, generator=g).bfloat16()
    out_ref = fwd_bwd(ref, x, gy)
    torch._dynamo.reset()
    ff.last_report().records.clear()
    compiled = torch.compile(block, backend=fp8flow, fullgraph=True, options={"inner": "eager"})
    out = fwd_bwd(compiled, x, gy)
    report = ff.Report()
    report.records = list(ff.last_report().records)
    torch._dynamo.reset()
    return ref, block, out_ref, out, report


@pytest.mark.parametrize("case", CASES)
def test_compiled_matches_bf16_within_fp8_tolerance(case):
    ref, block, (y0, dx0, g0), (y, dx, g), _ = compare(case)
    # Same expert choices in both runs (the router GEMM stays BF16 and reads the same input):
    # the token counts the block accumulates agree.
    assert torch.equal(ref.tokens_per_expert, block.tokens_per_expert)
    assert rel(y, y0) < FP8_REL
    assert rel(dx, dx0) < FP8_REL
    assert set(g) == set(g0)
    for n in g0:
        assert rel(g[n], g0[n]) < FP8_REL, n


@pytest.mark.parametrize("case", CASES)
def test_expert_gemms_go_fp8(case):
    *_, report = compare(case)
    assert len(report.records) == 1  # one joint graph, no breaks (fullgraph=True)
    gemms = report.records[0].gemms
    for w in ("experts.w1", "experts.w2", "experts.w3"):
        mine = [g for g in gemms if g["weight"] == w]
        kinds = sorted(g["describe"].split("(")[1].split(",")[0] for g in mine)
        assert kinds == ["grouped", "grouped", "grouped_wgrad"], w  # fprop, dgrad, wgrad
        assert all(g["fp8"] for g in mine), w
    router = [g for g in gemms if g["weight"] == "router.gate.weight"]
    assert len(router) == 3 and all(not g["fp8"] and "router" in g["reason"] for g in router)
    shared = [g for g in gemms if g["weight"] and g["weight"].startswith("shared_experts.")]
    assert len(shared) == 9 * CASES[case]["num_shared_experts"]
    assert all(g["fp8"] for g in shared)
    s = report.summary()
    assert s["casts_after"] < s["casts_before"]
    assert s["saved_activation_bytes"] < s["saved_activation_bytes_bf16"]


def test_routed_input_moves_in_fp8():
    # With the gating values applied after the experts, the experts read a plain row gather of
    # the block input, so the flow quantizes the input once and permutes it in FP8.
    *_, report = compare("sigmoid_bias_shared")
    assert report.records[0].casts_after["forward"].get("permute_pad_fp8") == 1


@pytest.mark.parametrize("case", CASES)
def test_swiglu_of_separate_gate_and_up_gemms_is_fused(case):
    # torchtitan computes gate and up with two grouped GEMMs over w1 and w3 (and the shared
    # expert with two Linears): each SwiGLU is fused with its quantization, forward, and its
    # gradient is one fused op whose two planes feed the two dgrads. What is left: the block
    # input in forward, and in backward the output gradient of each branch (experts, shared
    # expert).
    *_, report = compare(case)
    after = report.records[0].casts_after
    shared = CASES[case]["num_shared_experts"]
    fused = after["forward"].get("swiglu_quant", 0) + after["forward"].get("swiglu_quant_save", 0)
    assert fused == 1 + shared, after
    assert after["backward"].get("swiglu_quant_backward") == 1 + shared, after
    assert after["forward"]["act"] == 1, after
    assert after["backward"]["act"] == 1 + shared, after
    log = report.records[0].log
    assert sum("(split), plane" in line for line in log) == 2 * (1 + shared), log


def test_expert_bias_steers_selection_but_not_gating_values():
    torch.manual_seed(0)
    router = TokenChoiceTopKRouter(DIM, EXPERTS, TOP_K, "sigmoid", route_norm=False)
    x = torch.randn(32, DIM)
    scores = torch.sigmoid(router.gate(x))
    bias = torch.zeros(EXPERTS)
    bias[[3, 5]] = 10.0  # larger than any score difference: every token picks experts 3 and 5
    top, idx = router(x, bias)
    assert (idx.sort(-1).values == torch.tensor([3, 5])).all()
    torch.testing.assert_close(top, scores.gather(-1, idx))  # unbiased gating values
    top0, idx0 = router(x)
    torch.testing.assert_close(top0, scores.topk(TOP_K, dim=-1).values)
