"""FP8 weights kept across calls while the parameter is unchanged (option ``cache_weights``).

A training step quantizes every FP8 weight once (`quantize_128x128_dual`: the 128x128-block form
and its transpose). With gradient accumulation the weights do not change between the
micro-batches of one optimizer step, so that work repeats for nothing. With the option on, the
graph's weight GEMMs take the high-precision parameter itself (`gemm_fp8_cached_weight`) and read
its FP8 forms from this cache, made on the first call and made again whenever the parameter has
changed.

When a cached form is used. An entry belongs to one tensor object (held by a weak reference, so
the cache never keeps a parameter alive and its entry goes when the parameter goes) and records
the parameter's storage pointer, offset, shape, strides, dtype, device and `_version`. Two things
end it:
- any `step()` of a `torch.optim` optimizer (a global step hook, registered on first use, empties
  the cache). The fused optimizers (`fused=True`) write the parameters without bumping
  `_version` (measured on torch 2.13), so the version alone would miss their updates;
- any other in-place write that autograd sees bumps `_version`: `copy_`, `add_`,
  `load_state_dict`, ops with `out=`, the foreach optimizers.
Between a forward and its backward, autograd refuses any change that bumps `_version`; a change
it cannot see (a fused optimizer step run between them, as in optimizer-in-backward schedules)
makes the backward's dgrad quantize the new weight, where the uncached graph would use the
forward's FP8 copy of the old one.

What it cannot see, outside an optimizer step: writes through `.data` (`p.data.copy_(...)`:
`.data` has its own version counter); `p.data = t` followed by in-place writes to `t` (the
parameter keeps its own counter, `t`'s is bumped: swapping EMA weights in and out this way is
not seen); writes through any other tensor that shares the parameter's storage (parameters
that are views of a flat buffer which something else writes); writes from outside torch (a raw
pointer in an extension, an optimizer that is not a `torch.optim.Optimizer`). Code that updates
weights in any of these ways must call `fp8flow_compile.clear_weight_cache()` after each
update, or leave the option off.

Memory: the FP8 forms of every cached weight stay alive until the next optimizer step, as many
bytes as the BF16 weights themselves (two one-byte copies). Without the cache the forward keeps
only the transposed form, for the backward, and only until the backward has run. Where weights
are gathered per layer and freed again (FSDP), the cache keeps the FP8 forms of every layer's
whole weights until the step, which may be more memory than the sharding saves. Any optimizer's
step empties the whole cache, also of weights that optimizer does not update (frozen weights,
a second optimizer): those are quantized again at their next call.

The FP8 forms never become buffers of the compiled graph: the GEMM op reads them inside, so
Inductor's buffer reuse (which may write into an op's output once its last reader is done) can
never touch a cached tensor.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..errors import require
from .gemm import gemm_fp8, grouped_gemm_fp8
from .quantize import quantize_128x128_dual

_lock = threading.Lock()
_entries: dict[int, tuple] = {}  # id(weight) -> (weakref, key, (q, s, qT, sT))
_dead: list[int] = []  # ids whose weight has gone, noted by the weak references' callbacks
_stats = {"hits": 0, "misses": 0, "clears": 0}
_hook = []  # the optimizer step hook's handle, once registered


def _after_optimizer_step(_optimizer, _args, _kwargs) -> None:
    clear_weight_cache()


def _ensure_hook() -> None:
    if not _hook:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _hook.append(register_optimizer_step_post_hook(_after_optimizer_step))


def _key(w: torch.Tensor) -> tuple:
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride(),
            w.dtype, w.device, w._version)


def _drop(ident: int):
    # A weak reference's callback may run inside any allocation (a garbage collection), also
    # while this thread holds _lock: it takes no lock and touches no entry, it only notes the id
    # (list.append is atomic); _purge drops the entry at the next call that holds the lock.
    def cb(_ref) -> None:
        _dead.append(ident)
    return cb


def _purge() -> list:
    """Under _lock: take out the entries whose parameter has gone; returns their forms, which
    the caller lets go after releasing the lock."""
    gone = []
    while _dead:
        ident = _dead.pop()
        e = _entries.get(ident)
        if e is not None and e[0]() is None:
            gone.append(_entries.pop(ident))
    return gone


def cached_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    """(q, s, qT, sT) of `quantize_128x128_dual(w)`, made at most once per version of w."""
    _ensure_hook()
    ident, key = id(w), _key(w)
    with _lock:
        gone = _purge()
        e = _entries.get(ident)
        if e is not None and e[0]() is w and e[1] == key:
            _stats["hits"] += 1
            return e[2]
        _stats["misses"] += 1
        stale = _entries.pop(ident, None)  # a stale form goes before the new one is made
        gen = _stats["clears"]
    del gone, stale
    with torch.no_grad():  # the forms carry no autograd history (which would hold w)
        forms = quantize_128x128_dual(w)
    ref = weakref.ref(w, _drop(ident))
    with _lock:
        if _stats["clears"] == gen:  # not emptied meanwhile (another thread's optimizer step)
            _entries[ident] = (ref, key, forms)
    return forms


def clear_weight_cache() -> None:
    """Drop every cached FP8 weight. Runs after every `torch.optim` optimizer step; call it
    after updating weights any other way `_version` does not see (e.g. through `.data`)."""
    global _entries
    with _lock:
        old, _entries = _entries, {}
        _dead.clear()
        _stats["clears"] += 1
    del old  # the FP8 forms are freed outside the lock


def weight_cache_info() -> dict:
    """{"entries", "bytes" (FP8 data and scales held), "hits", "misses" (since the last
    reset), "clears"}."""
    with _lock:
        gone = _purge()
        forms = [e[2] for e in _entries.values()]
        info = {"entries": len(forms), **_stats}
    del gone
    info["bytes"] = sum(t.numel() * t.element_size() for f in forms for t in f)
    return info


def reset_weight_cache_stats() -> None:
    with _lock:
        _stats.update(hits=0, misses=0)  # "clears" only grows: cached_weight compares it


@torch.library.custom_op("fp8flow::weight_cache_fill", mutates_args=())
def weight_cache_fill(w: torch.Tensor) -> torch.Tensor:
    """Make w's cached FP8 forms now if they are missing; returns an empty tensor for the GEMMs
    that read them to take as `ready`, so that the graph keeps this call where the schedule
    put it (early in the forward, where the uncached graph quantizes the weight)."""
    cached_weight(w)
    return w.new_empty(0)


@weight_cache_fill.register_fake
def _(w):
    return w.new_empty(0)


@torch.library.custom_op("fp8flow::gemm_fp8_cached_weight", mutates_args=())
def gemm_fp8_cached_weight(a_q: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor,
                           transposed_copy: bool, offs: torch.Tensor | None = None,
                           out_dtype: torch.dtype = torch.bfloat16,
                           offs_host: torch.Tensor | None = None,
                           ready: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_fp8` / `grouped_gemm_fp8` (offs given) with b the cached FP8 form of the weight w
    ([N, K] or [E, N, K], high precision): transposed_copy=False multiplies by w^T (fprop, w as
    stored), True by w (dgrad, through the transposed copy). ready: the output of
    `weight_cache_fill(w)`, unread; it only orders that call before this one."""
    op = "gemm_fp8_cached_weight"
    require(w.dim() == (2 if offs is None else 3), op,
            f"weight must be {'2' if offs is None else '3'}-D "
            f"({'dense' if offs is None else 'grouped'}), got shape {tuple(w.shape)}")
    q, s, qt, st = cached_weight(w)
    bq, bs = (qt, st) if transposed_copy else (q, s)
    if offs is None:
        return gemm_fp8(a_q, a_s, bq, bs, True, out_dtype)
    return grouped_gemm_fp8(a_q, a_s, bq, bs, offs, True, out_dtype, offs_host)


@gemm_fp8_cached_weight.register_fake
def _(a_q, a_s, w, transposed_copy, offs=None, out_dtype=torch.bfloat16, offs_host=None,
      ready=None):
    n = w.shape[-1] if transposed_copy else w.shape[-2]
    return a_q.new_empty(a_q.shape[0], n, dtype=out_dtype)
