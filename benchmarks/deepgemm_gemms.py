"""DeepGEMM's m-grouped blockwise FP8 GEMM against the package's cuBLAS loop, same operands.

The four grouped fprop/dgrad GEMMs of the MoE layer (balanced routing: every expert the same
rows, so the groups start on DeepGEMM's 128-row grid), at the DeepSeek-V3 shard and optionally
the Mixtral-like shape: each output compared with the other and with a float32 product of the
same FP8 operands (first group), then each timed with do_bench and back to back at the board's
power limit (`benchmarks/power.py`'s sustained blocks: time, SM clock, power, energy per call).
Each is measured twice, interleaved. Needs a Hopper GPU, NVML and an installed DeepGEMM.

    SHAPES=dsv3,mixtral BLOCK_S=4 SETTLE_S=1.5 python benchmarks/deepgemm_gemms.py

Writes `dg.jsonl` into $OUT (default: the current folder).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deep_gemm  # noqa: E402

from benchmarks.common import env_line  # noqa: E402
from benchmarks.moe_layer import Telemetry  # noqa: E402
from benchmarks.power import sustained  # noqa: E402
from fp8flow_compile.kernels import cublas as CB  # noqa: E402
from fp8flow_compile.kernels import gemm as G  # noqa: E402

ops = torch.ops.fp8flow
bf = torch.bfloat16
dev = "cuda"
BLOCK_S = float(os.environ.get("BLOCK_S", 5))
SETTLE_S = float(os.environ.get("SETTLE_S", 2))
REST_S = 1.5


def main():
    print(env_line())
    print("deep_gemm", deep_gemm.__version__)
    tel = Telemetry()
    print("power limit", tel.info.get("power_limit_w"), "max MHz", tel.info.get("max_sm_mhz"))
    shapes = os.environ.get("SHAPES", "dsv3,mixtral").split(",")
    dims = {"dsv3": (8192, 7168, 2048, 32, 8), "mixtral": (8192, 4096, 14336, 8, 2)}
    rows = []
    for shp in shapes:
        T, H, I, E, k = dims[shp]
        P = T * k
        per = P // E
        torch.manual_seed(0)
        offs = (torch.arange(1, E + 1, device=dev) * per).to(torch.int32)
        oh = CB.host_copy(offs)
        m_idx = torch.arange(E, device=dev, dtype=torch.int32).repeat_interleave(per)

        def rand(*s, scale=1.0):
            return torch.randn(*s, device=dev, dtype=bf) * scale

        acts = {"x_p": rand(P, H), "a_p": rand(P, I), "dy_p": rand(P, H), "dh_p": rand(P, 2 * I)}
        q = {n: ops.quantize_1x128(t) for n, t in acts.items()}
        del acts
        w13, w2 = rand(E, 2 * I, H, scale=0.02), rand(E, H, I, scale=0.02)
        w = {}
        w["w13"], w["w13s"], w["w13T"], w["w13sT"] = ops.quantize_128x128_dual(w13)
        w["w2"], w["w2s"], w["w2T"], w["w2sT"] = ops.quantize_128x128_dual(w2)
        del w13, w2
        gemms = [
            ("FC1 fprop", "x_p", "w13", 2 * I, H),
            ("FC2 fprop", "a_p", "w2", H, I),
            ("FC2 dgrad", "dy_p", "w2T", I, H),
            ("FC1 dgrad", "dh_p", "w13T", H, 2 * I),
        ]
        for name, a, b, N, K in gemms:
            aq, as_ = q[a]
            bq = w[b]
            bs = w[b.replace("T", "") + "s" + ("T" if b.endswith("T") else "")]
            assert bq.shape == (E, N, K), (bq.shape, N, K)
            flops = 2.0 * P * N * K
            sfa_mn = as_.t().contiguous().t()  # MN-major, as DeepGEMM's sm90 kernels read it
            d = torch.empty(P, N, device=dev, dtype=bf)

            def ours():
                return CB.grouped_fwd(aq, as_, bq, bs, offs, bf, offs_host=oh)

            def dg():
                deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
                    (aq, sfa_mn), (bq, bs), d, m_idx, recipe=(1, 128, 128)
                )
                return d

            def dg_kmajor():  # scales as fp8flow writes them: DeepGEMM lays them out per call
                deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
                    (aq, as_), (bq, bs), d, m_idx, recipe=(1, 128, 128)
                )
                return d

            t0 = time.perf_counter()
            try:
                o2 = dg().clone()
            except Exception as e:
                print(
                    f"{shp} {name}: deep_gemm failed: {type(e).__name__}: {str(e)[:500]}",
                    flush=True,
                )
                continue
            torch.cuda.synchronize()
            print(f"{shp} {name}: first deep_gemm call {time.perf_counter() - t0:.1f} s (JIT)")
            o1 = ours()
            # fp32 reference on the first group's rows
            r = slice(0, per)
            ref = G.gemm_fp8_ref(aq[r], as_[r], bq[0], bs[0], True, torch.float32)
            e1 = ((o1[r].float() - ref).norm() / ref.norm()).item()
            e2 = ((o2[r].float() - ref).norm() / ref.norm()).item()
            e12 = ((o1.float() - o2.float()).norm() / o1.float().norm()).item()
            eq = torch.equal(o1, o2)
            print(
                f"{shp} {name}: rel err vs fp32 (group 0): cuBLAS {e1:.2e}, DeepGEMM {e2:.2e}; "
                f"cuBLAS vs DeepGEMM {e12:.2e}, bit-equal {eq}",
                flush=True,
            )
            assert e1 < 1e-2 and e2 < 1e-2
            for impl, fn in (
                ("cuBLAS (fp8flow)", ours),
                ("DeepGEMM", dg),
                ("DeepGEMM, K-major sf", dg_kmajor),
                ("cuBLAS (fp8flow) again", ours),
                ("DeepGEMM again", dg),
            ):
                ms_b = triton.testing.do_bench(fn, warmup=50, rep=300)
                time.sleep(REST_S)
                s = sustained(fn, tel, BLOCK_S, SETTLE_S)
                row = dict(
                    shape=shp,
                    gemm=name,
                    impl=impl,
                    do_bench_ms=ms_b,
                    do_bench_tflops=flops / ms_b / 1e9,
                    tflops=flops / s["ms"] / 1e9,
                    **s,
                )
                rows.append(row)
                print(
                    f"  {shp} {name} {impl}: do_bench {ms_b:.3f} ms "
                    f"({row['do_bench_tflops']:.0f}); "
                    f"sustained {s['ms']:.3f} ms ({row['tflops']:.0f} TFLOP/s) "
                    f"{s.get('sm_mhz')} MHz {s.get('power_w')} W {s.get('mj_per_call', 0):.0f} mJ",
                    flush=True,
                )
        del q, w
        torch.cuda.empty_cache()
    tel.stop()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "dg.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("\n| shape | GEMM | impl | do_bench ms | sustained ms | TFLOP/s | MHz | W | mJ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['gemm']} | {r['impl']} | {r['do_bench_ms']:.3f} | "
            f"{r['ms']:.3f} | {r['tflops']:.0f} | {r.get('sm_mhz')} | {r.get('power_w')} | "
            f"{r.get('mj_per_call', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
