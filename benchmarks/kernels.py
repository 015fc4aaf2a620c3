"""Kernel benchmark at DeepSeek-V3 MoE shapes: every fp8flow op against its ceiling and peers.

Memory-bound ops report GB/s (fewest bytes: each input read once, each output written once)
against the device copy bandwidth measured in the same run, timed as ten calls replayed from a
CUDA graph (the kernels' GPU time, without the op dispatch's host time; rows marked "eager"
could not be captured). GEMMs report TFLOP/s against cuBLAS
through torch in the same run: dense blockwise `F.scaled_mm` at the same total size (1x128 x
128x128 for fprop/dgrad, 1x128 x 1x128 for wgrad) and rowwise `torch._scaled_grouped_mm`.
Each of our outputs is checked against its torch reference before it is timed. The cuBLAS
per-group rows get a host copy of the group ends, as the compiled graph hands them one (copied
once per step); without it every call would copy them itself and wait for the device.

    python benchmarks/kernels.py [--tokens 8192 --hidden 7168 --inter 2048 --experts 32 --topk 8]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    bench_graph_ms,
    bench_ms,
    copy_bandwidth_gbs,
    env_line,
    rel_err,
)
from fp8flow_compile.kernels import cublas as CB  # noqa: E402
from fp8flow_compile.kernels import gemm as G  # noqa: E402
from fp8flow_compile.kernels import permute as PM  # noqa: E402
from fp8flow_compile.kernels import quantize as Q  # noqa: E402
from fp8flow_compile.kernels import swiglu as SW  # noqa: E402
from fp8flow_compile.kernels import transpose as TR  # noqa: E402
from fp8flow_compile.recipe import BLOCKWISE  # noqa: E402

ops = torch.ops.fp8flow
GA = BLOCKWISE.group_align  # the aligned group layout of the column-wise producers
ROWS: list[tuple] = []


def same_bytes(a, b):
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def mem_row(name, fn, nbytes, bw, check):
    ms, how = bench_graph_ms(fn)
    gbs = nbytes / ms / 1e6
    note = "" if how == "graph" else " (eager)"
    ROWS.append((name, f"{ms:.3f}", f"{gbs:.0f} GB/s", f"{gbs / bw:.0%} of copy{note}", check))


def gemm_row(name, fn, flops, peer_tflops, check):
    ms = bench_ms(fn)
    tf = flops / ms / 1e9
    ratio = "" if not peer_tflops else f"{tf / peer_tflops:.0%} of cuBLAS blockwise"
    ROWS.append((name, f"{ms:.3f}", f"{tf:.0f} TFLOP/s", ratio, check))
    return tf


def cublas_blockwise(a_q, a_s, b_q, b_s, kind):
    """cuBLAS blockwise FP8 GEMM through F.scaled_mm. kind 'fwd': b is a [N, K] weight with
    128x128 scales; 'wgrad': b is [N, K] with 1x128 scales along K (both operands K-major)."""
    ST = F.ScalingType
    if kind == "fwd":
        return F.scaled_mm(a_q, b_q.t(), CB.col_major(a_s), ST.BlockWise1x128, b_s.t(),
                           ST.BlockWise128x128, output_dtype=torch.bfloat16)
    return F.scaled_mm(a_q, b_q.t(), CB.col_major(a_s), ST.BlockWise1x128, CB.col_major(b_s),
                       ST.BlockWise1x128, output_dtype=torch.bfloat16)


def check_cublas(kind):
    """Validate the cuBLAS call layout on a small problem before timing it."""
    M, N, K = 256, 384, 512
    a = torch.randn(M, K, device="cuda")
    b = torch.randn(N, K, device="cuda")
    aq, as_ = Q.quantize_1x128_triton(a)
    if kind == "fwd":
        bq, bs = Q.quantize_128x128_triton(b)
        ref = Q.dequantize_1x128_ref(aq, as_) @ Q.dequantize_128x128_ref(bq, bs).t()
    else:
        bq, bs = Q.quantize_1x128_triton(b)
        ref = Q.dequantize_1x128_ref(aq, as_) @ Q.dequantize_1x128_ref(bq, bs).t()
    return rel_err(cublas_blockwise(aq, as_, bq, bs, kind), ref)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--configs", default="128x128x128w8s3,128x256x128w8s3,128x128x128w4s4,"
                   "64x128x128w4s4,128x128x64w8s4")
    args = p.parse_args()
    T, H, I, E, k = args.tokens, args.hidden, args.inter, args.experts, args.topk
    dev = "cuda"
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    print(env_line())
    print(f"shapes: T={T} H={H} I={I} E={E} top-{k}; copy bandwidth {bw:.0f} GB/s")

    # Balanced routing: each token picks k distinct experts uniformly at random.
    topi = torch.rand(T, E, device=dev).topk(k, dim=1).indices
    maps = PM.moe_routing_maps(topi, E, 16)
    P = maps.src_row.numel()
    offs = maps.offs_pad
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)

    # ---- memory-bound ops
    xq, xs = ops.quantize_1x128(x)
    r = Q.quantize_1x128_ref(x)
    mem_row("quantize_1x128 x[T,H]", lambda: ops.quantize_1x128(x), T * H * 3 + T * H // 32,
            bw, same_bytes(xq, r[0]) and torch.equal(xs, r[1]))

    xq_p, xs_p = ops.permute_pad_fp8(xq, xs, maps.src_row)
    r = PM.permute_pad_fp8_ref(xq, xs, maps.src_row)
    mem_row("permute_pad_fp8 [T,H]->[P,H]", lambda: ops.permute_pad_fp8(xq, xs, maps.src_row),
            T * H + P * H + (T + P) * H // 32, bw,
            same_bytes(xq_p, r[0]) and torch.equal(xs_p, r[1]))

    # The column-wise producers as the flow and the naive mode call them: the aligned group
    # layout (align 16, every group on a 16-token boundary, zero tail), which is 480 columns
    # wider than P here; bytes counted as read + written.
    xp_bf = PM.permute_pad_ref(x, maps.src_row)
    qT, sT = ops.quantize_1x128_col(xp_bf, offs, GA)
    r = Q.quantize_1x128_col_ref(xp_bf, offs, GA)
    mem_row("quantize_1x128_col [P,H] (naive)", lambda: ops.quantize_1x128_col(xp_bf, offs, GA),
            P * H * 2 + qT.numel() + sT.numel() * 4, bw,
            same_bytes(qT, r[0]) and torch.equal(sT, r[1]))

    tq, ts = ops.scaling_aware_transpose(xq_p, xs_p, offs, GA)
    r = TR.scaling_aware_transpose_ref(xq_p, xs_p, offs, GA)
    t_bytes = P * H + P * H // 32 + tq.numel() + ts.numel() * 4
    mem_row("scaling_aware_transpose [P,H]",
            lambda: ops.scaling_aware_transpose(xq_p, xs_p, offs, GA), t_bytes, bw,
            same_bytes(tq, r[0]) and torch.equal(ts, r[1]))

    def deq_requant():
        d = ops.dequantize_1x128(xq_p, xs_p, None, torch.bfloat16)
        return ops.quantize_1x128_col(d, offs, GA)
    mem_row("  peer: dequantize + quantize_col", deq_requant, t_bytes, bw, "-")

    # The backward's form (passes/flow_gather.py): the token rows read through the gather's
    # index. Bytes as for a gather: the T source rows and the index once, the output once.
    gq, gs = ops.scaling_aware_transpose(xq, xs, offs, GA, maps.src_row)
    g_bytes = T * H + T * H // 32 + 4 * P + gq.numel() + gs.numel() * 4
    mem_row("scaling_aware_transpose through the index [T,H]->[H,P]",
            lambda: ops.scaling_aware_transpose(xq, xs, offs, GA, maps.src_row), g_bytes, bw,
            same_bytes(gq, tq) and torch.equal(gs, ts))

    def gather_then_transpose():
        qp, sp = ops.permute_pad_fp8(xq, xs, maps.src_row)
        return ops.scaling_aware_transpose(qp, sp, offs, GA)
    mem_row("  peer: permute_pad_fp8 + scaling_aware_transpose", gather_then_transpose,
            g_bytes, bw, "-")

    h = torch.randn(P, 2 * I, device=dev, dtype=torch.bfloat16)
    probs_p = torch.rand(P, device=dev)
    aq, as_ = ops.swiglu_quant(h, probs_p)
    r = SW.swiglu_quant_ref(h, probs_p)
    mism = (aq.view(torch.uint8) != r[0].view(torch.uint8)).float().mean().item()
    mem_row("swiglu_quant [P,2I]->[P,I]", lambda: ops.swiglu_quant(h, probs_p),
            P * 2 * I * 2 + P * 4 + P * I + P * I // 32, bw, f"byte mismatch {mism:.1e}")
    mem_row("  peer: torch swiglu (eager, bf16 out)", lambda: SW.swiglu_ref(h, probs_p),
            P * 2 * I * 2 + P * 4 + P * I * 2, bw, "-")

    da = torch.randn(P, I, device=dev, dtype=torch.bfloat16)
    dhq, dhs, dp = ops.swiglu_quant_backward(da, h, probs_p)
    r = SW.swiglu_quant_backward_ref(da, h, probs_p)
    mism = (dhq.view(torch.uint8) != r[0].view(torch.uint8)).float().mean().item()
    mem_row("swiglu_quant_backward", lambda: ops.swiglu_quant_backward(da, h, probs_p),
            P * I * 2 + P * 2 * I * 2 + P * 4 + P * 2 * I + P * 2 * I // 32 + P * 4, bw,
            f"byte mismatch {mism:.1e}")

    # h saved in FP8 (the flow's default): the backward decodes it with its 1x128 scales
    # (the decoded h is exact in bf16: 4 significant bits times a power of two)
    hq, hs = ops.quantize_1x128(h)
    got = SW.swiglu_quant_backward_triton(da, hq, probs_p, h_scales=hs)
    r = SW.swiglu_quant_backward_ref(da, Q.dequantize_1x128_ref(hq, hs).to(torch.bfloat16),
                                     probs_p)
    mism = (got[0].view(torch.uint8) != r[0].view(torch.uint8)).float().mean().item()
    mem_row("swiglu_quant_backward, h in FP8",
            lambda: SW.swiglu_quant_backward_triton(da, hq, probs_p, h_scales=hs),
            P * I * 2 + P * 2 * I + P * 2 * I // 32 + P * 4 + P * 2 * I + P * 2 * I // 32
            + P * 4, bw, f"byte mismatch {mism:.1e}")

    y = torch.randn(P, H, device=dev, dtype=torch.bfloat16)
    out = ops.unpermute(y, maps.pos, None)
    mem_row("unpermute [P,H]->[T,H] bf16", lambda: ops.unpermute(y, maps.pos, None),
            T * k * H * 2 + T * H * 2, bw,
            rel_err(out, PM.unpermute_ref(y, maps.pos, None)) < 1e-2)

    # The combine as a model writes it: zeros.index_add_(0, token, y * w), rows in expert order.
    order = topi.flatten().argsort(stable=True)
    token = order // k
    yk = torch.randn(T * k, H, device=dev, dtype=torch.bfloat16)
    wk = torch.rand(T * k, 1, device=dev, dtype=torch.bfloat16)
    ref = torch.zeros(T, H, device=dev).index_add_(0, token, yk.float() * wk.float())
    nbytes = T * k * H * 2 + T * H * 2 + T * k * 10
    mem_row("index_add_rows [Tk,H]->[T,H] (w fused)",
            lambda: ops.index_add_rows(None, token, yk, wk, T), nbytes, bw,
            rel_err(ops.index_add_rows(None, token, yk, wk, T), ref) < 1e-2)
    mem_row("  peer: zeros.index_add_(y * w) (ATen)",
            lambda: torch.zeros(T, H, device=dev, dtype=torch.bfloat16).index_add_(
                0, token, yk * wk), nbytes, bw, "-")
    mem_row("  peer: zeros.index_put_(acc) (ATen)",
            lambda: torch.zeros(T, H, device=dev, dtype=torch.bfloat16).index_put_(
                (token,), yk, accumulate=True), nbytes, bw, "-")

    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / 64
    w13q, w13s, w13qT, w13sT = ops.quantize_128x128_dual(w13)
    r = Q.quantize_128x128_dual_ref(w13)
    mem_row("quantize_128x128_dual w13[E,2I,H]", lambda: ops.quantize_128x128_dual(w13),
            w13.numel() * 4, bw, same_bytes(w13q, r[0]) and same_bytes(w13qT, r[2]))

    # ---- GEMMs: each use at its shape, ours (best of a few configs) vs cuBLAS
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / 32
    w2q, w2s, w2qT, w2sT = ops.quantize_128x128_dual(w2)
    configs = []
    for c in args.configs.split(","):
        mnk, rest = c.split("w")
        bm, bn, bk = map(int, mnk.split("x"))
        rest, _, unroll = rest.partition("u")
        nw, ns = map(int, rest.split("s"))
        configs.append(G.GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=nw,
                                    num_stages=ns, unroll=int(unroll or 1)))
    print(f"cuBLAS blockwise layout check: fwd rel err {check_cublas('fwd'):.1e}, "
          f"wgrad rel err {check_cublas('wgrad'):.1e}")

    def best(fn_of_cfg):
        times = []
        for c in configs:
            try:
                fn_of_cfg(c)
                times.append((bench_ms(lambda c=c: fn_of_cfg(c)), c))
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"  config {c} failed: {type(e).__name__}: {str(e)[:80]}")
        t, c = min(times, key=lambda tc: tc[0])
        return c

    dq_p = torch.randn(P, H, device=dev, dtype=torch.bfloat16)
    dq_p, ds_p = ops.quantize_1x128(dq_p)
    oh = CB.host_copy(offs)
    uses = [  # name, A (q, s), B (q, s), trans_b, K, N
        ("FC1 fprop", (xq_p, xs_p), (w13q, w13s), True, H, 2 * I),
        ("FC2 fprop", (aq, as_), (w2q, w2s), True, I, H),
        ("FC2 dgrad", (dq_p, ds_p), (w2qT, w2sT), True, H, I),
        ("FC1 dgrad", (dhq, dhs), (w13qT, w13sT), True, 2 * I, H),
    ]
    for name, (a_q, a_s), (b_q, b_s), tb, K, N in uses:
        flops = 2 * P * K * N
        # dense cuBLAS peer at the same total size: A [P, K] x a [N, K] weight
        wd = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        wdq, wds = Q.quantize_128x128_triton(wd)
        peer = gemm_row(f"  peer: cuBLAS blockwise dense {P}x{K}x{N}",
                        lambda: cublas_blockwise(a_q, a_s, wdq, wds, "fwd"), flops, None, "-")
        rw = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        sa = torch.rand(P, device=dev)
        sb = torch.rand(E, N, device=dev)
        try:
            gemm_row("  peer: torch._scaled_grouped_mm rowwise",
                     lambda: torch._scaled_grouped_mm(a_q, rw.transpose(-2, -1), sa, sb, offs=offs,
                                                      out_dtype=torch.bfloat16),
                     flops, None, "-")
        except Exception as e:
            print(f"  _scaled_grouped_mm failed: {e}")
        c = best(lambda cfg: G.grouped_gemm_fp8_triton(a_q, a_s, b_q, b_s, offs, tb,
                                                       torch.bfloat16, cfg))
        o = G.grouped_gemm_fp8_triton(a_q, a_s, b_q, b_s, offs, tb, torch.bfloat16, c)
        err = rel_err(o, G.grouped_gemm_fp8_ref(a_q, a_s, b_q, b_s, offs, tb, torch.float32))
        ROWS.append(("", "", "", "", ""))
        gemm_row(f"grouped_gemm_fp8 {name} [{c.block_m}x{c.block_n}x{c.block_k} "
                 f"w{c.num_warps}s{c.num_stages}u{c.unroll}]",
                 lambda: G.grouped_gemm_fp8_triton(a_q, a_s, b_q, b_s, offs, tb, torch.bfloat16, c),
                 flops, peer, f"rel err {err:.1e}")
        # the same op as one cuBLAS call per group (what `auto` picks at this size)
        o = CB.grouped_fwd(a_q, a_s, b_q, b_s, offs, torch.bfloat16, offs_host=oh)
        err = rel_err(o, G.grouped_gemm_fp8_ref(a_q, a_s, b_q, b_s, offs, tb, torch.float32))
        gemm_row(f"grouped_gemm_fp8 {name} [cuBLAS per group]",
                 lambda: CB.grouped_fwd(a_q, a_s, b_q, b_s, offs, torch.bfloat16, offs_host=oh),
                 flops, peer, f"rel err {err:.1e}")
        ROWS.append(("", "", "", "", ""))

    wg = [("FC1 wgrad", (dhq, dhs), (xq_p, xs_p), 2 * I, H),
          ("FC2 wgrad", (dq_p, ds_p), (aq, as_), H, I)]
    for name, (a_q, a_s), (b_q, b_s), N, K in wg:
        aT, aTs = ops.scaling_aware_transpose(a_q, a_s, offs)
        bT, bTs = ops.scaling_aware_transpose(b_q, b_s, offs)
        flops = 2 * P * N * K
        # dense cuBLAS wgrad form at the same total size: [N, P] x [K, P]^T, 1x128 both
        dA, dAs = Q.quantize_1x128_triton(torch.randn(N, P, device=dev, dtype=torch.bfloat16))
        dB, dBs = Q.quantize_1x128_triton(torch.randn(K, P, device=dev, dtype=torch.bfloat16))
        peer = gemm_row(f"  peer: cuBLAS blockwise wgrad {N}x{P}x{K}",
                        lambda: cublas_blockwise(dA, dAs, dB, dBs, "wgrad"), flops, None, "-")
        c = best(lambda cfg: G.grouped_gemm_fp8_wgrad_triton(aT, aTs, bT, bTs, offs,
                                                             torch.float32, cfg))
        o = G.grouped_gemm_fp8_wgrad_triton(aT, aTs, bT, bTs, offs, torch.float32, c)
        err = rel_err(o, G.grouped_gemm_fp8_wgrad_ref(aT, aTs, bT, bTs, offs, torch.float32))
        gemm_row(f"grouped_gemm_fp8_wgrad {name} [{c.block_m}x{c.block_n}x{c.block_k} "
                 f"w{c.num_warps}s{c.num_stages}u{c.unroll}]",
                 lambda: G.grouped_gemm_fp8_wgrad_triton(aT, aTs, bT, bTs, offs, torch.float32, c),
                 flops, peer, f"rel err {err:.1e}")
        for od in (torch.float32, torch.bfloat16):
            o = CB.grouped_wgrad(aT, aTs, bT, bTs, offs, od, offs_host=oh)
            err = rel_err(o, G.grouped_gemm_fp8_wgrad_ref(aT, aTs, bT, bTs, offs, torch.float32))
            gemm_row(f"grouped_gemm_fp8_wgrad {name} [cuBLAS per group, {str(od)[6:]} out]",
                     lambda od=od: CB.grouped_wgrad(aT, aTs, bT, bTs, offs, od, offs_host=oh),
                     flops, peer, f"rel err {err:.1e}")
        ROWS.append(("", "", "", "", ""))

    print()
    print("| op | ms | rate | vs ceiling/peer | check |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        if any(row):
            print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
