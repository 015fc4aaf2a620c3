"""Train the example MoE layer a few steps in BF16 and compiled with backend="fp8flow".

Prints the losses side by side and the backend's report (GEMM decisions, casts before -> after,
saved activations). On CPU the FP8 ops run their torch references; on a GPU they run the Triton
kernels and the forward + backward of the layer is timed: BF16 eager, BF16 compiled, fp8flow
compiled, and the hand-wired FP8 flow (`fp8flow_compile.flow`), the target of the rewrite.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fp8flow_compile as ff  # noqa: E402
from examples.moe import MoE  # noqa: E402
from fp8flow_compile.flow import moe_experts_fp8_flow  # noqa: E402


class FlowMoE(MoE):
    """The same parameters; the routed experts run in the FP8 flow."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        topw, topi = self.route(x)
        return moe_experts_fp8_flow(x, topw.to(x.dtype), topi, self.w13, self.w2).reshape(shape)


def train(model, xs, targets, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(steps):
        loss = (model(xs[i]).float() - targets[i]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


CASTS = {"quantize_1x128": "activation/gradient (1x128 rows)",
         "quantize_1x128_col": "activation/gradient (1x128 columns)",
         "quantize_128x128": "weight (128x128 blocks)",
         "quantize_128x128_dual": "weight (128x128 blocks, both orientations)",
         "dequantize_1x128": "dequantize", "dequantize_128x128": "dequantize"}


def count_casts(model, x):
    """Count the precision-changing ops the dispatcher sees in one forward + backward."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fp8flow" and func._opname in CASTS:
                seen[CASTS[func._opname]] += 1
            return func(*args, **(kwargs or {}))

    x = x.detach().requires_grad_(True)
    with Count():
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return dict(seen)


def time_layer(model, x, dy):
    from benchmarks.common import bench_ms
    x = x.detach().requires_grad_(True)

    def step():
        model(x).backward(dy)
    return bench_ms(step)


def main():
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    # On a GPU a shape where FP8 pays for at least one weight (see the report); the default
    # fp8_min_intensity keeps smaller GEMMs in BF16 there. On CPU every eligible GEMM goes to FP8.
    H, I, E, K, T = (4096, 2048, 32, 8, 8192) if cuda else (256, 128, 8, 2, 256)
    steps = 8
    bf16 = MoE(H, I, E, K, device=dev)
    model = MoE(H, I, E, K, device=dev)
    model.load_state_dict(bf16.state_dict())
    # "fp8flow" is found through the package's entry point once it is pip-installed; from a
    # plain checkout (PYTHONPATH) pass the backend function itself.
    installed = "fp8flow" in torch._dynamo.list_backends(exclude_tags=())
    compiled = torch.compile(model, backend="fp8flow" if installed else ff.fp8flow)
    teacher = MoE(H, I, E, K, device=dev)
    xs = [torch.randn(T, H, device=dev, dtype=torch.bfloat16) for _ in range(steps)]
    with torch.no_grad():
        targets = [teacher(x).float() for x in xs]
    lb = train(bf16, xs, targets, steps)
    lf = train(compiled, xs, targets, steps)
    print(f"MoE layer T={T} H={H} I={I} experts={E} top-{K} on {dev}, AdamW, {steps} steps")
    print(f"{'step':>4} {'loss bf16':>12} {'loss fp8flow':>13} {'rel gap':>9}")
    for i, (a, b) in enumerate(zip(lb, lf)):
        print(f"{i:>4} {a:>12.6f} {b:>13.6f} {abs(b - a) / a:>9.2%}")
    print()
    print(ff.last_report())
    print(ff.last_report().summary())
    if cuda:
        dy = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        hand = FlowMoE(H, I, E, K, device=dev)
        hand.load_state_dict(bf16.state_dict())
        times = {"bf16 eager": time_layer(bf16, xs[0], dy),
                 "bf16 compiled": time_layer(torch.compile(bf16), xs[0], dy),
                 "fp8flow compiled": time_layer(compiled, xs[0], dy),
                 "fp8 flow hand-wired": time_layer(hand, xs[0], dy)}
        base = times["bf16 compiled"]
        print(f"fwd+bwd on {torch.cuda.get_device_name()}:")
        for name, ms in times.items():
            print(f"  {name:<22} {ms:8.3f} ms   {base / ms:5.2f}x vs bf16 compiled")


if __name__ == "__main__":
    main()
