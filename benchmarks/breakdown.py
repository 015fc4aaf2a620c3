"""Where the MoE layer's step goes, op by op, against each op's floor.

    python benchmarks/breakdown.py [--shapes dsv3,mixtral] [--routing balanced] [--steps 5]

For each shape (the layer and fixed routing of benchmarks/moe_layer.py): BF16 compiled and
fp8flow are timed as there (median of `--reps` steps, CUDA events, no profiler), then
`--steps` steps of each are profiled (CUDA kernels and host ops with their shapes). Every kernel
is charged to the outermost fp8flow op (or `aten::_grouped_mm`) whose host call launched it, by
the launch's correlation id, and its time per call is the span of those kernels (first start
to last end: the grouped GEMMs spread their calls over two streams); kernels launched outside
them are grouped by kernel name (Inductor's `triton_*`, sorts, memsets, other aten kernels)
and summed.

Floors, measured in the same process on the same device:

- memory-bound fp8flow ops: the bytes the op must move at the device-to-device copy bandwidth
  (a 2 GiB copy, bytes read plus written). Bytes are counted from the recorded input shapes and
  dtypes: each input read once, each output written once (see `op_bytes`). A gather's source
  rows count once although the kernel reads each once per copy it makes (top-k copies), mostly
  from L2;
- grouped GEMMs: their FLOPs at the rate of one dense cuBLAS GEMM of the same total size,
  timed here: blockwise FP8 (1x128 x 128x128 for fprop/dgrad, and for a wgrad one of whose
  operands has its scales in 128x128 blocks; 1x128 x 1x128 for other wgrads) for
  fp8flow, BF16 `torch.mm` for `aten::_grouped_mm`. The wgrad's FLOPs count the token columns
  of its aligned layout (the padding between groups included: 0.7% at DeepSeek-V3). This is
  a yardstick rather than a bound: cuBLAS picks its kernel per shape, and a grouped GEMM's
  per-group calls can beat the one dense call of their total size;
- everything else: no floor; it enters the "step at floors" as measured.

The last lines per shape add the floors up: the step if every op ran at its floor, and the
speedup over BF16 compiled (measured in the same run) that step would give. Needs CUDA.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.moe_layer as ML  # noqa: E402
from benchmarks.common import (  # noqa: E402
    bench_ms,
    copy_bandwidth_gbs,
    env_line,
    idle_gaps,
)

#: Element sizes of the dtype names the profiler records.
_SIZES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8, "int": 4, "long int": 8,
          "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1, "unsigned char": 1, "bool": 1,
          "signed char": 1, "short int": 2}
GEMM_OPS = ("fp8flow::grouped_gemm_fp8", "fp8flow::grouped_gemm_fp8_wgrad",
            "aten::_grouped_mm")
TILE = 128


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _inputs(args: dict) -> list[tuple[list[int], int]]:
    """(shape, element size) per input of a recorded host op ([] and 0 for non-tensors)."""
    dims = args.get("Input Dims") or []
    types = args.get("Input type") or []
    out = []
    for i, d in enumerate(dims):
        t = types[i] if i < len(types) else ""
        out.append((list(d) if isinstance(d, list) else [], _SIZES.get(t, 0)))
    return out


def _concrete(args: dict, i: int):
    vals = args.get("Concrete Inputs") or []
    v = vals[i] if i < len(vals) else ""
    try:
        return int(v)
    except (TypeError, ValueError):
        return v


def _bytes(t) -> int:
    dims, size = t
    return _numel(dims) * size if dims or size else 0


def op_bytes(name: str, args: dict) -> int | None:
    """Fewest bytes the fp8flow op must move (reads + writes), from its recorded inputs; None
    for ops without a formula. Scales are fp32 per 128 elements (1x128) or per 128x128 block."""
    ins = _inputs(args)
    op = name.split("::")[-1]
    if not ins:
        return None
    reads = sum(_bytes(t) for t in ins)
    if op == "index_add_rows":  # base (or None), index, src, weight in; [num_rows, H] out
        src = ins[2]
        rows = _concrete(args, 4)
        if len(src[0]) != 2 or not isinstance(rows, int):
            return None
        return reads + rows * src[0][1] * src[1]
    x = ins[0]
    if not x[0]:
        return None
    n = _numel(x[0])
    if op == "quantize_128x128_dual":
        return reads + 2 * n + 2 * 4 * n // (TILE * TILE)
    if op == "quantize_128x128":
        return reads + n + 4 * n // (TILE * TILE)
    if op in ("quantize_1x128", "quantize_1x128_col"):
        return reads + n + 4 * n // TILE
    if op == "scaling_aware_transpose":
        if len(ins) > 4 and len(ins[4][0]) == 1:
            # src_row: the gathered rows transposed. Like the gather's floor, the source rows
            # (q, s) and the index read once; each of the P rows written once, transposed.
            rows = ins[4][0][0]
            row_bytes = sum(_bytes(t) // max(t[0][0], 1) for t in ins[:2] if t[0])
            return _bytes(ins[0]) + _bytes(ins[1]) + _bytes(ins[4]) + rows * row_bytes
        return 2 * (_bytes(ins[0]) + _bytes(ins[1]))  # q and s in, the same amounts out
    if op in ("permute_pad_fp8", "permute_pad"):
        # out[r] = in[src_row[r]]: the inputs read once, each of the P output rows written once
        rows = _numel(ins[-1][0])
        row_bytes = sum(_bytes(t) // max(t[0][0], 1) for t in ins[:-1] if t[0])
        return reads + rows * row_bytes
    if op in ("swiglu_quant", "swiglu_quant_save"):
        P, C = x[0]
        out = P * (C // 2) + 4 * P * (C // 2) // TILE
        if op == "swiglu_quant_save":
            out += P * C + 4 * P * C // TILE
        return reads + out
    if op == "swiglu_quant_backward":  # dh (FP8 + scales) and dprobs out
        P, C = ins[1][0]
        probs = len(ins) > 2 and bool(ins[2][0])
        return reads + P * C + 4 * P * C // TILE + (4 * P if probs else 0)
    return None


def gemm_problem(name: str, args: dict) -> tuple[str, int, int, int] | None:
    """(kind, M, N, K) of a recorded grouped GEMM: out [M, N] summed over K per group, kind
    'fwd' (fprop/dgrad: a [M, K] rows, b [E, N, K] or [E, K, N]) or 'wgrad' (a [N, P], b [K, P]
    -> [E, N, K], reported as M = N, N = K, K = P)."""
    ins = _inputs(args)
    if len(ins) < 2:
        return None
    a = ins[0][0]
    b = ins[2][0] if name.startswith("fp8flow") else ins[1][0]
    if name == "fp8flow::grouped_gemm_fp8":
        M, K = a
        N = b[2] if b[1] == K and b[2] != K else b[1]
        return "fwd", M, N, K
    if name == "fp8flow::grouped_gemm_fp8_wgrad":
        # 'wgrad_blk' where either operand's scales come in 128x128 blocks (fewer scale rows
        # than rows): cuBLAS then runs the fprop's scaling pair (passes/block_scales.py)
        blocks = any(len(ins) > i and ins[i][0] and ins[i][0][0] != rows
                     for i, rows in ((1, a[0]), (3, b[0])))
        return ("wgrad_blk" if blocks else "wgrad"), a[0], b[0], a[1]
    if name == "aten::_grouped_mm":
        if len(b) == 3:  # [P, K] x [E, K, N]
            return "bf16", a[0], b[2], a[1]
        return "bf16", a[0], b[1], a[1]  # [N, P] x [P, K] -> [E, N, K]
    return None


def attribute(trace: dict) -> tuple[dict, dict, float]:
    """GPU time per outermost tracked host op and per untracked kernel group.

    Returns ({(name, input dims): [calls, us, args]}, {kernel group: [kernels, us]}, busy us).
    Tracked ops: fp8flow::* and aten::_grouped_mm. A kernel belongs to the op whose interval
    holds the host call (runtime or driver launch) with the kernel's correlation id, on the
    launching thread. An op's time is the span of its kernels, first start to last end: the
    grouped GEMMs run on two streams, where summed kernel durations would count the overlap
    twice. Busy is the union of all kernel intervals."""
    ev = trace["traceEvents"]
    tracked = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") == "cpu_op"
                      and (e["name"].startswith("fp8flow::") or e["name"] == "aten::_grouped_mm")),
                     key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    outer: dict = defaultdict(list)  # tid -> outermost ops, sorted by start
    for e in tracked:
        lst = outer[e["tid"]]
        if lst and e["ts"] < lst[-1]["ts"] + lst[-1]["dur"]:
            continue  # nested in the previous outermost op
        lst.append(e)
    starts = {tid: [e["ts"] for e in lst] for tid, lst in outer.items()}
    launches = {e["args"]["correlation"]: e for e in ev
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    spans: dict = {}  # id(op) -> [op, first start, last end]
    other: dict = {}
    intervals = []
    for g in ev:
        if g.get("ph") != "X" or g.get("cat") not in ("kernel", "gpu_memset", "gpu_memcpy"):
            continue
        intervals.append((g["ts"], g["ts"] + g["dur"]))
        host = launches.get(g.get("args", {}).get("correlation"))
        owner = None
        if host is not None and host["tid"] in outer:
            i = bisect.bisect_right(starts[host["tid"]], host["ts"]) - 1
            if i >= 0:
                cand = outer[host["tid"]][i]
                if host["ts"] <= cand["ts"] + cand["dur"]:
                    owner = cand
        if owner is not None:
            sp = spans.setdefault(id(owner), [owner, g["ts"], g["ts"] + g["dur"]])
            sp[1] = min(sp[1], g["ts"])
            sp[2] = max(sp[2], g["ts"] + g["dur"])
        else:
            rec = other.setdefault(kernel_group(g), [0, 0.0])
            rec[0] += 1
            rec[1] += g["dur"]
    ops: dict = {}
    for owner, a, b in spans.values():
        key = (owner["name"], json.dumps(owner["args"].get("Input Dims")))
        rec = ops.setdefault(key, [0, 0.0, owner["args"]])
        rec[0] += 1
        rec[1] += b - a
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return ops, other, busy


def kernel_group(g: dict) -> str:
    name = g.get("name", "")
    if g.get("cat") == "gpu_memset":
        return "memsets"
    if g.get("cat") == "gpu_memcpy":
        return "memcpy"
    if name.startswith("triton_"):
        return "Inductor kernels (triton_*)"
    if "sort" in name.lower():
        return "sorts"
    short = name.split("<")[0].split("(")[0].replace("void ", "").strip()
    return "kernel " + short[:48]


def dense_ms(kind: str, M: int, N: int, K: int, cache: dict) -> float:
    """Milliseconds of one dense cuBLAS GEMM out[M, N] = a[M, K] b[N, K]^T of the kind."""
    key = (kind, M, N, K)
    if key in cache:
        return cache[key]
    from benchmarks.kernels import cublas_blockwise
    from fp8flow_compile.kernels import quantize as Q
    dev = "cuda"
    if kind == "bf16":
        a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        b = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
        ms = bench_ms(lambda: a @ b)
    else:
        # wgrad_blk: the fprop's pair (1x128 x 128x128) over the tokens, which torch's call
        # takes in multiples of 512: timed at K rounded up to that and scaled back
        Kt = -(-K // 512) * 512 if kind == "wgrad_blk" else K
        aq, as_ = Q.quantize_1x128_triton(torch.randn(M, Kt, device=dev, dtype=torch.bfloat16))
        wb = torch.randn(N, Kt, device=dev, dtype=torch.bfloat16)
        bq, bs = (Q.quantize_1x128_triton(wb) if kind == "wgrad"
                  else Q.quantize_128x128_triton(wb))
        pair = "wgrad" if kind == "wgrad" else "fwd"
        ms = bench_ms(lambda: cublas_blockwise(aq, as_, bq, bs, pair)) * K / Kt
        del aq, as_, bq, bs, wb
    cache[key] = ms
    torch.cuda.empty_cache()
    return ms


def table(ops: dict, other: dict, steps: int, bw_gbs: float, dense: dict
          ) -> tuple[list[tuple], float, float]:
    """Rows (op, shapes, calls/step, ms/step, work/step, floor ms/step, floor share) and the
    totals (measured ms of the rows, ms at floors), per step."""
    rows = []
    at_floor = measured = 0.0
    for (name, dims), (count, us, args) in sorted(ops.items(), key=lambda kv: -kv[1][1]):
        ms = us / 1e3 / steps
        calls = count / steps
        work = floor = None
        prob = gemm_problem(name, args) if name in GEMM_OPS else None
        if prob is not None:
            kind, M, N, K = prob
            work = f"{2 * M * N * K * calls / 1e12:.2f} TFLOP"
            floor = dense_ms(kind, M, N, K, dense) * calls
        else:
            nb = op_bytes(name, args)
            if nb is not None:
                work = f"{nb * calls / 1e9:.2f} GB"
                floor = nb * calls / (bw_gbs * 1e6)
        measured += ms
        at_floor += floor if floor is not None else ms
        short_dims = ", ".join(str(d) for d in json.loads(dims)[:3] if d) if dims else ""
        rows.append((name.replace("fp8flow::", ""), short_dims, calls, ms, work, floor))
    for group, (count, us) in sorted(other.items(), key=lambda kv: -kv[1][1]):
        ms = us / 1e3 / steps
        measured += ms
        at_floor += ms
        rows.append((group, "", count / steps, ms, None, None))
    return rows, measured, at_floor


def profile_steps(fn, layer, x, dy, steps: int) -> dict:
    xg = x.detach().requires_grad_(True)
    for _ in range(2):
        fn(xg).backward(dy)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            xg.grad = None
            for p in layer.parameters():
                p.grad = None
            fn(xg).backward(dy)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


def step_ms(fn, layer, x, dy, reps: int) -> float:
    xg = x.detach().requires_grad_(True)

    def clear():
        xg.grad = None
        for p in layer.parameters():
            p.grad = None

    return statistics.median(ML.time_ms(lambda: fn(xg).backward(dy), clear,
                                        torch.device("cuda"), 3, reps))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="dsv3,mixtral")
    p.add_argument("--routing", default="balanced", choices=ML.ROUTINGS)
    p.add_argument("--variants", default="bf16_compiled,fp8flow")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--reps", type=int, default=20, help="timed steps (no profiler)")
    p.add_argument("--experts", choices=ML.EXPERT_LAYOUTS, default="stacked",
                   help="stacked w13, or separate w1 / w3 (two FC1 GEMMs)")
    p.add_argument("--align", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("breakdown.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(env_line())
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write); routing {args.routing}; "
          f"{args.steps} profiled steps, step times: median of {args.reps}")
    dense: dict = {}
    for shape in args.shapes.split(","):
        dims = ML.SHAPES[shape]
        T, H, I, E, k = dims
        topw, topi, loads, w13, w2, x, dy = ML.setup_case(shape, dims, args.routing, args,
                                                          torch.device("cuda"), args.seed)
        print(f"\n=== {shape}: T={T} H={H} I={I} E={E} top-{k}, {args.routing}, experts "
              f"{args.experts} ===")
        steps_ms = {}
        for key in args.variants.split(","):
            fn, layer, _ = ML.make_variant(key, dims, w13, w2, topw, topi, loads, args.align,
                                           False, layout=args.experts)
            steps_ms[key] = step_ms(fn, layer, x, dy, args.reps)
            trace = profile_steps(fn, layer, x, dy, args.steps)
            ops, other, busy = attribute(trace)
            idle, gaps = idle_gaps(trace)
            del trace, fn, layer
            ML.free(torch.device("cuda"))
            rows, measured, at_floor = table(ops, other, args.steps, bw, dense)
            print(f"\n-- {ML.VARIANTS[key]}: step {steps_ms[key]:.2f} ms (no profiler); "
                  f"profiled: GPU busy {busy / 1e3 / args.steps:.2f} ms/step")
            print("| op | first inputs | calls/step | ms/step | work/step | floor ms | "
                  "floor / measured |")
            print("|---|---|---|---|---|---|---|")
            for name, dims_s, calls, ms, work, floor in rows:
                if ms < 0.005:
                    continue
                fl = f"{floor:.3f}" if floor is not None else "-"
                share = f"{floor / ms:.0%}" if floor is not None and ms > 0 else "-"
                print(f"| {name} | {dims_s} | {calls:g} | {ms:.3f} | {work or '-'} | {fl} | "
                      f"{share} |")
            gemm = [r for r in rows if r[0] in ("grouped_gemm_fp8", "grouped_gemm_fp8_wgrad",
                                                "aten::_grouped_mm")]
            g_ms = sum(r[3] for r in gemm)
            g_floor = sum(r[5] for r in gemm if r[5] is not None)
            mem = [r for r in rows if r not in gemm and r[5] is not None]
            m_ms = sum(r[3] for r in mem)
            m_floor = sum(r[5] for r in mem)
            rest = measured - g_ms - m_ms
            print(f"GEMMs {g_ms:.2f} ms (floor {g_floor:.2f}); ops with a byte floor "
                  f"{m_ms:.2f} ms (floor {m_floor:.2f}); the rest {rest:.2f} ms (no floor); "
                  f"kernels summed {measured:.2f} ms/step")
            base = steps_ms.get(ML.BASELINE)
            line = f"step at floors: {at_floor:.2f} ms"
            if base and key != ML.BASELINE:
                line += (f" -> {base / at_floor:.2f}x over BF16 compiled "
                         f"({base:.2f} ms); measured {base / steps_ms[key]:.2f}x")
            print(line)
            print(f"GPU idle between kernels: {idle / 1e3 / args.steps:.2f} ms/step "
                  "(profiled); largest gaps:")
            for us, before, after, host in gaps:
                print(f"  {us:7.0f} us  {before[:40]} -> {after[:40]}  | host: "
                      + "; ".join(h[:50] for h in host))
        del topw, topi, w13, w2, x, dy
        ML.free(torch.device("cuda"))


if __name__ == "__main__":
    main()
