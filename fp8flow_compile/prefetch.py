"""Weight quantization started ahead of the graph that needs it, on a second CUDA stream.

Why
---
An MoE layer written the usual way breaks the Dynamo graph where it counts tokens per expert
(`bincount`, whose output size depends on the data): the routing runs in one compiled graph,
the count syncs the device, and the experts run in the next graph. When that graph starts, the
GPU's queue is empty, and it stays idle while the host goes through Dynamo's guards, the
AOTAutograd wrapper and the compiled code's set-up (0.4-0.6 ms per step on the H100 at the
benchmark's shapes). The first thing the experts' graph does is quantize the expert weights
(1.9-2.2 ms at the DeepSeek-V3 and Mixtral shapes), which depends on nothing the routing
computes.

So every forward graph compiled by fp8flow announces its start (`graph_started`); a weight
quantization (`quantize_128x128_dual`, in its CUDA implementation) records which graph started
before the one it runs in, and the next time that earlier graph starts, the same weights are
quantized right away on a side stream: during the routing, the count's syncs (which wait on the
main stream only) and the next graph's entry. The quantization op then takes the result instead
of computing it, after making its stream wait for the side stream's event.

Correctness
-----------
- A result is used only for the same tensor memory at the same version counter (`_version`,
  bumped by every in-place write such as an optimizer step, done through autograd-visible
  ops) with the same shape, strides and dtype; anything else recomputes. The side stream first
  waits for the main stream, so it reads the weights after every write queued before it.
- The result is the same kernel on the same input, so the same bytes (tests compare them).
- A result not taken by the next graph is dropped when the graph that began it starts again.
- Weights are held through weak references: prefetching never keeps a parameter alive.
- Nothing is prefetched while a CUDA graph is being captured.

`set_prefetch(False)` (or FP8FLOW_PREFETCH=0 in the environment) turns it off; `stats()` counts
what happened.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

_enabled = os.environ.get("FP8FLOW_PREFETCH", "1") != "0"
#: Device types prefetching runs on (the CPU only in tests: no streams there, it computes inline).
DEVICES = {"cuda"}

_current: Any = None     # token of the forward graph running now (the last one started)
_previous: Any = None    # token of the one started before it
# graph token -> {id(weight): weakref} of the weights the graph after it quantized
_links: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ready: dict[tuple, tuple] = {}  # key -> (outputs, event or None, token of the graph that began it)
_streams: dict[torch.device, torch.cuda.Stream] = {}
_stats: Counter = Counter()


def set_prefetch(on: bool) -> None:
    """Turn weight prefetching on or off (on by default). Off drops any prefetched result."""
    global _enabled
    _enabled = bool(on)
    if not _enabled:
        _ready.clear()


def prefetch_enabled() -> bool:
    return _enabled


def stats() -> dict[str, int]:
    """Counts since the last reset: `started` weights quantized ahead, `taken` results used,
    `dropped` results never used."""
    return dict(_stats)


def reset() -> None:
    """Forget every link, pending result and count."""
    global _current, _previous
    _links.clear()
    _ready.clear()
    _stats.clear()
    _current = _previous = None


class _Token:
    """Identity of one compiled forward graph (a weak-referenceable key for `_links`)."""


def wrap(compiled: Callable) -> Callable:
    """`compiled` (a forward graph's callable, as a torch.compile backend returns it), announcing
    its start before it runs. A transparent forwarder: the same arguments in, whatever the
    calling convention (boxed or not, kept in the copied attributes such as `_boxed_call`)."""
    token = _Token()

    def run(*args, **kwargs):
        graph_started(token)
        return compiled(*args, **kwargs)

    run.__dict__.update(getattr(compiled, "__dict__", {}))
    run.fp8flow_token = token  # type: ignore[attr-defined]
    return run


def graph_started(token: Any) -> None:
    global _current, _previous
    _previous, _current = _current, token
    if not _enabled:
        return
    stale = [k for k, v in _ready.items() if v[2] is token]
    for k in stale:  # begun when this graph last started and never taken
        del _ready[k]
    _stats["dropped"] += len(stale)
    refs = _links.get(token)
    if refs:
        _start(token, list(refs.values()))


def _key(w: torch.Tensor) -> tuple | None:
    try:
        return (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()), w.dtype, w.device)
    except RuntimeError:  # inference tensors have no version counter
        return None


def _start(token: Any, refs: list) -> None:
    from .kernels.quantize import quantize_128x128_dual_ref, quantize_128x128_dual_triton

    for r in refs:
        w = r()
        if w is None or w.device.type not in DEVICES:
            continue
        key = _key(w)
        if key is None or key in _ready:
            continue
        if w.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            main = torch.cuda.current_stream(w.device)
            side = _streams.get(w.device)
            if side is None:
                side = _streams[w.device] = torch.cuda.Stream(w.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = quantize_128x128_dual_triton(w)
                event = torch.cuda.Event()
                event.record(side)
            w.record_stream(side)
        else:
            out, event = quantize_128x128_dual_ref(w), None
        _ready[key] = (out, event, token)
        _stats["started"] += 1


def take(w: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The prefetched quantization of `w` if there is one for its current version (the caller's
    stream made to wait for it), else None. Either way, remembers that the graph started before
    the running one should prefetch `w` next time."""
    if not _enabled or w.device.type not in DEVICES:
        return None
    if _previous is not None:
        refs = _links.setdefault(_previous, {})
        if id(w) not in refs or refs[id(w)]() is not w:
            for k in [k for k, r in refs.items() if r() is None]:
                del refs[k]
            refs[id(w)] = weakref.ref(w)
    key = _key(w)
    hit = _ready.pop(key, None) if key is not None else None
    if hit is None:
        return None
    out, event, _ = hit
    if event is not None:
        cur = torch.cuda.current_stream(w.device)
        cur.wait_event(event)
        for t in out:
            t.record_stream(cur)
    _stats["taken"] += 1
    return out
