"""Run each FP8 GEMM form once in its own process (a CUDA fault poisons the context) and
report which fail, at aligned and unaligned group bounds."""

import subprocess
import sys

CASE = r'''
import torch, sys
from fp8flow_compile.kernels import gemm as G, quantize as Q
case, aligned = sys.argv[1], sys.argv[2] == "1"
P, K, N, E = 4096, 1024, 1024, 8
g = torch.Generator().manual_seed(0)
sizes = torch.randint(0, 2 * P // E, (E,), generator=g)
if aligned:
    sizes = sizes // 16 * 16
offs = torch.cumsum(sizes, 0).clamp(max=P - 128).to(torch.int32).cuda()
x = torch.randn(P, K, device="cuda", dtype=torch.bfloat16)
dy = torch.randn(P, N, device="cuda", dtype=torch.bfloat16)
w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / 32
aq, as_ = Q.quantize_1x128_triton(x); dq, ds = Q.quantize_1x128_triton(dy)
wq, ws = Q.quantize_128x128_triton(w)
if case == "fprop":
    o = G.grouped_gemm_fp8_triton(aq, as_, wq, ws, offs, True)
    r = G.grouped_gemm_fp8_ref(aq, as_, wq, ws, offs, True, torch.float32)
elif case == "dgrad":
    o = G.grouped_gemm_fp8_triton(dq, ds, wq, ws, offs, False)
    r = G.grouped_gemm_fp8_ref(dq, ds, wq, ws, offs, False, torch.float32)
elif case == "wgrad":
    ta = Q.quantize_1x128_col_triton(dy, offs); tb = Q.quantize_1x128_col_triton(x, offs)
    o = G.grouped_gemm_fp8_wgrad_triton(*ta, *tb, offs)
    r = G.grouped_gemm_fp8_wgrad_ref(*ta, *tb, offs)
elif case == "dense_fprop":
    o = G.gemm_fp8_triton(aq, as_, wq[0], ws[0], True)
    r = G.gemm_fp8_ref(aq, as_, wq[0], ws[0], True, torch.float32)
elif case == "dense_dgrad":
    o = G.gemm_fp8_triton(dq, ds, wq[0], ws[0], False)
    r = G.gemm_fp8_ref(dq, ds, wq[0], ws[0], False, torch.float32)
torch.cuda.synchronize()
err = ((o.double() - r.double()).norm() / r.double().norm()).item()
print(f"{case} aligned={aligned}: ok rel err {err:.2e}")
'''

for case in ["fprop", "dgrad", "wgrad", "dense_fprop", "dense_dgrad"]:
    for aligned in ("1", "0"):
        p = subprocess.run([sys.executable, "-c", CASE, case, aligned], capture_output=True,
                           text=True, env={"CUDA_LAUNCH_BLOCKING": "1", **__import__("os").environ})
        if p.returncode:
            last = [ln for ln in p.stderr.splitlines() if "Error" in ln][-1:]
            print(f"{case} aligned={aligned == '1'}: FAILED {last}")
        else:
            print(p.stdout.strip())
