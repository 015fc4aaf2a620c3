"""Launch-parameter sweep of the memory-bound quantize/transpose kernels at DeepSeek-V3 shapes:
GB/s (fewest bytes) per variant, against the copy bandwidth of the same run."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, copy_bandwidth_gbs, env_line  # noqa: E402
from fp8flow_compile.kernels import permute as PM  # noqa: E402
from fp8flow_compile.kernels import quantize as Q  # noqa: E402
from fp8flow_compile.kernels import transpose as TR  # noqa: E402

T, H, E, k = 8192, 7168, 32, 8
bw = copy_bandwidth_gbs()
print(env_line(), f"copy {bw:.0f} GB/s")
topi = torch.rand(T, E, device="cuda").topk(k, dim=1).indices
maps = PM.moe_routing_maps(topi, E, 16)
P, offs = maps.src_row.numel(), maps.offs_pad
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
xp = torch.randn(P, H, device="cuda", dtype=torch.bfloat16)
w = torch.randn(E, 4096, H, device="cuda", dtype=torch.bfloat16)
xq, xs = Q.quantize_1x128_triton(xp)


def row(name, fn, nbytes):
    try:
        ms = bench_ms(fn)
        gbs = nbytes / ms / 1e6
        print(f"{name:<48} {ms:8.3f} ms {gbs:7.0f} GB/s {gbs / bw:5.0%}")
    except Exception as e:
        print(f"{name:<48} failed: {type(e).__name__} {str(e)[:60]}")


for br in (8, 16, 32, 64):
    for nw in (2, 4, 8):
        row(f"quantize_1x128 block_r={br} w{nw}",
            lambda: Q.quantize_1x128_triton(x, None, br, nw), T * H * 3 + T * H // 32)
for bk in (16, 32, 64, 128):
    for nw in (4, 8, 16):
        row(f"quantize_1x128_col block_k={bk} w{nw}",
            lambda: Q.quantize_1x128_col_triton(xp, offs, bk, nw), P * H * 3 + P * H // 32)
for nw in (4, 8, 16, 32):
    row(f"quantize_128x128 w{nw}", lambda: Q.quantize_128x128_triton(w, False, nw), w.numel() * 3)
    row(f"quantize_128x128_dual w{nw}", lambda: Q.quantize_128x128_triton(w, True, nw),
        w.numel() * 4)
    row(f"scaling_aware_transpose w{nw}",
        lambda: TR.scaling_aware_transpose_triton(xq, xs, offs, nw), 2 * P * H + P * H // 16)
