"""Profile one forward+backward of the hand-wired FP8 flow MoE layer: top CUDA kernels."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.quickstart import FlowMoE  # noqa: E402

T, H, I, E, K = (int(v) for v in (sys.argv[1:] or ["4096", "2048", "1024", "16", "4"]))
m = FlowMoE(H, I, E, K, device="cuda")
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    m(x).backward(dy)
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        m(x).backward(dy)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
