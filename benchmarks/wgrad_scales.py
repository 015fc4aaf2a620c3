"""The wgrad GEMM with the transposes' scales per row against the same scales in 128x128 blocks.

The scaling-aware transpose gives all 128 rows of a block one scale per token tile, so a wgrad
operand it made can hand cuBLAS its scales as 128x128 blocks: cuBLAS then runs the scaling pair
of the fprop (1x128 x 128x128) instead of 1x128 x 1x128 (passes/block_scales.py). This measures
both, on the same operands, with each output checked bit for bit against the per-row one:

- one group's dense cuBLAS call, the three scaling pairs (per row both; b in blocks; a in
  blocks), through the same cuBLASLt call the grouped loop makes;
- the grouped op `grouped_gemm_fp8_wgrad` as the compiled graph calls it (aligned group
  layout, operands made by the transpose, host copy of the group ends), per row and with b's
  scales in blocks, balanced and skewed routing.

    python benchmarks/wgrad_scales.py [--shapes dsv3,mixtral]
    python benchmarks/wgrad_scales.py --halves   # one FC1 wgrad against two over its row halves

`--halves` measures instead what gate and up as weights of their own cost the FC1 weight
gradient (passes/merge_gate_up.py keeps two wgrads there, one per parameter): the grouped op
over dh^T [2I, P] against two over its row halves [I, P], b in blocks, bf16 output as in the
layer, balanced routing; each timed with do_bench and back to back for 3 s after 1 s (the board
at its power limit), the halves' outputs checked bit for bit against the one op's.

Needs a CUDA device with cuBLAS's blockwise FP8 GEMMs (Hopper).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_ms, env_line  # noqa: E402
from fp8flow_compile.kernels import cublas as CB  # noqa: E402
from fp8flow_compile.kernels import cublaslt as LT  # noqa: E402
from fp8flow_compile.kernels import groups as GR  # noqa: E402
from fp8flow_compile.kernels.groups import cdiv  # noqa: E402
from fp8flow_compile.recipe import TILE  # noqa: E402

ops = torch.ops.fp8flow
# (tokens, hidden, intermediate, experts, top-k), as benchmarks/moe_layer.py
SHAPES = {"dsv3": (8192, 7168, 2048, 32, 8), "mixtral": (8192, 4096, 14336, 8, 2)}
ZIPF_S = 1.2
LABEL = {"wgrad": "per row", "wgrad_b": "b blocks", "wgrad_a": "a blocks"}


def group_ends(P, E, routing, gen):
    if routing == "balanced":
        sizes = torch.full((E,), P // E)
    else:  # Zipf-like loads, as moe_layer.py's skewed routing
        w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_S
        sizes = torch.floor(w / w.sum() * P).long()
        sizes[0] += P - sizes.sum()
        sizes = sizes[torch.randperm(E, generator=gen)]
    return torch.cumsum(sizes, 0).to(torch.int32)


def transposed(P, rows, offs, gen, dev):
    x = (torch.randn(P, rows, generator=gen) * 2).to(device=dev, dtype=torch.bfloat16)
    q, s = ops.quantize_1x128(x)
    return ops.scaling_aware_transpose(q, s, offs.to(dev), 16)


def dense_rates(name, M, N, Pg, dev, gen, rows):
    """One group's call through cuBLASLt with each scaling pair; b's and a's block grids
    expanded to rows for the per-row call."""
    fp8 = torch.float8_e4m3fn
    T = cdiv(Pg, TILE)
    a = (torch.randn(M, Pg, generator=gen) * 2).to(dev).to(fp8)
    b = (torch.randn(N, Pg, generator=gen) * 2).to(dev).to(fp8)

    def pow2(*shape):
        return torch.exp2(torch.randint(-4, 4, shape, generator=gen).float()).to(dev)

    grid_a, grid_b = pow2(cdiv(M, TILE), T), pow2(cdiv(N, TILE), T)
    cm = lambda s: s.t().contiguous().t()  # noqa: E731
    rows_a = cm(grid_a.repeat_interleave(TILE, 0)[:M])
    rows_b = cm(grid_b.repeat_interleave(TILE, 0)[:N])
    grid_a, grid_b = CB.block_grid(grid_a), CB.block_grid(grid_b)  # the row stride cuBLAS reads
    flops = 2 * M * N * Pg
    outs, line = {}, [f"{name} one group [{M}, {Pg}] x [{N}, {Pg}]^T"]
    for kind, sa, sb in (("wgrad", rows_a, rows_b), ("wgrad_b", rows_a, grid_b),
                         ("wgrad_a", grid_a, rows_b)):
        call = LT.Caller(dev, kind, torch.float32)
        out = torch.empty(M, N, dtype=torch.float32, device=dev)
        call(a, sa, b, sb, out)
        outs[kind] = out
        ms = bench_ms(lambda: call(a, sa, b, sb, out), rep_ms=1500)
        same = "" if kind == "wgrad" else \
            f", same bits: {torch.equal(outs[kind], outs['wgrad'])}"
        line.append(f"{LABEL[kind]} {ms * 1e3:.1f} us {flops / ms / 1e9:.0f} TFLOP/s{same}")
        rows.append((name, f"one group [{M}, {Pg}] x [{N}, {Pg}]^T", LABEL[kind], ms,
                     flops / ms / 1e9))
    print(" | ".join(line), flush=True)


def grouped_rates(name, dims, routing, dev, gen, rows):
    T_, H, I, E, k = dims
    P = T_ * k
    offs = group_ends(P, E, routing, gen)
    pa = GR.pad_offsets(offs, 16).to(dev)
    oh = ops.offsets_to_host(pa)  # as the compiled graph hands it over: no sync per call
    torch.cuda.synchronize()
    for wname, (N, K) in (("FC1 wgrad", (2 * I, H)), ("FC2 wgrad", (H, I))):
        aT, aTs = transposed(P, N, offs, gen, dev)
        bT, bTs = transposed(P, K, offs, gen, dev)
        bTb = bTs[::TILE].contiguous()
        flops = 2 * P * N * K
        ref = ops.grouped_gemm_fp8_wgrad(aT, aTs, bT, bTs, pa, torch.float32, oh)
        got = ops.grouped_gemm_fp8_wgrad(aT, aTs, bT, bTb, pa, torch.float32, oh)
        same = torch.equal(ref, got)
        if not same:
            raise SystemExit(f"{name} {routing} {wname}: block scales changed the output")
        res = []
        for form, sb in (("per row", bTs), ("b blocks", bTb)):
            ms = bench_ms(lambda sb=sb: ops.grouped_gemm_fp8_wgrad(aT, aTs, bT, sb, pa,
                                                                   torch.float32, oh),
                          rep_ms=2000)
            res.append(ms)
            rows.append((name, f"{routing} {wname}", form, ms, flops / ms / 1e9))
        print(f"{name} {routing} {wname} grouped ({E} groups, {P} tokens): per row "
              f"{res[0]:.3f} ms ({flops / res[0] / 1e9:.0f} TFLOP/s), b blocks {res[1]:.3f} ms "
              f"({flops / res[1] / 1e9:.0f} TFLOP/s), {res[0] / res[1]:.2f}x, same bits {same}",
              flush=True)


def sustained_ms(fn, secs: float = 3.0, settle: float = 1.0) -> float:
    """Mean time per call, calls back to back for `secs` after `settle` seconds of them."""
    t0 = time.time()
    while time.time() - t0 < settle:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 0
    start.record()
    t0 = time.time()
    while time.time() - t0 < secs:
        fn()
        n += 1
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def halves_rates(name, dims, dev, gen, rows):
    T_, H, I, E, k = dims
    P = T_ * k
    offs = group_ends(P, E, "balanced", gen)
    pa = GR.pad_offsets(offs, 16).to(dev)
    oh = ops.offsets_to_host(pa)
    aT, aTs = transposed(P, 2 * I, offs, gen, dev)
    bT, bTs = transposed(P, H, offs, gen, dev)
    bTb = bTs[::TILE].contiguous()
    halves = [(aT[:I], aTs[:I]), (aT[I:], aTs[I:])]

    def one():
        return ops.grouped_gemm_fp8_wgrad(aT, aTs, bT, bTb, pa, torch.bfloat16, oh)

    def two():
        return [ops.grouped_gemm_fp8_wgrad(q, s, bT, bTb, pa, torch.bfloat16, oh)
                for q, s in halves]

    r1, r2 = one(), two()
    if not (torch.equal(r1[:, :I], r2[0]) and torch.equal(r1[:, I:], r2[1])):
        raise SystemExit(f"{name}: the halves' wgrads differ from the one op's rows")
    flops = 2 * P * 2 * I * H
    for label, fn in (("one op, M = 2I", one), ("two ops, M = I", two),
                      ("one op, M = 2I", one), ("two ops, M = I", two)):
        ms, sus = bench_ms(fn, rep_ms=1500), sustained_ms(fn)
        rows.append((name, f"balanced FC1 wgrad, {label}", "b blocks, sustained", sus,
                     flops / sus / 1e9))
        print(f"{name} FC1 wgrad {label}: do_bench {ms:.3f} ms, sustained {sus:.3f} ms "
              f"({flops / sus / 1e9:.0f} TFLOP/s); halves the same bits as the one op",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--halves", action="store_true",
                   help="one FC1 wgrad against two over its row halves (see the docstring)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("wgrad_scales.py needs a CUDA device (cuBLAS blockwise FP8, Hopper)")
    dev = torch.device("cuda")
    print(env_line(), f"| cuBLASLt {LT.version()}", flush=True)
    for kind in ("wgrad", "wgrad_a", "wgrad_b"):
        why = LT.probe(0, kind, torch.float32)
        if why is not None:
            raise SystemExit(f"cuBLASLt {kind} unavailable: {why}")
    gen = torch.Generator().manual_seed(0)
    rows: list[tuple] = []
    for name in args.shapes.split(","):
        if args.halves:
            halves_rates(name, SHAPES[name], dev, gen, rows)
            continue
        T_, H, I, E, k = SHAPES[name]
        Pg = T_ * k // E
        dense_rates(name, 2 * I, H, Pg, dev, gen, rows)
        dense_rates(name, H, I, Pg, dev, gen, rows)
        for routing in ("balanced", "skewed"):
            grouped_rates(name, SHAPES[name], routing, dev, gen, rows)
    print("\n| shape | GEMM | scales | ms | TFLOP/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.0f} |")


if __name__ == "__main__":
    main()
