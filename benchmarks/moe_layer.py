"""Side-by-side benchmark of the canonical MoE layer (`examples.moe.MoE`), forward + backward.

Variants (keys for `--variants`):

- ``bf16_eager``     "bf16 eager": the module as written.
- ``bf16_compiled``  "bf16 compiled": `torch.compile` with the default Inductor backend; the
  baseline of the speedup column.
- ``fp8_naive``      "fp8 naive": `backend=fp8flow, options={"flow": False}`, every GEMM operand
  quantized from its high-precision value (the Q/DQ graph before the flow rewrites).
- ``fp8flow``        "fp8flow": `backend=fp8flow` with its default options.
- ``fp8flow_all``    "fp8flow, all GEMMs FP8": the same with `fp8_min_intensity=0`, so weights
  the default leaves in BF16 as too small for FP8 to pay (the OLMoE-like shape) go to FP8 anyway.
- ``fp8flow_bf16h``  "fp8flow, h kept BF16": the same with `fp8_swiglu_input=False`, the backward
  keeping the FC1 output in BF16 instead of its FP8 copy (the memory / accuracy trade).
- ``fp8flow_cached`` "fp8flow, weights cached": the same with `cache_weights=True`. The
  benchmark steps no optimizer, so after the first call every step reads the FP8 weights from
  the cache: what a gradient-accumulation micro-batch after the first pays, not a step with an
  optimizer update (that one pays the quantization, as "fp8flow" does every step). The row's
  `weight_cache_bytes` is the memory the cache holds between steps, outside the peak column.
- ``fp8flow_rowscales`` "fp8flow, per-row wgrad": the same with `block_scales=False`:
  the wgrad GEMMs read the transposes' scales per row (1x128 x 1x128 in cuBLAS) rather than as
  the 128x128 blocks they are (1x128 x 128x128), the default before that pass.
- ``fp8flow_apart`` "fp8flow, gate/up apart": with `--experts separate` only, the same with
  `merge_gate_up=False`: the FC1 GEMMs over w1 and w3 run as two GEMMs each (forward and dgrad)
  instead of one over both.
- ``fp8flow_triton`` "fp8flow triton GEMMs": the same with every FP8 GEMM forced onto the Triton
  kernels (`set_gemm_backend("triton")`), where the default picks cuBLAS per group at large
  groups (see fp8flow_compile/kernels/cublas.py).
- ``fp8flow_cublas`` "fp8flow, cuBLAS loop": the same with DeepGEMM off
  (`kernels.deepgemm.set_enabled(False)`, and `align_groups=0`, which "auto" then is anyway):
  where DeepGEMM is installed, the default lays the expert rows out with every group on a
  multiple of 128 rows (passes/align_groups.py) and runs the grouped fprop and dgrad through
  it; this variant runs them through the cuBLAS loop on the rows as routed.
- ``fp8flow_unaligned`` "fp8flow, groups as routed": the default with `align_groups=0`:
  DeepGEMM runs only where the router's own loads put every group on the 128 grid (balanced
  loads here, `--align 128` for skewed ones), the cuBLAS loop elsewhere.
- ``fp8_hand``       "fp8 hand-wired": the routed experts through
  `fp8flow_compile.flow.moe_experts_fp8_flow`, the target of the rewrite, run eagerly.
- ``torchao_fp8``    "torchao fp8 rowwise": torchao's MoE training prototype (its tensor subclass
  sends `torch._grouped_mm` to a dynamically quantized FP8 rowwise grouped GEMM), compiled with
  Inductor as torchao recommends; only when `import torchao` works.
- ``torchao_fp8_eager`` "torchao fp8 rowwise eager": the same without torch.compile (its
  quantization kernels are Triton either way), in case the subclass and the layer's graph break
  at `bincount` do not compile together.

Routing is fixed by the benchmark, not learned: `route()` returns buffers built here, so every
variant sees the same expert loads. ``balanced`` gives every expert T*k/E tokens; ``skewed``
gives Zipf-like loads (s = 1.2) over 7/8 of the experts and none to the rest, each load capped at
T (a token picks an expert at most once). By default every load is a multiple of 16
(`--align`): torchao's FP8 grouped GEMM needs token groups in multiples of 16, and real
training stacks pad groups that way. The routing weights are the softmax of fixed random logits,
detached: no gradient flows to them, so the router GEMM and its backward are not part of the
measured step (the layer's router parameter is unused).

Per row (JSON keys in brackets):

- [ms] median of the timed forward + backward steps (CUDA events), after the first call (the
  compile); gradients are set to None before each step, untimed. [timing] says how
  (`--timing`):
  - "sustained" (the default): every variant of a shape and routing runs in blocks of
    `--block-s` seconds of back-to-back steps, the first `--settle-s` seconds of each block
    not counted, `--rounds` blocks per variant with the order rotated each round
    (`sustained_ms`). Each variant is timed in its own steady state, as a training run that
    uses only it would be. Why: under sustained load the H100 sits at its power limit and its
    SM clock settles at a level set by the work itself (BF16 compiled at the Mixtral shape:
    about 1400 MHz; fp8flow: 1520; naive FP8, with more memory-bound time: 1650), so a step
    timed right after another variant's step runs at a clock that neither would run at alone.
  - "interleaved": rounds of one step of every variant, the order rotated each round, after
    `--warmup` rounds (`interleaved_ms`); `--reps` rounds. Every variant meets the same power
    states, but the clock a step meets is set by the mix: the variant that draws the most power
    (BF16 compiled) runs faster than it would alone and the one that draws the least slower.
    The method of round m in docs/benchmarks.md.
  - "sequential" (`--sequential`): each variant alone, `--warmup` then `--reps` steps, after the
    previous one (the method before round m).
  [ms_all] every timed step, in order. [blocks] (sustained) per block: its median ms, steps
  counted, and the medians of the SM clock and board power while they ran (and their sample
  count).
- [sm_mhz, power_w] (GPU, when NVML is importable as `pynvml`) medians of the SM clock and
  board power sampled every 20 ms while the row's steps were timed (interleaved: over the whole
  interleaved timing, which all variants of the case share).
- [tflops] the six expert GEMMs only: 3 x 2*P*H*2I (FC1) + 3 x 2*P*I*H (FC2), P = T*k.
- [peak_bytes] `max_memory_allocated` during one forward + backward (peak stats reset first)
  minus `memory_allocated` before it: beyond the weights and inputs, so the gradients of x,
  w13 and w2 are in it.
- [saved_bytes_hooks] what the forward saves for backward: the distinct storages handed to
  `torch.autograd.graph.saved_tensors_hooks` during one forward, parameters and the input
  left out. A compiled graph saves through its autograd function, so this is what the
  partitioner kept. FP8 variants count their quantized weight copies here (the BF16 ones
  save the parameters themselves, which are left out).
- [saved_weight_bytes, saved_act_bytes] that count split: the storages of saved tensors that
  are 3-D with the expert count first (the per-expert weight copies and their block scales;
  this layer's activations are at most 2-D), and the rest, the activations. The tables print
  the second ("acts") and its ratio to bf16 compiled's ("acts x").
- [forward_live_bytes] (GPU only) `memory_allocated` after one forward minus before, minus the
  output: everything the forward leaves alive, as the allocator sees it. It differs from the
  hooks count where a saved view keeps a larger buffer alive or a graph keeps extra state.
- [err_out, err_dx, err_dw13, err_dw2] ||a - b|| / ||b|| against the same layer in float32
  eager on the same (upcast) weights, inputs and output gradient, computed once per shape and
  routing (if this torch's grouped GEMM takes no float32, the reference runs a per-expert loop
  of matmuls instead; [ref] says which).
- [first_call_s] wall time of the first forward + backward: the compile for compiled variants.
  Unless TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR is set, both caches point at a fresh
  folder and the FX graph cache is off, so compiles are cold (Triton binaries built earlier
  in the same run are reused).
- [speedup] ms of "bf16 compiled" at the same shape and routing / ms.

Results go to stdout (a table per shape at the end), to `<out>/moe_layer_<stamp>.jsonl` (one
JSON object per row, written and flushed when its shape and routing are done; a failing variant
records its error and the run goes on) and to a PNG bar chart of the speedups.
`--smoke` runs tiny shapes on the CPU with one timed step: every code path except the CUDA
timing and memory counters. `--profile VARIANT` prints the top-25 kernels of 3 steps instead.

    PYTHONPATH=. python benchmarks/moe_layer.py                       # everything, on a GPU
    PYTHONPATH=. python benchmarks/moe_layer.py --shapes dsv3 --variants bf16_compiled,fp8flow
    PYTHONPATH=. python benchmarks/moe_layer.py --profile fp8flow --shapes dsv3 --routings balanced
    PYTHONPATH=. python benchmarks/moe_layer.py --report bench-out/moe_layer_*.jsonl
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/moe_layer.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager

# Compile times are only comparable when nothing was cached by an earlier run: unless the caller
# chose cache folders, use fresh ones (set before torch and triton read them).
_FRESH_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ and "TRITON_CACHE_DIR" not in os.environ
if _FRESH_CACHE:
    _cache = tempfile.mkdtemp(prefix="moe-layer-bench-cache-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_cache, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_cache, "triton")

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fp8flow_compile as ff  # noqa: E402
from benchmarks.common import idle_gaps  # noqa: E402
from examples.moe import MoE  # noqa: E402
from examples.quickstart import FlowMoE  # noqa: E402
from fp8flow_compile.kernels import deepgemm  # noqa: E402
from fp8flow_compile.kernels.cublas import gemm_backend, set_gemm_backend  # noqa: E402

# name: (T, H, I, E, top_k)
SHAPES = {
    "dsv3": (8192, 7168, 2048, 32, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (8192, 2048, 1024, 64, 8),
}
# Sizes the CPU runs in seconds (the FP8 torch references loop over experts, so at most 16
# experts); H and I stay multiples of 128 because the FP8 recipe tiles them in 128-wide blocks.
SMOKE_SHAPES = {
    "dsv3": (64, 256, 128, 16, 4),
    "mixtral": (64, 128, 256, 8, 2),
    "olmoe": (64, 128, 128, 16, 4),
}
ROUTINGS = ("balanced", "skewed")
VARIANTS = {
    "bf16_eager": "bf16 eager",
    "bf16_compiled": "bf16 compiled",
    "fp8_naive": "fp8 naive",
    "fp8flow": "fp8flow",
    "fp8flow_all": "fp8flow, all GEMMs FP8",
    "fp8flow_bf16h": "fp8flow, h kept BF16",
    "fp8flow_cached": "fp8flow, weights cached",
    "fp8flow_rowscales": "fp8flow, per-row wgrad",
    "fp8flow_apart": "fp8flow, gate/up apart",
    "fp8flow_triton": "fp8flow triton GEMMs",
    "fp8flow_cublas": "fp8flow, cuBLAS loop",
    "fp8flow_unaligned": "fp8flow, groups as routed",
    "fp8_hand": "fp8 hand-wired",
    "torchao_fp8": "torchao fp8 rowwise",
    "torchao_fp8_eager": "torchao fp8 rowwise eager",
}
BASELINE = "bf16_compiled"
TIMINGS = ("sustained", "interleaved", "sequential")
FP8FLOW_KEYS = ("fp8_naive", "fp8flow", "fp8flow_all", "fp8flow_bf16h", "fp8flow_cached",
                "fp8flow_rowscales", "fp8flow_apart", "fp8flow_triton", "fp8flow_cublas",
                "fp8flow_unaligned")
ZIPF_S = 1.2
MIB = 1 << 20


def log(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------- routing


class FixedRoute:
    """Mixin: `route()` returns routing tensors set by the benchmark instead of the router's."""

    def set_routing(self, topw: torch.Tensor, topi: torch.Tensor) -> None:
        self.register_buffer("fixed_topw", topw, persistent=False)
        self.register_buffer("fixed_topi", topi, persistent=False)

    def route(self, x):
        return self.fixed_topw, self.fixed_topi


class RoutedMoE(FixedRoute, MoE):
    """The canonical layer with fixed routing."""


class RoutedFlowMoE(FixedRoute, FlowMoE):
    """The hand-wired FP8 flow layer with fixed routing."""


class RoutedSplitMoE(RoutedMoE):
    """The canonical layer with gate and up as weights of their own, w1 and w3 [E, I, H]
    (torchtitan's layout, `--experts separate`): FC1 is two grouped GEMMs. The same values as
    the stacked layer's w13 = cat([w1, w3], 1)."""

    def gate_up(self, xr: torch.Tensor, offs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch._grouped_mm(xr, self.w1.transpose(-2, -1), offs=offs),
                torch._grouped_mm(xr, self.w3.transpose(-2, -1), offs=offs))


EXPERT_LAYOUTS = ("stacked", "separate")


def expert_params(layer: nn.Module) -> list[nn.Parameter]:
    """The layer's expert weights: [w13, w2], or [w1, w3, w2] in the separate layout."""
    if hasattr(layer, "w1"):
        return [layer.w1, layer.w3, layer.w2]
    return [layer.w13, layer.w2]


def grad_w13(layer: nn.Module) -> torch.Tensor | None:
    """The gradient of w13, put together from w1's and w3's in the separate layout."""
    if not hasattr(layer, "w1"):
        return layer.w13.grad
    if layer.w1.grad is None or layer.w3.grad is None:
        return None
    return torch.cat([layer.w1.grad, layer.w3.grad], 1)


def zipf_loads(total: int, n: int, cap: int, s: float) -> list[int]:
    """Integer loads over n experts summing to `total`, proportional to rank**-s, each <= cap.

    Experts whose share would pass the cap get the cap and the rest is shared again among the
    others, so the head of the distribution is flat at `cap` when the Zipf head is too heavy.
    """
    assert total <= n * cap, (total, n, cap)
    w = [r ** -s for r in range(1, n + 1)]
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = total - sum(fixed.values())
        wsum = sum(w[i] for i in free)
        share = {i: left * w[i] / wsum for i in free}
        over = [i for i in free if share[i] > cap]
        if not over:
            break
        for i in over:
            fixed[i] = cap
    exact = {**fixed, **share}
    loads = [min(cap, math.floor(exact[i])) for i in range(n)]
    # Hand out the rounding remainder by largest fractional part, never past the cap.
    order = sorted(range(n), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    rest = total - sum(loads)
    while rest > 0:
        for i in order:
            if rest and loads[i] < cap:
                loads[i] += 1
                rest -= 1
    return loads


def make_routing(kind: str, T: int, E: int, k: int, align: int, seed: int,
                 device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Fixed (topw [T, k] fp32, topi [T, k] int64, loads [E]) for a routing kind.

    Loads are chosen first (in units of `align` tokens), then the slots are filled expert by
    expert down the columns of the [T, k] slot table, slot s going to token s % T: a run of at
    most T consecutive slots never visits a token twice, so each token gets k distinct experts.
    Token order and expert ids are then shuffled so heavy experts and neighbouring tokens are
    not correlated with the id order.
    """
    if T % align or (T * k) % align:
        raise ValueError(f"T={T} and T*k={T * k} must be multiples of align={align}")
    units, cap = T * k // align, T // align
    if kind == "balanced":
        if units % E:
            raise ValueError(f"balanced routing needs T*k/align={units} divisible by E={E}")
        loads = [units // E * align] * E
    elif kind == "skewed":
        empty = max(1, E // 8)
        loads = [u * align for u in zipf_loads(units, E - empty, cap, ZIPF_S)] + [0] * empty
    else:
        raise ValueError(f"unknown routing {kind!r}")
    g = torch.Generator().manual_seed(seed)
    experts = torch.randperm(E, generator=g)  # which expert id gets the i-th load
    loads_by_id = [0] * E
    for i, n in enumerate(loads):
        loads_by_id[int(experts[i])] = n
    flat = torch.repeat_interleave(experts, torch.tensor(loads))  # [T*k], expert per slot
    topi = flat.reshape(k, T).t()  # slot s -> (token s % T, column s // T)
    topi = topi[torch.randperm(T, generator=g)].contiguous()
    assert (topi.sort(dim=1).values.diff(dim=1) > 0).all(), "a token got an expert twice"
    logits = torch.randn(T, k, generator=g)
    topw = torch.softmax(logits, dim=-1)
    return topw.to(device), topi.to(device), loads_by_id


# ------------------------------------------------------------------------------ model building


def build(cls, dims, w13: torch.Tensor, w2: torch.Tensor, topw, topi, dtype,
          layout: str = "stacked") -> nn.Module:
    """A layer of class `cls` whose expert weights are `w13`, `w2` (cast to `dtype`; shared
    storage when already of that dtype) and whose routing is fixed to (topw, topi). The
    separate layout builds a RoutedSplitMoE (for cls RoutedMoE) with w1, w3 the two halves of
    w13, copied."""
    T, H, I, E, k = dims
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {layout!r}; known: {EXPERT_LAYOUTS}")
    if layout == "separate":
        if cls is not RoutedMoE:
            raise ValueError(f"{cls.__name__} has no separate expert layout")
        cls = RoutedSplitMoE
    m = cls(H, I, E, k, dtype=dtype, device="meta")
    dev = w13.device
    # The router is never called with fixed routing; give it a real, frozen tensor all the same.
    m.router.weight = nn.Parameter(torch.zeros(E, H, dtype=dtype, device=dev), requires_grad=False)
    if layout == "separate":
        del m.w13
        m.w1 = nn.Parameter(w13[:, :I].to(dtype).contiguous())
        m.w3 = nn.Parameter(w13[:, I:].to(dtype).contiguous())
    else:
        m.w13 = nn.Parameter(w13.to(dtype))
    m.w2 = nn.Parameter(w2.to(dtype))
    m.set_routing(topw, topi)
    return m


def torchao_convert(model: nn.Module) -> str:
    """Swap the layer's parameters for torchao's FP8 rowwise training tensor subclass.

    torchao >= 0.17 names it `Float8TrainingOpConfig`; older releases `MoETrainingConfig`
    (with a scaling-type argument in some of them). Returns the API that was used."""
    from torchao.quantization import quantize_

    is_moe = lambda mod, fqn: isinstance(mod, MoE)
    try:
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig
        quantize_(model, Float8TrainingOpConfig(), filter_fn=is_moe)
        return "Float8TrainingOpConfig"
    except ImportError:
        pass
    from torchao.prototype.moe_training.conversion_utils import MoETrainingConfig
    try:
        from torchao.prototype.moe_training.conversion_utils import MoEScalingType
        config = MoETrainingConfig(scaling_type=MoEScalingType.FP8_ROWWISE)
    except (ImportError, AttributeError, TypeError):
        config = MoETrainingConfig()
    quantize_(model, config, filter_fn=is_moe)
    return "MoETrainingConfig"


def torchao_status() -> tuple[bool, str]:
    try:
        import torchao
    except Exception as e:  # any import failure means the variant cannot run
        return False, f"import torchao failed: {type(e).__name__}: {e}"
    return True, f"torchao {getattr(torchao, '__version__', '?')}"


def make_variant(key: str, dims, w13, w2, topw, topi, loads, align: int, smoke: bool,
                 reset: bool = True, layout: str = "stacked"):
    """(callable, layer module, info dict) for one variant. The callable is what is timed.
    reset=False keeps Dynamo's caches, so variants compiled earlier stay compiled (sustained and
    interleaved timing keep them all). layout: the experts' weights, "stacked" (w13) or
    "separate" (w1, w3)."""
    info: dict = {}
    fp8_opts = {"inner": "eager"} if smoke else {}  # Inductor on CPU compiles slowly
    if key == "fp8_hand":
        if layout != "stacked":
            raise Skip("the hand-wired layer reads one stacked w13")
        m = build(RoutedFlowMoE, dims, w13, w2, topw, topi, torch.bfloat16)
        return m, m, info
    if key == "fp8flow_apart" and layout != "separate":
        raise Skip("gate and up are apart only with --experts separate")
    m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.bfloat16, layout)
    if key == "bf16_eager":
        return m, m, info
    if reset:
        torch._dynamo.reset()
    if key == "bf16_compiled":
        return torch.compile(m), m, info
    if key in FP8FLOW_KEYS:
        opts = {**fp8_opts, **{"fp8_naive": {"flow": False},
                               "fp8flow_all": {"fp8_min_intensity": 0},
                               "fp8flow_bf16h": {"fp8_swiglu_input": False},
                               "fp8flow_cached": {"cache_weights": True},
                               "fp8flow_rowscales": {"block_scales": False},
                               "fp8flow_apart": {"merge_gate_up": False},
                               "fp8flow_cublas": {"align_groups": 0},
                               "fp8flow_unaligned": {"align_groups": 0}}.get(key, {})}
        info["options"] = opts
        ff.last_report().records.clear()
        return torch.compile(m, backend=ff.fp8flow, options=opts), m, info
    if key in ("torchao_fp8", "torchao_fp8_eager"):
        ok, why = torchao_status()
        if not ok:
            raise Skip(why)
        info["torchao"] = why
        if any(n % 16 for n in loads):
            raise RuntimeError("torchao fp8 rowwise needs every expert's token count to be a "
                               "multiple of 16 (run with --align 16)")
        info["torchao_api"] = torchao_convert(m)
        return (torch.compile(m) if key == "torchao_fp8" else m), m, info
    raise ValueError(f"unknown variant {key!r}")


class Skip(Exception):
    """A variant that cannot run here (recorded as skipped, not as an error)."""


# ------------------------------------------------------------------------------- measurements


def plain(t):
    """The plain tensor inside a wrapper subclass (torchao keeps it in `_data`)."""
    while t is not None and type(t) is not torch.Tensor and hasattr(t, "_data"):
        t = t._data
    return t


def rel_err(a, b) -> float | None:
    """||a - b|| / ||b|| in float64 accumulation, chunked so no full-size float64 copy of a
    weight gradient is made."""
    a, b = plain(a), plain(b)
    if a is None or b is None:
        return None
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    num = torch.zeros((), dtype=torch.float64, device=b.device)
    den = torch.zeros((), dtype=torch.float64, device=b.device)
    step = 1 << 26
    for i in range(0, b.numel(), step):
        bb = b[i:i + step].float()
        num += (a[i:i + step].float() - bb).square().sum(dtype=torch.float64)
        den += bb.square().sum(dtype=torch.float64)
    return float(num.sqrt() / den.sqrt().clamp_min(1e-300))


def _storages(t, out: dict) -> None:
    """Collect (storage pointer -> bytes) of t, looking inside traceable wrapper subclasses."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for n in names:
            _storages(getattr(t, n), out)
        return
    try:
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    except Exception:  # a tensor without storage (e.g. a subclass we cannot open) counts 0
        pass


def saved_bytes_hooks(fn, exclude: list[torch.Tensor], experts: int | None = None
                      ) -> tuple[int, int]:
    """Bytes of the distinct storages the forward saves for backward, through
    `torch.autograd.graph.saved_tensors_hooks`, leaving out the storages of `exclude` (the
    parameters and the input, which exist anyway). A compiled graph saves through its autograd
    function, so the hook sees what the partitioner chose to keep.

    Returns (all, weight copies): the second counts the storages of saved tensors that are
    3-D with `experts` as their first dim, the per-expert weight copies (FP8 data and block
    scales) an FP8 variant keeps for its dgrad; this layer's activations are at most 2-D."""
    skip: dict = {}
    for t in exclude:
        _storages(t, skip)
    seen: dict = {}
    weights: dict = {}

    def pack(t):
        _storages(t, seen)
        if experts is not None and t.dim() == 3 and t.shape[0] == experts:
            _storages(t, weights)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return (sum(n for p, n in seen.items() if p not in skip),
            sum(n for p, n in weights.items() if p not in skip))


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(step, clear, dev, warmup: int, reps: int) -> list[float]:
    """Per-repetition milliseconds of step(): CUDA events on a GPU, wall clock on the CPU.
    Gradients are set to None before each repetition, outside the timed region."""
    for _ in range(warmup):
        clear()
        step()
    sync(dev)
    if dev.type != "cuda":
        times = []
        for _ in range(reps):
            clear()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = []
    for _ in range(reps):
        clear()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def gemm_flops(dims) -> float:
    T, H, I, E, k = dims
    P = T * k
    return 3 * 2 * P * H * 2 * I + 3 * 2 * P * I * H


@contextmanager
def loop_grouped_mm():
    """Replace `torch._grouped_mm` by a loop of per-expert matmuls (same math) for the float32
    reference, where a torch build's grouped GEMM takes no float32 inputs."""
    orig = torch._grouped_mm

    def grouped(a, b, offs=None, **kw):
        outs, start = [], 0
        for e, end in enumerate(offs.tolist()):
            outs.append(a[start:end] @ b[e])
            start = end
        return torch.cat(outs)

    torch._grouped_mm = grouped
    try:
        yield
    finally:
        torch._grouped_mm = orig


def fp32_reference(dims, w13, w2, topw, topi, x, dy) -> dict:
    """Output and gradients of the float32 eager layer on the bf16 inputs upcast."""
    ref = {}
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the reference
    try:
        for how in ("module", "loop"):
            m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.float32)
            xr = x.detach().float().requires_grad_(True)
            try:
                if how == "module":
                    out = m(xr)
                    out.backward(dy.float())
                else:
                    with loop_grouped_mm():
                        out = m(xr)
                        out.backward(dy.float())
                ref = {"out": out.detach(), "x": xr.grad, "w13": m.w13.grad, "w2": m.w2.grad,
                       "how": how}
                break
            except Exception as e:
                ref = {"error": f"{type(e).__name__}: {e}"}
                log(f"  fp32 reference ({how}) failed: {ref['error'][:200]}")
            finally:
                del m, xr
    finally:
        torch.set_float32_matmul_precision(prec)
    return ref


def free(dev, reset: bool = True) -> None:
    if reset:
        torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Timed:
    """A measured variant kept alive for the sustained or interleaved timing: one step, and
    what to clear (the gradients) before it, untimed."""
    key: str
    step: Callable[[], None]
    clear: Callable[[], None]


def run_variant(key, dims, w13, w2, topw, topi, loads, x, dy, ref, args, dev
                ) -> tuple[dict, Timed | None]:
    """Measure one variant; every failure becomes the row's `error`. Unless `args.timing` is
    "sequential" the row gets no timing yet: the variant is returned as a `Timed` for
    `sustained_ms` or `interleaved_ms`, its compiled code kept. Otherwise it is timed here,
    alone, and its model, compiled code and gradients are freed before this returns."""
    row: dict = {"variant": key, "name": VARIANTS[key]}
    before = _kernel_settings()
    if key == "fp8flow_triton":
        set_gemm_backend("triton")
    if key == "fp8flow_cublas":
        deepgemm.set_enabled(False)
    row["gemm_backend"] = gemm_backend()
    row["deepgemm"] = deepgemm.enabled() and deepgemm.installed() is not None
    mine = _kernel_settings()
    timed = None
    try:
        timed = _measure(row, key, dims, w13, w2, topw, topi, loads, x, dy, ref, args, dev)
    except Skip as e:
        row["skipped"] = str(e)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=-6)
    finally:
        _set_kernel_settings(before)
    free(dev, reset=args.timing == "sequential")
    if timed is not None and mine != before:
        timed.step = _on_settings(mine, timed.step)
    return row, timed


def _kernel_settings() -> tuple[str, bool]:
    """The run-time kernel choices a variant may change: the GEMM backend, DeepGEMM on/off."""
    return gemm_backend(), deepgemm.enabled()


def _set_kernel_settings(settings: tuple[str, bool]) -> None:
    set_gemm_backend(settings[0])
    deepgemm.set_enabled(settings[1])


def _on_settings(settings: tuple[str, bool], step: Callable[[], None]) -> Callable[[], None]:
    def run():
        before = _kernel_settings()
        _set_kernel_settings(settings)
        try:
            step()
        finally:
            _set_kernel_settings(before)
    return run


def shared_compile(case_rows: list[dict]) -> str | None:
    """The earlier variant of the case whose compiled graphs the last one reuses, if any.
    Without a Dynamo reset between variants (interleaved timing keeps them all compiled), a
    module compiled with the same backend and options as an earlier one of the same class gets
    that one's graphs: fp8flow_triton after fp8flow (its GEMM backend is switched at run time,
    so the graphs keep fp8flow's host copies of the group ends)."""
    last = case_rows[-1]
    if "options" not in last:
        return None
    for r in case_rows[:-1]:
        if r.get("options") == last["options"] and "error" not in r and "skipped" not in r:
            return r["variant"]
    return None


def round_orders(keys: list[str], rounds: int) -> list[list[str]]:
    """The variant order of each round of the interleaved timing: the list rotated by one more
    place each round, so over len(keys) rounds every variant runs once in every position."""
    n = len(keys)
    return [keys[r % n:] + keys[:r % n] for r in range(rounds)] if n else []


def interleaved_ms(timed: list[Timed], dev, warmup: int, reps: int
                   ) -> dict[str, list[float] | str]:
    """Per-variant milliseconds of `reps` steps, timed in rounds of one step of every variant
    (order from `round_orders`), after `warmup` such rounds untimed. CUDA events on a GPU,
    wall clock on the CPU; gradients cleared before each step, untimed.

    Why rounds: an H100 running these steps back to back reaches its power limit within about a
    second and lowers its clocks for a second or so (nvidia-smi samples in docs/benchmarks.md,
    round m); a variant timed alone, after another, meets that state at a point of its run set
    by what ran before it. In rounds every variant meets the same states in the same proportion,
    but each step runs at the clock the mix sets, not its own (round n: the variant drawing the
    most power gains, the one drawing the least loses; `sustained_ms` is the default for that).
    A variant whose step raises is dropped from later rounds; its entry is the error."""
    out: dict[str, list[float] | str] = {}
    pending: dict[str, list] = {t.key: [] for t in timed}
    by_key = {t.key: t for t in timed}
    cuda = dev.type == "cuda"
    for r, order in enumerate(round_orders([t.key for t in timed], warmup + reps)):
        for key in order:
            if key in out:
                continue
            t = by_key[key]
            try:
                t.clear()
                if r < warmup:
                    t.step()
                    continue
                if cuda:
                    s = torch.cuda.Event(enable_timing=True)
                    e = torch.cuda.Event(enable_timing=True)
                    s.record()
                    t.step()
                    e.record()
                    pending[key].append((s, e))
                else:
                    t0 = time.perf_counter()
                    t.step()
                    pending[key].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:
                out[key] = f"{type(e).__name__}: {e}"
    sync(dev)
    for key, got in pending.items():
        if key not in out:
            out[key] = [s.elapsed_time(e) for s, e in got] if cuda else got
    for t in timed:
        t.clear()
    return out


#: The GPU's clock and power sampler of the running benchmark (main), if any.
_telemetry: Telemetry | None = None


class Telemetry:
    """SM clock and board power sampled every `period` seconds on a background thread through
    NVML (the `pynvml` module of nvidia-ml-py), with `time.perf_counter` stamps; inactive (every
    window empty) where NVML is missing or fails."""

    def __init__(self, period: float = 0.02):
        self.samples: list[tuple[float, int, float]] = []
        self.period = period
        self.handle = None
        self.info: dict = {}
        self._stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.info = {
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1e3,
                "max_sm_mhz": pynvml.nvmlDeviceGetMaxClockInfo(self.handle, pynvml.NVML_CLOCK_SM),
            }
        except Exception as e:  # telemetry is informative only
            self.handle = None
            self.info = {"telemetry": f"unavailable: {type(e).__name__}: {e}"}
        self._thread = None
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        nv = self._nvml
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(),
                                     nv.nvmlDeviceGetClockInfo(self.handle, nv.NVML_CLOCK_SM),
                                     nv.nvmlDeviceGetPowerUsage(self.handle) / 1e3))
            except Exception:
                return
            self._stop.wait(self.period)

    def window(self, spans: list[tuple[float, float]]) -> dict:
        """Median SM clock (MHz) and power (W) of the samples inside any of `spans`."""
        got = [(c, p) for t, c, p in self.samples if any(a <= t <= b for a, b in spans)]
        if not got:
            return {}
        return {"sm_mhz": statistics.median(c for c, _ in got),
                "power_w": round(statistics.median(p for _, p in got), 1)}

    def count(self, spans: list[tuple[float, float]]) -> int:
        """How many samples fell inside any of `spans` (the medians of `window` are over them)."""
        return sum(any(a <= t <= b for a, b in spans) for t, _, _ in self.samples)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)


def sustained_ms(timed: list[Timed], dev, block_s: float, settle_s: float, rounds: int,
                 clock: Callable[[], float] = time.perf_counter,
                 telemetry: Telemetry | None = None
                 ) -> tuple[dict[str, list[float] | str], dict[str, list[dict]]]:
    """Per-variant milliseconds of steps run in sustained blocks: for each of `rounds` rounds,
    every variant in turn (order from `round_orders`) runs back-to-back steps for `block_s`
    seconds of `clock`; steps started in the first `settle_s` seconds of a block are not
    counted, and a block counts at least one step. Gradients cleared before each step, untimed.

    The host is kept at most two steps ahead of the GPU (it waits on the end event of the step
    before the previous one), so a block's wall time is GPU time even for a variant that never
    synchronises, and the GPU never waits on that check. Returns the step times, or the error
    of a variant whose step raised (dropped from later blocks), and per variant one dict per
    block: its median ms, counted steps and, with `telemetry`, the SM clock and power medians
    while they ran and how many samples those are."""
    out: dict[str, list[float] | str] = {}
    got: dict[str, list[float]] = {t.key: [] for t in timed}
    blocks: dict[str, list[dict]] = {t.key: [] for t in timed}
    by_key = {t.key: t for t in timed}
    cuda = dev.type == "cuda"
    for order in round_orders([t.key for t in timed], rounds):
        for key in order:
            if key in out:
                continue
            t = by_key[key]
            ends, counted, times = [], [], []
            t0 = clock()
            try:
                while True:
                    now = clock()
                    if now - t0 >= block_s and counted:
                        break
                    count = now - t0 >= settle_s
                    t.clear()
                    if cuda:
                        if len(ends) >= 2:
                            ends[-2].synchronize()
                        s = torch.cuda.Event(enable_timing=True)
                        e = torch.cuda.Event(enable_timing=True)
                        s.record()
                        t.step()
                        e.record()
                        ends.append(e)
                        if count:
                            counted.append((s, e))
                    else:
                        a = clock()
                        t.step()
                        b = clock()
                        if count:
                            counted.append(b - a)
                if cuda:
                    torch.cuda.synchronize()
                    times = [s.elapsed_time(e) for s, e in counted]
                else:
                    times = [v * 1e3 for v in counted]
            except Exception as e:
                out[key] = f"{type(e).__name__}: {e}"
                continue
            t1 = clock()
            got[key] += times
            info = {"ms": statistics.median(times), "steps": len(times)}
            if telemetry is not None:
                span = [(t0 + settle_s, t1)]
                info.update(telemetry.window(span), samples=telemetry.count(span))
            blocks[key].append(info)
    for key, v in got.items():
        if key not in out:
            out[key] = v
    for t in timed:
        t.clear()
    return out, blocks


def _measure(row, key, dims, w13, w2, topw, topi, loads, x, dy, ref, args, dev
             ) -> Timed | None:
    fn, layer, info = make_variant(key, dims, w13, w2, topw, topi, loads, args.align,
                                   args.smoke, reset=args.timing == "sequential",
                                   layout=args.experts)
    row.update(info)
    row["experts"] = args.experts
    xg = x.detach().requires_grad_(True)
    params = expert_params(layer)

    def clear():
        xg.grad = None
        for p in params:
            p.grad = None

    def step():
        fn(xg).backward(dy)

    # First call: the compile for compiled variants (forward and backward graphs).
    clear()
    sync(dev)
    t0 = time.perf_counter()
    step()
    sync(dev)
    row["first_call_s"] = time.perf_counter() - t0
    if key in FP8FLOW_KEYS:
        try:
            row["fp8flow_report"] = ff.last_report().summary()
        except Exception as e:  # the report is informative only
            row["fp8flow_report"] = f"unavailable: {type(e).__name__}: {e}"

    # Numerics: one fresh forward + backward against the float32 reference.
    clear()
    out = fn(xg)
    out.backward(dy)
    if "error" not in ref:
        row["err_out"] = rel_err(out, ref["out"])
        row["err_dx"] = rel_err(xg.grad, ref["x"])
        row["err_dw13"] = rel_err(grad_w13(layer), ref["w13"])
        row["err_dw2"] = rel_err(layer.w2.grad, ref["w2"])
    out_bytes = out.numel() * out.element_size()
    del out

    # Memory: peak of one step beyond what is allocated before it (grads included), and
    # what the forward leaves allocated (saved activations) besides its output.
    if key == "fp8flow_cached":
        row["weight_cache_bytes"] = ff.weight_cache_info()["bytes"]
    if dev.type == "cuda":
        clear()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        clear()
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        out = fn(xg)
        torch.cuda.synchronize()
        row["forward_live_bytes"] = torch.cuda.memory_allocated() - base - out_bytes
        out.backward(dy)
        del out
    clear()
    row["saved_bytes_hooks"], row["saved_weight_bytes"] = saved_bytes_hooks(
        lambda: fn(xg), [xg, *layer.parameters()], experts=dims[3])
    row["saved_act_bytes"] = row["saved_bytes_hooks"] - row["saved_weight_bytes"]

    clear()
    if args.timing != "sequential":
        return Timed(key, step, clear)
    t0 = time.perf_counter()
    set_times(row, time_ms(step, clear, dev, args.warmup, args.reps), dims)
    if _telemetry is not None:
        row.update(_telemetry.window([(t0, time.perf_counter())]))
    clear()
    return None


def set_times(row: dict, times: list[float], dims) -> None:
    row["ms_all"] = times
    row["ms"] = statistics.median(times)
    row["tflops"] = gemm_flops(dims) / (row["ms"] * 1e-3) / 1e12


# -------------------------------------------------------------------------------------- output


def env_info(dev) -> dict:
    import triton
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else
        f"CPU {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "fresh_compile_cache": _FRESH_CACHE,
    }
    ok, why = torchao_status()
    info["torchao"] = why if ok else None
    # the grouped fprop/dgrad go to DeepGEMM where it is installed and the groups start on
    # multiples of 128 rows (kernels/deepgemm.py); "fp8flow_cublas" keeps the cuBLAS loop
    info["deepgemm"] = deepgemm.installed()
    if dev.type == "cuda":
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def short(err: str, n: int = 110) -> str:
    """The exception type and its first non-empty message line (torch's often start blank)."""
    kind, _, msg = err.partition(": ")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    return f"{kind}: {first}"[:n]


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def mib(v) -> str:
    if v is None:
        return "-"
    v = v / MIB
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def act_ratio(r: dict, rrows: dict) -> str:
    """Activations kept for backward against the baseline's, as '0.26x' (or '-')."""
    base = rrows.get(BASELINE, {}).get("saved_act_bytes")
    own = r.get("saved_act_bytes")
    return f"{own / base:.2f}x" if base and own is not None else "-"


def print_tables(rows: list[dict], shapes: dict, order: list[str]) -> None:
    cols = (f"{'routing':<9} {'variant':<26} {'ms':>9} {'MHz/W':>8} {'TFLOP/s':>8} {'speedup':>7} "
            f"{'peak MiB':>9} {'saved MiB':>9} {'acts MiB':>9} {'acts x':>6} {'live MiB':>9} "
            f"{'1st call s':>10} "
            f"{'err out':>8} {'err dx':>8} {'err dw13':>8} {'err dw2':>8}")
    for shape, dims in shapes.items():
        srows = [r for r in rows if r["shape"] == shape]
        if not srows:
            continue
        T, H, I, E, k = dims
        layouts = sorted({r.get("experts", "stacked") for r in srows})
        log()
        log(f"== {shape}: T={T} H={H} I={I} E={E} top-{k}  P={T * k}  "
            f"{gemm_flops(dims) / 1e12:.3f} TFLOP of expert GEMMs per fwd+bwd, experts "
            f"{'/'.join(layouts)} ==")
        log(cols)
        for routing in ROUTINGS:
            rrows = {r["variant"]: r for r in srows if r["routing"] == routing}
            for key in order:
                r = rrows.get(key)
                if r is None:
                    continue
                head = f"{routing:<9} {r['name']:<26} "
                if "skipped" in r:
                    log(head + f"skipped: {r['skipped']}")
                    continue
                line = (head + f"{fmt(r.get('ms'), '9.3f'):>9} {clock_power(r) or '-':>8} "
                        f"{fmt(r.get('tflops'), '8.1f'):>8} "
                        f"{fmt(r.get('speedup'), '6.2f') + 'x' if r.get('speedup') else '-':>7} "
                        f"{mib(r.get('peak_bytes')):>9} {mib(r.get('saved_bytes_hooks')):>9} "
                        f"{mib(r.get('saved_act_bytes')):>9} {act_ratio(r, rrows):>6} "
                        f"{mib(r.get('forward_live_bytes')):>9} "
                        f"{fmt(r.get('first_call_s'), '10.1f'):>10} "
                        f"{fmt(r.get('err_out'), '8.1e'):>8} {fmt(r.get('err_dx'), '8.1e'):>8} "
                        f"{fmt(r.get('err_dw13'), '8.1e'):>8} {fmt(r.get('err_dw2'), '8.1e'):>8}")
                if "error" in r:
                    line = head + "ERROR " + short(r["error"])
                log(line)
    log()
    log("ms: median fwd+bwd (timing: " + ", ".join(sorted({r.get('timing', '?') for r in rows}))
        + "); MHz/W: median SM clock and board power while timed; TFLOP/s: the 6 expert "
        "GEMMs only; speedup: vs bf16 compiled; "
        "peak: max allocated during one fwd+bwd minus allocated before (weight/input grads "
        "included); saved: distinct storages packed for backward (saved_tensors_hooks), "
        "parameters and input excluded; acts: saved minus the per-expert weight copies (3-D, "
        "experts first), acts x: that against bf16 compiled's; live: allocated after forward "
        "minus before, minus the output (GPU only); 1st call: wall time of the first fwd+bwd "
        "(the compile); err: "
        "||a-b||/||b|| vs float32 eager.")


def plot(rows: list[dict], order: list[str], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"chart skipped: matplotlib not importable ({type(e).__name__}: {e})")
        return
    groups = []
    for r in rows:
        g = f"{r['shape']}\n{r['routing']}"
        if g not in groups:
            groups.append(g)
    keys = [k for k in order if any(r["variant"] == k and r.get("speedup") for r in rows)]
    if not groups or not keys:
        log("chart skipped: no speedups to draw")
        return
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups) + 4), 4.5))
    for j, key in enumerate(keys):
        xs, ys = [], []
        for i, g in enumerate(groups):
            r = next((r for r in rows if f"{r['shape']}\n{r['routing']}" == g
                      and r["variant"] == key), None)
            if r is not None and r.get("speedup"):
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                ys.append(r["speedup"])
        bars = ax.bar(xs, ys, width, label=VARIANTS[key])
        ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speedup vs bf16 compiled (fwd+bwd)")
    ax.set_title("MoE layer forward + backward")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    log(f"chart: {path}")


def to_json(row: dict) -> str:
    return json.dumps(row, default=str)


# -------------------------------------------------------------------------------------- driver


def setup_case(shape, dims, routing, args, dev, seed):
    T, H, I, E, k = dims
    topw, topi, loads = make_routing(routing, T, E, k, args.align, seed, dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=dev, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g, device=dev, dtype=torch.bfloat16) * I ** -0.5
    x = torch.randn(T, H, generator=g, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(T, H, generator=g, device=dev, dtype=torch.bfloat16)
    return topw, topi, loads, w13, w2, x, dy


def gpu_gaps(trace_path: str, top: int = 12) -> str:
    """Where the GPU sat idle in a profiler trace (`common.idle_gaps`): its busy time against
    the span, and the largest gaps with the innermost host ops that ran through each (what kept
    the host from launching the next kernel)."""
    with open(trace_path) as f:
        trace = json.load(f)
    gpu = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in
           ("kernel", "gpu_memset", "gpu_memcpy")]
    if not gpu:
        return "no GPU events in the trace"
    span = max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu)
    idle, gaps = idle_gaps(trace, top)
    lines = [f"GPU busy {(span - idle) / 1e3:.2f} ms of a {span / 1e3:.2f} ms span "
             f"(idle {idle / 1e3:.2f} ms); largest gaps, with the innermost host ops "
             f"running through each:"]
    for us, before, after, host in gaps:
        lines.append(f"  {us:7.0f} us: {before[:32]} -> {after[:32]} | host: "
                     + "; ".join(h[:40] for h in host))
    return "\n".join(lines)


def profile(args, shapes, dev) -> None:
    key = args.profile
    for shape, dims in shapes.items():
        for routing in args.routings:
            topw, topi, loads, w13, w2, x, dy = setup_case(shape, dims, routing, args, dev,
                                                           args.seed)
            log(f"\n== profile {VARIANTS[key]} {shape} {routing} ==")
            fn = layer = None
            try:
                fn, layer, _ = make_variant(key, dims, w13, w2, topw, topi, loads, args.align,
                                            args.smoke, layout=args.experts)
                xg = x.detach().requires_grad_(True)
                for _ in range(2):  # compile and warm up
                    fn(xg).backward(dy)
                sync(dev)
                acts = [torch.profiler.ProfilerActivity.CPU]
                if dev.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=acts) as prof:
                    for _ in range(3):
                        xg.grad = None
                        for p in expert_params(layer):
                            p.grad = None
                        fn(xg).backward(dy)
                    sync(dev)
                sort = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
                log(prof.key_averages().table(sort_by=sort, row_limit=25,
                                              max_name_column_width=70))
                trace = os.path.join(args.out, f"profile_{key}_{shape}_{routing}.json")
                prof.export_chrome_trace(trace)
                log(f"chrome trace: {trace}")
                if dev.type == "cuda":
                    log(gpu_gaps(trace))
            except Skip as e:
                log(f"skipped: {e}")
            except Exception as e:
                log(f"ERROR {type(e).__name__}: {e}")
                traceback.print_exc(limit=-6)
            finally:
                del fn, layer
                free(dev)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--routings", default=",".join(ROUTINGS), help="comma list: balanced, skewed")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--reps", type=int, default=None, help="interleaved and sequential: timed "
                   "repetitions (default 40; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="interleaved and sequential: untimed "
                   "repetitions after the first call (default 5; smoke 0)")
    p.add_argument("--timing", choices=TIMINGS, default="sustained",
                   help="how steps are timed (see [timing] above): sustained blocks per variant "
                   "(default), interleaved rounds of one step each, or sequential")
    p.add_argument("--sequential", dest="timing", action="store_const", const="sequential",
                   help="the same as --timing sequential")
    p.add_argument("--block-s", type=float, default=None, help="sustained: seconds per block "
                   "(default 6; smoke 0, one step)")
    p.add_argument("--settle-s", type=float, default=None, help="sustained: seconds at the "
                   "start of each block not counted (default 2; smoke 0)")
    p.add_argument("--rounds", type=int, default=2, help="sustained: blocks per variant")
    p.add_argument("--experts", choices=EXPERT_LAYOUTS, default="stacked",
                   help="the experts' gate and up weights: one stacked w13 [E, 2I, H] (HF, "
                        "Megatron) or separate w1, w3 [E, I, H] (torchtitan): two FC1 GEMMs")
    p.add_argument("--align", type=int, default=16, help="expert loads are multiples of this "
                   "(torchao's FP8 grouped GEMM needs 16; 1 for unaligned skewed loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out", help="folder for the JSON lines and the chart")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 1-2 repetitions")
    p.add_argument("--report", nargs="+", metavar="JSONL",
                   help="no benchmark: print the tables and draw one chart from the rows of "
                   "earlier runs (e.g. one run per shape)")
    p.add_argument("--profile", metavar="VARIANT", choices=list(VARIANTS),
                   help="profile 3 steps of one variant per shape/routing and print the top-25 "
                   "kernels instead of benchmarking")
    args = p.parse_args(argv)

    def split(s, known, what):
        items = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in items if v not in known]
        if bad:
            p.error(f"unknown {what} {bad}; known: {list(known)}")
        return items

    args.shapes = split(args.shapes, SHAPES, "shapes")
    args.routings = split(args.routings, ROUTINGS, "routings")
    args.variants = [v for v in VARIANTS if v in split(args.variants, VARIANTS, "variants")]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.block_s = args.block_s if args.block_s is not None else (0.0 if args.smoke else 6.0)
    args.settle_s = args.settle_s if args.settle_s is not None else (0.0 if args.smoke else 2.0)
    if args.settle_s > args.block_s:
        p.error("--settle-s must not exceed --block-s")
    args.reps = args.reps or (1 if args.smoke else 40)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 5)
    return args


def report(paths: list[str], out: str) -> None:
    """Tables and one chart from the JSON lines of earlier runs (later rows win)."""
    rows: dict = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "row" and r.get("variant") in VARIANTS:
                    rows[(r["shape"], tuple(r["dims"]), r["routing"], r["variant"])] = r
    # A shape name measured at different sizes (a smoke run beside a full one) stays apart.
    sizes: dict = {}
    for name, dims, _, _ in rows:
        sizes.setdefault(name, set()).add(dims)
    for (name, dims, routing, _), r in rows.items():
        r["shape"] = name if len(sizes[name]) == 1 else f"{name}{list(dims)}"
        base = rows.get((name, dims, routing, BASELINE), {}).get("ms")
        r["speedup"] = base / r["ms"] if base and r.get("ms") else None
    shapes = {r["shape"]: tuple(r["dims"]) for r in rows.values()}
    order = list(VARIANTS)
    print_tables(list(rows.values()), shapes, order)
    os.makedirs(out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    plot(list(rows.values()), order, os.path.join(out, f"moe_layer_report_{stamp}.png"))


def log_row(row: dict) -> None:
    if "error" in row:
        log(f"  {row['name']:<26} ERROR {short(row['error'], 300)}")
        if row.get("traceback"):
            log("    " + row["traceback"].strip()[-1500:].replace("\n", "\n    "))
    elif "skipped" in row:
        log(f"  {row['name']:<26} skipped: {row['skipped']}")
    else:
        log(f"  {row['name']:<26} {row['ms']:9.3f} ms "
            f"{row['tflops']:7.1f} TFLOP/s  first call {row['first_call_s']:.1f} s"
            f"  err out {fmt(row.get('err_out'), '.1e')}"
            f" dw13 {fmt(row.get('err_dw13'), '.1e')}" + clock_power(row, "  SM {} MHz, {} W"))


def clock_power(row: dict, form: str = "{}/{}") -> str:
    """The row's median SM clock and board power, as `form` fills them ('' without them)."""
    if row.get("sm_mhz") is None:
        return ""
    return form.format(f"{row['sm_mhz']:.0f}", f"{row.get('power_w', float('nan')):.0f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report(args.report, args.out)
        return
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.smoke:
        log("no CUDA device: timings below are CPU wall clock, memory columns are empty")
    torch._inductor.config.fx_graph_cache = False  # compile times without the FX graph cache
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = {s: (SMOKE_SHAPES if args.smoke else SHAPES)[s] for s in args.shapes}
    os.makedirs(args.out, exist_ok=True)
    env = env_info(dev)
    log("MoE layer fwd+bwd benchmark" + (" (smoke: tiny shapes on CPU)" if args.smoke else ""))
    for k, v in env.items():
        log(f"  {k}: {v}")
    if any(v.startswith("torchao") for v in args.variants) and env["torchao"] is None:
        log(f"  torchao fp8 rowwise will be skipped: {torchao_status()[1]}")
    if args.profile:
        profile(args, shapes, dev)
        return

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    jpath = os.path.join(args.out, f"moe_layer_{stamp}.jsonl")
    rows: list[dict] = []
    # The baseline first, so every row's speedup is known when the row is written.
    run_order = sorted(args.variants, key=lambda v: v != BASELINE)
    timing = args.timing
    global _telemetry
    _telemetry = Telemetry() if dev.type == "cuda" else None
    if _telemetry is not None:
        env.update(_telemetry.info)
        for k, v in _telemetry.info.items():
            log(f"  {k}: {v}")
    with open(jpath, "w") as jf:
        jf.write(to_json({"kind": "env", **env, "args": vars(args)}) + "\n")
        jf.flush()
        for shape, dims in shapes.items():
            T, H, I, E, k = dims
            for routing in args.routings:
                log(f"\n--- {shape} T={T} H={H} I={I} E={E} top-{k}, {routing} routing ---")
                case = None
                try:
                    case = setup_case(shape, dims, routing, args, dev, args.seed)
                except Exception as e:
                    log(f"  setup failed: {type(e).__name__}: {e}")
                    row = {"kind": "row", "shape": shape, "routing": routing, "variant": "-",
                           "name": "setup", "error": f"{type(e).__name__}: {e}"}
                    jf.write(to_json(row) + "\n")
                    jf.flush()
                    free(dev)
                    continue
                topw, topi, loads, w13, w2, x, dy = case
                del case
                nz = [n for n in loads if n]
                log(f"  expert loads: max {max(loads)} min {min(loads)} mean {T * k / E:.0f}, "
                    f"{E - len(nz)} empty; max/mean {max(loads) / (T * k / E):.2f}")
                t0 = time.perf_counter()
                ref = fp32_reference(dims, w13, w2, topw, topi, x, dy)
                free(dev)
                log(f"  fp32 reference: {ref.get('how', 'failed')} "
                    f"({time.perf_counter() - t0:.1f} s)")
                case_rows, timed = [], []
                for key in run_order:
                    row, kept = run_variant(key, dims, w13, w2, topw, topi, loads, x, dy, ref,
                                            args, dev)
                    case_rows.append({"kind": "row", "shape": shape, "routing": routing,
                                      "dims": dims, "loads": loads, "align": args.align,
                                      "ref": ref.get("how"), "timing": timing, **row})
                    if kept is not None:
                        timed.append(kept)
                        same = shared_compile(case_rows)
                        if same:
                            case_rows[-1]["compile_shared_with"] = same
                        log(f"  {row['name']:<26} first call {row['first_call_s']:.1f} s"
                            + (f" (Dynamo reused the graphs of {same}: same backend and "
                               "options)" if same else "") + "; timed below")
                    else:
                        log_row(case_rows[-1])
                if timed:
                    blocks: dict = {}
                    t0 = time.perf_counter()
                    if timing == "sustained":
                        got, blocks = sustained_ms(timed, dev, args.block_s, args.settle_s,
                                                   args.rounds, telemetry=_telemetry)
                    else:
                        got = interleaved_ms(timed, dev, args.warmup, args.reps)
                    shared = (_telemetry.window([(t0, time.perf_counter())])
                              if _telemetry is not None and timing == "interleaved" else {})
                    for row in case_rows:
                        t = got.get(row["variant"])
                        if isinstance(t, str):
                            row["error"], row["traceback"] = t, ""
                        elif t is not None:
                            set_times(row, t, dims)
                            row.update(shared)
                            if blocks.get(row["variant"]):
                                row["blocks"] = blocks[row["variant"]]
                                clocks = [b["sm_mhz"] for b in row["blocks"] if "sm_mhz" in b]
                                power = [b["power_w"] for b in row["blocks"] if "power_w" in b]
                                if clocks:
                                    row["sm_mhz"] = statistics.median(clocks)
                                    row["power_w"] = statistics.median(power)
                    del timed, got
                base_ms = next((r["ms"] for r in case_rows
                                if r["variant"] == BASELINE and r.get("ms")), None)
                for row in case_rows:
                    if base_ms and row.get("ms"):
                        row["speedup"] = base_ms / row["ms"]
                    if timing != "sequential":
                        log_row(row)
                    rows.append(row)
                    jf.write(to_json(row) + "\n")
                jf.flush()
                del topw, topi, w13, w2, x, dy, ref
                free(dev)
    if _telemetry is not None:
        _telemetry.stop()
    print_tables(rows, shapes, args.variants)
    log(f"rows: {jpath}")
    plot(rows, args.variants, os.path.join(args.out, f"moe_layer_{stamp}.png"))


if __name__ == "__main__":
    main()
