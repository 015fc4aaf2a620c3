"""Sustained power, SM clock and energy per call of the kinds of work in the MoE layer's step.

Why: under sustained load the H100 SXM sits at its 700 W board limit and lowers its SM clock to
stay there, so a step's time follows the energy it needs more than the GPU time its kernels
take alone at full clock. This benchmark runs each kind of work back to back for `--block-s`
seconds (the first `--settle-s` not counted) and reports, per call: the median time (CUDA
events over groups of calls), the medians of the SM clock and board power sampled every 20 ms
through NVML, and the energy as that power times that time (in the steady state a sustained
block reaches). A kernel made faster at full clock shortens a power-bound step only if it also
needs less energy.

Workloads at the DeepSeek-V3 shard's shapes (T tokens, hidden H, intermediate I, E experts,
top-k; balanced routing, P = T*k rows in the aligned group layout):

- the six grouped GEMMs of the experts' forward and backward, each as fp8flow runs it (blockwise
  FP8, one cuBLAS call per group: 1x128 x 128x128 for fprop and dgrad; the wgrads on the
  scaling-aware transpose's outputs, b's scales as 128x128 blocks) and as BF16
  `torch._grouped_mm` on the same shapes;
- the memory-bound ops of the flow: the weights' dual quantization (w13), the transpose through
  the gather's index, the FP8 row gather (`permute_pad_fp8`), `quantize_1x128` of the tokens;
- a device-to-device copy (the bandwidth yardstick).

Rates: TFLOP/s for the GEMMs (2*P*H*2I), GB/s for the rest (each input read once, each output
written once). Needs a CUDA GPU and NVML (`pynvml`, from nvidia-ml-py).

    python benchmarks/power.py [--block-s 5 --settle-s 2] [--out docs/results/power.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import env_line  # noqa: E402
from benchmarks.moe_layer import Telemetry, Timed, sustained_ms  # noqa: E402
from fp8flow_compile.kernels import cublas as CB  # noqa: E402
from fp8flow_compile.kernels import permute as PM  # noqa: E402
from fp8flow_compile.kernels.groups import pad_offsets  # noqa: E402
from fp8flow_compile.recipe import BLOCKWISE  # noqa: E402

ops = torch.ops.fp8flow
GA = BLOCKWISE.group_align
CALLS = 4  # calls per timed step


def sustained(fn, tel: Telemetry, block_s: float, settle_s: float) -> dict:
    """fn called back to back for block_s seconds, in steps of CALLS calls, through the layer
    benchmark's sustained timing (`moe_layer.sustained_ms`: the host at most two steps ahead of
    the GPU, the steps of the first settle_s seconds not counted); per call the median time and,
    from the samples of the counted part, the SM clock, power and energy."""
    def step():
        for _ in range(CALLS):
            fn()

    got, blocks = sustained_ms([Timed("w", step, lambda: None)], torch.device("cuda"), block_s,
                               settle_s, 1, telemetry=tel)
    if isinstance(got["w"], str):  # the error of a step that raised
        raise RuntimeError(got["w"])
    b = blocks["w"][0]
    out = {"ms": b["ms"] / CALLS, "calls": CALLS * b["steps"], "samples": b["samples"]}
    out.update({k: b[k] for k in ("sm_mhz", "power_w") if k in b})
    if "power_w" in out:
        out["mj_per_call"] = out["power_w"] * out["ms"]  # W x ms = mJ
    return out


def workloads(T: int, H: int, I: int, E: int, k: int) -> list[tuple[str, object, float, str]]:
    """(name, fn, work per call, unit) at these shapes, inputs made once."""
    dev = "cuda"
    bf = torch.bfloat16
    topi = torch.rand(T, E, device=dev).topk(k, dim=1).indices
    maps = PM.moe_routing_maps(topi, E, GA)
    offs = maps.offs_pad
    P = maps.src_row.numel()
    oh = CB.host_copy(offs)
    ga = pad_offsets(offs, GA)  # the column-wise (wgrad) layout's group ends
    gah = CB.host_copy(ga)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=bf) * scale

    # BF16 operands as BF16 compiled's graph holds them, and their FP8 forms as fp8flow's
    x, x_p, a_p, dy_p, dh_p = rand(T, H), rand(P, H), rand(P, I), rand(P, H), rand(P, 2 * I)
    w13, w2 = rand(E, 2 * I, H, scale=0.02), rand(E, H, I, scale=0.02)
    q = {n: ops.quantize_1x128(t) for n, t in
         (("x", x), ("x_p", x_p), ("a_p", a_p), ("dy_p", dy_p), ("dh_p", dh_p))}
    w13q, w13s, w13qT, w13sT = ops.quantize_128x128_dual(w13)
    w2q, w2s, w2qT, w2sT = ops.quantize_128x128_dual(w2)
    tr = {n: ops.scaling_aware_transpose(*q[n], offs, GA) for n in ("x_p", "a_p", "dy_p", "dh_p")}

    def blocks(s):  # b's scales of a wgrad as the 128x128 blocks they are (passes/block_scales)
        return s[::128].contiguous()

    def fwd(a, b, bs):
        return lambda: CB.grouped_fwd(*q[a], b, bs, offs, bf, offs_host=oh)

    def wgrad(a, b):
        return lambda: CB.grouped_wgrad(*tr[a], tr[b][0], blocks(tr[b][1]), ga, bf,
                                        offs_host=gah)

    f1, f2 = 2.0 * P * H * 2 * I, 2.0 * P * I * H
    gemms = [
        ("FC1 fprop", fwd("x_p", w13q, w13s), lambda: torch._grouped_mm(x_p, w13.mT, offs=offs),
         f1),
        ("FC2 fprop", fwd("a_p", w2q, w2s), lambda: torch._grouped_mm(a_p, w2.mT, offs=offs), f2),
        ("FC2 dgrad", fwd("dy_p", w2qT, w2sT), lambda: torch._grouped_mm(dy_p, w2, offs=offs),
         f2),
        ("FC1 dgrad", fwd("dh_p", w13qT, w13sT), lambda: torch._grouped_mm(dh_p, w13, offs=offs),
         f1),
        ("FC1 wgrad", wgrad("dh_p", "x_p"), lambda: torch._grouped_mm(dh_p.t(), x_p, offs=offs),
         f1),
        ("FC2 wgrad", wgrad("dy_p", "a_p"), lambda: torch._grouped_mm(dy_p.t(), a_p, offs=offs),
         f2),
    ]
    out = []
    for name, fp8, bf16, flops in gemms:
        out.append((f"{name}, FP8 blockwise (fp8flow)", fp8, flops, "TFLOP/s"))
        out.append((f"{name}, BF16 torch._grouped_mm", bf16, flops, "TFLOP/s"))
    xq, xs = q["x"]
    tq, ts = ops.scaling_aware_transpose(xq, xs, offs, GA, maps.src_row)
    big = torch.empty(1 << 31, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    return out + [
        ("quantize_128x128_dual w13", lambda: ops.quantize_128x128_dual(w13),
         w13.numel() * 4, "GB/s"),
        ("scaling_aware_transpose through the index",
         lambda: ops.scaling_aware_transpose(xq, xs, offs, GA, maps.src_row),
         T * H + tq.numel() + 4 * ts.numel(), "GB/s"),
        ("permute_pad_fp8", lambda: ops.permute_pad_fp8(xq, xs, maps.src_row),
         T * H + P * H, "GB/s"),
        ("quantize_1x128 x", lambda: ops.quantize_1x128(x), 3 * T * H, "GB/s"),
        ("device copy 2 GiB", lambda: big2.copy_(big), 2 * big.numel(), "GB/s"),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--block-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--rest-s", type=float, default=2.0, help="idle seconds between workloads")
    p.add_argument("--out", default=None, help="append one JSON row per workload here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/power.py needs a CUDA GPU")
    if not 0 <= args.settle_s < args.block_s:
        p.error("--settle-s must lie in [0, --block-s)")
    tel = Telemetry()
    if tel.handle is None:
        sys.exit(f"benchmarks/power.py needs NVML: {tel.info.get('telemetry')}")
    env = env_line()
    print(env)
    print(f"power limit {tel.info['power_limit_w']:.0f} W, SM clock max "
          f"{tel.info['max_sm_mhz']} MHz; shapes T={args.tokens} H={args.hidden} "
          f"I={args.inter} E={args.experts} top-{args.topk}, balanced routing")
    time.sleep(args.rest_s)
    idle = tel.window([(time.perf_counter() - args.rest_s, time.perf_counter())])
    print(f"idle: {idle.get('power_w', '-')} W at {idle.get('sm_mhz', '-')} MHz")
    torch.manual_seed(0)
    rows = []
    for name, fn, work, unit in workloads(args.tokens, args.hidden, args.inter, args.experts,
                                          args.topk):
        try:
            fn()  # first call (Triton's compile, cuBLAS's search) outside the timing
            torch.cuda.synchronize()
            r = sustained(fn, tel, args.block_s, args.settle_s)
        except Exception as e:  # a workload this torch build cannot run: say so, go on
            print(f"  {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch.cuda.synchronize()
            continue
        scale = 1e9 if unit == "TFLOP/s" else 1e6  # per ms: FLOP -> TFLOP/s, bytes -> GB/s
        r.update(name=name, rate=work / r["ms"] / scale, unit=unit)
        rows.append(r)
        print(f"  {name}: {r['ms']:.4f} ms, {r['rate']:.0f} {unit}, {r.get('sm_mhz', '-')} MHz, "
              f"{r.get('power_w', '-')} W", flush=True)
        time.sleep(args.rest_s)
    tel.stop()
    print("\n| workload | ms per call | rate | SM MHz | W | mJ per call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mj = f"{r['mj_per_call']:.0f}" if "mj_per_call" in r else "-"
        print(f"| {r['name']} | {r['ms']:.4f} | {r['rate']:.0f} {r['unit']} | "
              f"{r.get('sm_mhz', '-')} | {r.get('power_w', '-')} | {mj} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"env": env, "shape": [args.tokens, args.hidden, args.inter,
                                                          args.experts, args.topk], **r}) + "\n")


if __name__ == "__main__":
    main()
