"""Profile forward + backward of the MoE layer: top CUDA kernels, and GPU-busy vs wall time.

    python benchmarks/profile_flow.py [compiled|hand|bf16] T H I E K

`compiled` is torch.compile(backend=fp8flow), `hand` the hand-wired flow
(fp8flow_compile.flow), `bf16` BF16 under torch.compile. The last line compares the step's wall
time with the summed kernel time: a large gap means the GPU waits on the host (launch overhead or
a synchronisation).
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fp8flow_compile as ff  # noqa: E402
from examples.moe import MoE  # noqa: E402
from examples.quickstart import FlowMoE  # noqa: E402

variant = sys.argv[1] if len(sys.argv) > 1 else "compiled"
T, H, I, E, K = (int(v) for v in (sys.argv[2:] or ["4096", "2048", "1024", "16", "4"]))
torch.manual_seed(0)
if variant == "hand":
    m = FlowMoE(H, I, E, K, device="cuda")
elif variant == "compiled":
    m = torch.compile(MoE(H, I, E, K, device="cuda"), backend=ff.fp8flow)
else:
    m = torch.compile(MoE(H, I, E, K, device="cuda"))
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    m(x).backward(dy)
torch.cuda.synchronize()
steps = 5
t0 = time.perf_counter()
for _ in range(steps):
    m(x).backward(dy)
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / steps * 1e3
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                        torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
        m(x).backward(dy)
    torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
busy = sum(e.self_device_time_total for e in ka) / steps / 1e3
print(f"{variant} T={T} H={H} I={I} E={E} top{K}: wall {wall:.3f} ms/step, "
      f"kernels {busy:.3f} ms/step")
