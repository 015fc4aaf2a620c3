"""Optimizer steps with gradient accumulation: K micro-batches (forward + backward) of the
canonical MoE layer, then a fused AdamW step, timed per optimizer step.

What `cache_weights` buys in training. The layer benchmark (moe_layer.py) steps no optimizer, so
its `fp8flow, weights cached` row is a micro-batch after the first; here every optimizer step
empties the cache, so the first micro-batch of each step quantizes the weights again (in
`weight_cache_fill`, where the uncached graph quantizes them), and the others read the cache.
K = 1 shows what the option costs when every micro-batch is a step.

Variants (`moe_layer.VARIANTS` keys): bf16_compiled (the baseline), fp8flow, fp8flow_cached.
Each has its own copy of the weights, its own AdamW (fused, lr 1e-5) and is timed in sustained
blocks as moe_layer.py times steps (`moe_layer.sustained_ms`). Before timing, fp8flow and
fp8flow_cached run two optimizer steps from the same weights and their weights must move and
come out bit-identical (the cache changes where the weights are quantized, not the math), or
the run stops.

    PYTHONPATH=. python benchmarks/accumulate.py --shapes dsv3,mixtral --k 1,8
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/accumulate.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from benchmarks.moe_layer import (
    SHAPES,
    SMOKE_SHAPES,
    VARIANTS,
    Telemetry,
    Timed,
    env_info,
    gemm_flops,
    log,
    make_variant,
    setup_case,
    sustained_ms,
    sync,
)

KEYS = ("bf16_compiled", "fp8flow", "fp8flow_cached")
LR = 1e-5


class Trainer:
    """One variant's compiled layer, weights and optimizer."""

    def __init__(self, key, dims, w13, w2, topw, topi, loads, x, dy, args, dev):
        self.key = key
        self.fn, self.layer, _ = make_variant(key, dims, w13.clone(), w2.clone(), topw, topi,
                                              loads, args.align, args.smoke, reset=False)
        self.params = [self.layer.w13, self.layer.w2]
        self.opt = torch.optim.AdamW(self.params, lr=LR, fused=True)
        self.x = x.detach().requires_grad_(True)
        self.dy = dy

    def step(self, k: int) -> None:
        for _ in range(k):
            self.x.grad = None
            self.fn(self.x).backward(self.dy)
        self.opt.step()

    def clear(self) -> None:
        self.opt.zero_grad()


def check_same(a: Trainer, b: Trainer, k: int) -> bool:
    """Two optimizer steps of k micro-batches from the same weights: bit-identical weights.
    The steps use lr 1e-3, so that every step moves the BF16 weights (the timing's 1e-5 is
    below half a BF16 step of most of them), and the weights must have moved."""
    with torch.no_grad():
        for p, q in zip(a.params, b.params):
            q.copy_(p)
    before = [p.clone() for p in a.params]
    for t in (a, b):
        for g in t.opt.param_groups:
            g["lr"] = 1e-3
    for _ in range(2):
        for t in (a, b):
            t.clear()
            t.step(k)
    for t in (a, b):
        for g in t.opt.param_groups:
            g["lr"] = LR
    moved = all(not torch.equal(p, q) for p, q in zip(a.params, before))
    return moved and all(torch.equal(p, q) for p, q in zip(a.params, b.params))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="dsv3,mixtral")
    p.add_argument("--routing", default="balanced")
    p.add_argument("--k", default="1,8", help="micro-batches per optimizer step, comma-separated")
    p.add_argument("--block-s", type=float, default=None)
    p.add_argument("--settle-s", type=float, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--align", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default="bench-logs")
    args = p.parse_args(argv)
    args.block_s = args.block_s if args.block_s is not None else (0.0 if args.smoke else 6.0)
    args.settle_s = args.settle_s if args.settle_s is not None else (0.0 if args.smoke else 1.0)
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    table = SMOKE_SHAPES if args.smoke else SHAPES
    ks = [int(v) for v in args.k.split(",")]
    env = env_info(dev)
    log(json.dumps(env))
    os.makedirs(args.out, exist_ok=True)
    rows = []
    telemetry = Telemetry() if dev.type == "cuda" else None
    try:
        for shape in args.shapes.split(","):
            dims = table[shape]
            topw, topi, loads, w13, w2, x, dy = setup_case(shape, dims, args.routing, args, dev,
                                                           args.seed)
            torch._dynamo.reset()
            trainers = {key: Trainer(key, dims, w13, w2, topw, topi, loads, x, dy, args, dev)
                        for key in KEYS}
            for t in trainers.values():  # compile and warm up
                t.clear()
                t.step(1)
            same = check_same(trainers["fp8flow"], trainers["fp8flow_cached"], 2)
            log(f"{shape}: fp8flow and fp8flow_cached weights bit-identical after two "
                f"optimizer steps of 2 micro-batches (and moved by them): {same}")
            if not same:
                log("ERROR: the cached variant diverged from the uncached one")
                return 1
            sync(dev)
            for k in ks:
                timed = [Timed(key, (lambda t=t: t.step(k)), t.clear)
                         for key, t in trainers.items()]
                ms, _blocks = sustained_ms(timed, dev, args.block_s, args.settle_s, args.rounds,
                                           telemetry=telemetry)
                base = ms.get("bf16_compiled")
                base_ms = statistics.median(base) if isinstance(base, list) else None
                for key in KEYS:
                    r = {"shape": shape, "routing": args.routing, "dims": dims, "k": k,
                         "variant": key, "name": VARIANTS[key]}
                    v = ms.get(key)
                    if isinstance(v, list):
                        r["ms_step"] = statistics.median(v)
                        r["ms_micro"] = r["ms_step"] / k
                        r["speedup"] = base_ms / r["ms_step"] if base_ms else None
                        r["tflops"] = gemm_flops(dims) * k / (r["ms_step"] * 1e-3) / 1e12
                    else:
                        r["error"] = v
                    rows.append(r)
            del trainers
            torch._dynamo.reset()
    finally:
        if telemetry is not None:
            telemetry.stop()
    path = os.path.join(args.out, "accumulate.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"kind": "env", **env}) + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    log(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
        f"routing {args.routing}; fused AdamW; sustained blocks of {args.block_s} s")
    log(f"{'shape':<8} {'K':>3} {'variant':<26} {'ms/step':>9} {'ms/micro':>9} {'speedup':>8}")
    for r in rows:
        if "error" in r:
            log(f"{r['shape']:<8} {r['k']:>3} {r['name']:<26} ERROR {str(r['error'])[:80]}")
            continue
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        log(f"{r['shape']:<8} {r['k']:>3} {r['name']:<26} {r['ms_step']:9.3f} "
            f"{r['ms_micro']:9.3f} {sp:>8}")
    log(f"rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
