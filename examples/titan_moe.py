"""A torchtitan-style MoE block in plain BF16 PyTorch, and fp8flow compiling it.

The layout follows torchtitan's conventions: the experts hold three stacked weights,
w1 (gate) and w3 (up) as [E, I, H] and w2 (down) as [E, H, I], each used through
`torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)` over tokens sorted by expert, so
gate and up are two grouped GEMMs, not one over a stacked [E, 2I, H] weight as in HF
transformers. The router is token-choice top-k with sigmoid (DeepSeek-V3) or softmax scores; an
optional `expert_bias` buffer is added to the scores for the choice of experts only, while the
gating values come from the unbiased scores (auxiliary-loss-free load balancing: the bias is
updated outside the model from the token counts, which the block accumulates). An optional
shared expert (a dense SwiGLU MLP) sees every token.

    python examples/titan_moe.py   # compiles a tiny block with fp8flow on CPU, prints the report
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """E SwiGLU experts run as grouped GEMMs over expert-sorted tokens."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # gate
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # down
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # up

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: [P, dim], rows grouped by expert; tokens_per_expert: [E] row counts."""
        offs = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        gate = torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(w, std=std)


class TokenChoiceTopKRouter(nn.Module):
    """Scores every expert for every token and keeps the top k.

    `expert_bias` (if given) shifts the scores for the selection only; the returned gating
    values are the unbiased scores of the chosen experts, normalised to sum to 1 when
    `route_norm`, then multiplied by `route_scale`. Scores are computed in float32.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int,
                 score_func: Literal["sigmoid", "softmax"] = "sigmoid",
                 route_norm: bool = True, route_scale: float = 1.0):
        super().__init__()
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, dim] -> (gating values [T, k] float32, expert indices [T, k] int64)."""
        logits = self.gate(x).float()
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = F.softmax(logits, dim=-1)
        if expert_bias is None:
            top, idx = scores.topk(self.top_k, dim=-1)
        else:
            idx = (scores + expert_bias).topk(self.top_k, dim=-1).indices
            top = scores.gather(-1, idx)
        if self.route_norm:
            top = top / (top.sum(-1, keepdim=True) + 1e-20)
        return top * self.route_scale, idx


def reorder_tokens(idx: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T*k (token, expert) pairs by expert.

    Returns (order [T*k]: position of each sorted pair in the flat [T, k] choice,
    token [T*k]: the token of each sorted pair, tokens_per_expert [E]).
    """
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    # A scatter-add keeps the count's shape static; bincount's size depends on the data and
    # breaks the graph.
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // idx.shape[-1], counts


class FeedForward(nn.Module):
    """Dense SwiGLU MLP (the shared expert)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Router -> token reordering -> grouped experts -> weighted scatter back (+ shared expert).

    `score_before_experts` multiplies the routed tokens by their gating values before the
    experts (torchtitan's default) instead of the expert outputs after them.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int,
                 score_func: Literal["sigmoid", "softmax"] = "sigmoid",
                 num_shared_experts: int = 1, load_balance: bool = True,
                 score_before_experts: bool = False):
        super().__init__()
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.router = TokenChoiceTopKRouter(dim, num_experts, top_k, score_func)
        self.experts = GroupedExperts(dim, hidden_dim, num_experts)
        self.shared_experts = (FeedForward(dim, hidden_dim * num_shared_experts)
                               if num_shared_experts > 0 else None)
        self.score_before_experts = score_before_experts
        # Aux-loss-free balancing: the bias steers selection; an optimizer-step hook (not part
        # of this block) moves it against the load counted in tokens_per_expert.
        self.register_buffer("expert_bias", torch.zeros(num_experts) if load_balance else None)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts), persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            for lin in (self.shared_experts.w1, self.shared_experts.w2, self.shared_experts.w3):
                nn.init.trunc_normal_(lin.weight, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        top, idx = self.router(x, self.expert_bias)
        order, token, counts = reorder_tokens(idx, self.num_experts)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts.float())
        gates = top.flatten()[order].unsqueeze(-1)
        routed = x[token]
        if self.score_before_experts:
            routed = (routed.float() * gates).to(x.dtype)
        y = self.experts(routed, counts)
        if not self.score_before_experts:
            y = (y.float() * gates).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


def main() -> None:
    import fp8flow_compile as ff

    torch.manual_seed(0)
    dim, hidden, experts, k, tokens = 256, 128, 8, 2, 96
    block = MoE(dim, hidden, experts, k).bfloat16()
    with torch.no_grad():  # as if balancing had already pushed the load toward experts 0-3
        block.expert_bias.copy_(torch.linspace(0.02, -0.02, experts))
    cblock = torch.compile(block, backend=ff.fp8flow, options={"inner": "eager"})
    x = torch.randn(2, tokens // 2, dim, dtype=torch.bfloat16, requires_grad=True)
    y = cblock(x)
    y.float().square().mean().backward()
    print(ff.last_report())
    print(ff.last_report().summary())
    print("tokens per expert:", block.tokens_per_expert.tolist())


if __name__ == "__main__":
    main()
