"""The canonical MoE layer, written the way users write it: ordinary BF16 PyTorch, no FP8 code.

Softmax top-k router, argsort permutation, one grouped GEMM for gate+up, SwiGLU, one grouped GEMM
for down, weighted scatter back to token order. `torch._grouped_mm` is the seam torchtitan and
HF transformers >= 5 use for experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.hidden, self.inter, self.num_experts, self.top_k = hidden, inter, num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        # w13: gate and up projections stacked, [E, 2I, H]; w2: down projection, [E, H, I].
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype,
                                            device=device))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype, device=device))
        nn.init.normal_(self.w13, std=hidden**-0.5)
        nn.init.normal_(self.w2, std=inter**-0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.router(x).float(), dim=-1)
        topw, topi = probs.topk(self.top_k, dim=-1)
        return topw / topw.sum(-1, keepdim=True), topi

    def gate_up(self, xr: torch.Tensor, offs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections of the expert-sorted rows: one grouped GEMM over the
        stacked w13, split in halves."""
        h = torch._grouped_mm(xr, self.w13.transpose(-2, -1), offs=offs)
        return h.chunk(2, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        topw, topi = self.route(x)
        flat = topi.flatten()
        order = flat.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = self.gate_up(x[token], offs)
        a = F.silu(gate) * up
        y = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        y = y * topw.flatten()[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        return out.reshape(shape)
