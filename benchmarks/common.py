"""Timing and environment helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import platform

import torch


def env_line() -> str:
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (f"{datetime.date.today().isoformat()} | {dev} | torch {torch.__version__} | "
            f"triton {triton.__version__} | CUDA {torch.version.cuda}")


def bench_ms(fn, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median milliseconds of fn() measured with CUDA events (triton.testing.do_bench)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_graph_ms(fn, calls: int = 10) -> tuple[float, str]:
    """Milliseconds per fn() with `calls` calls replayed from one CUDA graph: the GPU time of
    short kernels without the host's dispatch time per call (a custom op's dispatch can take
    longer than a 0.07 ms kernel). Falls back to bench_ms where fn cannot be captured.
    Returns (ms, "graph" or "eager")."""
    try:
        fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return bench_ms(graph.replay) / calls, "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return bench_ms(fn), "eager"


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def idle_gaps(trace: dict, top: int = 10) -> tuple[float, list[tuple]]:
    """Where the GPU sat idle: the gaps between the merged kernel intervals (no kernel, memset
    or copy on any stream) of the trace, the sum of all of them, and the `top` largest as
    (us, kernel before, kernel after, innermost host ops running through the gap)."""
    ev = trace["traceEvents"]
    gpu = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") in
                  ("kernel", "gpu_memset", "gpu_memcpy")), key=lambda e: e["ts"])
    cpu = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    gaps = []
    last = None  # the event that ends last so far
    for e in gpu:
        if last is not None and e["ts"] > last["ts"] + last["dur"]:
            gaps.append((e["ts"] - last["ts"] - last["dur"], last, e))
        if last is None or e["ts"] + e["dur"] > last["ts"] + last["dur"]:
            last = e
    total = sum(g for g, _, _ in gaps)
    out = []
    for g, a, b in sorted(gaps, key=lambda x: -x[0])[:top]:
        t0, t1 = a["ts"] + a["dur"], b["ts"]
        host = sorted((e for e in cpu if e["ts"] <= t0 and e["ts"] + e["dur"] >= t1),
                      key=lambda e: e["dur"])[:2]
        out.append((g, a["name"], b["name"], [e["name"] for e in host]))
    return total, out
