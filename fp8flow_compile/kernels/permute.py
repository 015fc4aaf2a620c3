"""MoE token permutation: routed rows gathered in expert order, each group padded with zero rows.

Layouts (T tokens, k routed slots per token, E experts, H hidden, S = cdiv(H, 128) scale tiles)
---------------------------------------------------------------------------------------------
`moe_routing_maps(topk_idx [T, k], E, align)` builds every index map from the router's choice,
with static shapes and no host sync:

- P = padded_rows(T * k, E, align) = T*k + E*(align - 1), the static upper bound of the padded
  total; rows past offs_pad[-1] are unused tail rows.
- Slot (t, j) is flat index t*k + j. Rows are in expert order and, within an expert, in slot order.
- src_row [P] int32: source token of each padded row, -1 for pad and tail rows.
- src_slot [P] int32: source slot t*k + j of each padded row, -1 for pad and tail rows (what the
  backward of a weighted unpermute needs to find the prob of a row).
- pos [T, k] int32: padded row of each slot (-1 for a dropped slot, see below).
- offs_pad [E] int32: cumulative ends of the padded groups, as `torch._grouped_mm` takes them;
  group g has cdiv(counts[g], align) * align rows, so an empty expert has none.
- counts [E] int32: slots routed to each expert.

Ops (torch.ops.fp8flow.*):
- permute_pad_fp8(q [T, H] e4m3, s [T, S] fp32, src_row) -> (q_p [P, H], s_p [P, S]): data and
  scale rows gathered by one kernel; pad rows get zero data and scale 1. A bit copy, so the
  dequantized permuted rows equal the dequantized source rows exactly.
- permute_pad(x [T, H] any float dtype, src_row) -> [P, H], pad rows zero (bit copy).
- unpermute(y [P, H], pos, probs [T, k] | None) -> [T, H]: out[t] = sum_j probs[t, j] * y[pos[t, j]]
  accumulated in fp32 in slot order j = 0..k-1 (a gather, so deterministic without atomics).
- unpermute_backward(dout [T, H], y [P, H] | None, src_row, src_slot, probs | None)
  -> (dy [P, H], dprobs [T, k] fp32, or an empty tensor when probs is None):
  dy[p] = probs[slot(p)] * dout[src_row[p]] (pad rows zero), dprobs[t, j] = <dout[t], y[pos[t, j]]>.
  In the FP8 flow the probs are applied inside the SwiGLU, so the unpermute there is unweighted and
  its backward is permute_pad_fp8 of the quantized output gradient; the weighted form serves the
  BF16 and naive paths.

Index ranges: on CPU the ops and `moe_routing_maps` check them and raise Fp8Unsupported. On CUDA
(and when traced) a check would need a host sync, so ids in range are the caller's contract; the
maps stay memory-safe anyway: an expert id outside [0, E) makes its slot dropped (pos = -1, no
padded row), and the kernels read nothing for negative indices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import BLOCKWISE, TILE
from .common import FP8, use_triton
from .groups import cdiv

#: Dtypes of the ops that do arithmetic (unpermute and its backward): the kernels convert between
#: fp32 and bf16 with integer ops, since the interpreter's casts truncate and mangle subnormals.
ACC_OUT = (torch.bfloat16, torch.float32)

_INT = (torch.int32,)
# Bits of fp32 1.0: the scale of a pad row, written by the kernel through an int32 view.
_ONE_BITS = int(torch.tensor(1.0, dtype=torch.float32).view(torch.int32).item())


# ---------------------------------------------------------------- routing maps (pure torch)

class RoutingMaps(NamedTuple):
    src_row: torch.Tensor  # [P] int32
    pos: torch.Tensor  # [T, k] int32
    offs_pad: torch.Tensor  # [E] int32
    counts: torch.Tensor  # [E] int32
    src_slot: torch.Tensor  # [P] int32


def padded_rows(num_slots: int, num_experts: int, align: int) -> int:
    """Static upper bound of the padded row count: each group wastes at most align - 1 rows."""
    return num_slots + num_experts * (align - 1)


def _eager_cpu(t: torch.Tensor) -> bool:
    # Only plain CPU tensors outside tracing can be inspected without a device sync or a
    # data-dependent branch in the graph; fake and functional tensors are subclasses.
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor
            and t.device.type == "cpu")


def moe_routing_maps(topk_idx: torch.Tensor, num_experts: int,
                     align: int = BLOCKWISE.group_align) -> RoutingMaps:
    """Index maps of the padded expert-ordered layout (see the module docstring).

    Pure torch on any device: one stable sort, one searchsorted and two permutation scatters,
    all of static shape, so it traces into a graph without a host sync.
    """
    op = "moe_routing_maps"
    require(topk_idx.dim() == 2, op, f"topk_idx must be 2-D [T, k], got {tuple(topk_idx.shape)}")
    require_dtype(topk_idx, (torch.int64, torch.int32), op, "topk_idx")
    require(num_experts >= 1, op, f"num_experts must be >= 1, got {num_experts}")
    require(align >= 1, op, f"align must be >= 1, got {align}")
    T, k = topk_idx.shape
    require(k >= 1, op, "topk_idx must have at least one slot per token (k >= 1)")
    N = T * k
    P = padded_rows(N, num_experts, align)
    require(P + N < 2**31, op, f"padded rows {P} + slots {N} must fit in int32")
    E = num_experts
    if _eager_cpu(topk_idx) and N:
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        require(lo >= 0 and hi < E, op,
                f"expert ids must lie in [0, num_experts={E}), got range [{lo}, {hi}]")

    dev = topk_idx.device
    flat = topk_idx.reshape(-1).to(torch.int64)
    # Out-of-range ids get the key E so they sort after every expert and own no padded row.
    key = torch.where((flat >= 0) & (flat < E), flat, E)
    order = torch.argsort(key, stable=True)  # slot ids in (expert, slot) order
    skey = key[order]
    starts = torch.searchsorted(skey, torch.arange(E + 1, device=dev, dtype=torch.int64))
    counts = starts[1:] - starts[:-1]
    padded = (counts + align - 1) // align * align
    offs_pad = torch.cumsum(padded, 0)
    pad_start = offs_pad - padded

    i = torch.arange(N, device=dev, dtype=torch.int64)
    e = skey.clamp(max=E - 1)
    # Dropped slots go to distinct rows past P, so both scatters see a permutation (deterministic).
    row = torch.where(skey < E, pad_start[e] + (i - starts[e]), P + i)
    pos = torch.empty(N, dtype=torch.int64, device=dev).scatter_(0, order, row)
    pos = torch.where(pos < P, pos, -1)
    src_slot = torch.full((P + N,), -1, dtype=torch.int64, device=dev).scatter_(0, row, order)[:P]
    src_row = torch.where(src_slot >= 0, src_slot // k, -1)
    return RoutingMaps(src_row.to(torch.int32), pos.view(T, k).to(torch.int32),
                       offs_pad.to(torch.int32), counts.to(torch.int32),
                       src_slot.to(torch.int32))


# ---------------------------------------------------------------- torch references (any device)

def _gather_rows_ref(x: torch.Tensor, idx: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x[idx[p]] or the row `fill` where idx[p] < 0, as a bit copy (x viewed as integers)."""
    ext = torch.cat([x, fill.expand(1, x.shape[1])])
    return ext[torch.where(idx >= 0, idx, x.shape[0]).long()]


def permute_pad_fp8_ref(q: torch.Tensor, s: torch.Tensor, src_row: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    qb = q.view(torch.uint8)
    q_p = _gather_rows_ref(qb, src_row, qb.new_zeros(1, 1)).view(FP8)
    s_p = _gather_rows_ref(s.view(torch.int32), src_row, s.new_ones(1, 1).view(torch.int32))
    return q_p, s_p.view(torch.float32)


def permute_pad_ref(x: torch.Tensor, src_row: torch.Tensor) -> torch.Tensor:
    xb = x.view(torch.uint8)
    return _gather_rows_ref(xb, src_row, xb.new_zeros(1, 1)).view(x.dtype)


def unpermute_ref(y: torch.Tensor, pos: torch.Tensor, probs: torch.Tensor | None = None
                  ) -> torch.Tensor:
    T, k = pos.shape
    valid = pos >= 0
    yf = torch.cat([y.float(), y.new_zeros(1, y.shape[1], dtype=torch.float32)])
    idx = torch.where(valid, pos, y.shape[0]).long()
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    # Same operation order as the kernel: acc = ((0 + w0*v0) + w1*v1) + ..., one rounding each.
    for j in range(k):
        v = yf[idx[:, j]]
        if probs is not None:
            v = v * torch.where(valid[:, j], probs[:, j], 0.0)[:, None]
        acc = acc + v
    return acc.to(y.dtype)


def unpermute_backward_ref(dout: torch.Tensor, y: torch.Tensor | None, src_row: torch.Tensor,
                           src_slot: torch.Tensor, probs: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    if probs is None:
        return permute_pad_ref(dout, src_row), dout.new_empty(0, dtype=torch.float32)
    valid = src_row >= 0
    d = _gather_rows_ref(dout.float(), src_row, dout.new_zeros(1, 1, dtype=torch.float32))
    w = torch.where(valid, probs.reshape(-1)[src_slot.clamp(min=0).long()], 0.0)
    dy = (d * w[:, None]).to(dout.dtype)
    dot = (d * torch.where(valid[:, None], y.float(), 0.0)).sum(1)
    N = probs.numel()
    # Pad rows write to a dump entry past the end; every slot with a row is written once.
    dest = torch.where(valid, src_slot, N).long()
    dprobs = torch.zeros(N + 1, dtype=torch.float32, device=dout.device).scatter_(0, dest, dot)
    return dy, dprobs[:N].view(probs.shape)


# ---------------------------------------------------------------- Triton kernels

@triton.jit
def _load_f32(ptr, offs, mask, BF16: tl.constexpr):
    """Load as fp32; bf16 tensors come through an int16 view and are widened with bit ops,
    because the interpreter's bf16 <-> fp32 conversion mangles subnormals."""
    if BF16:
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _store_f32(ptr, offs, x, mask, BF16: tl.constexpr):
    """Store fp32 x; into a bf16 tensor (int16 view) rounded to nearest-even with integer ops,
    NaN as the canonical 0x7FC0 and overflow to +-inf, the bits torch's cast gives."""
    if BF16:
        bits = x.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x == x, r, 0x7FC0)
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _gather_rows_kernel(src_ptr, dst_ptr, idx_ptr, aux_src_ptr, aux_dst_ptr, P, W, AW, AUX_FILL,
                        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_AW: tl.constexpr,
                        HAS_AUX: tl.constexpr):
    # dst[p] = src[idx[p]] (zero where idx[p] < 0) over integer words; with HAS_AUX the first
    # column block also gathers the aux rows (scales), filling AUX_FILL where idx[p] < 0.
    pid_r = tl.program_id(0)
    pid_w = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < P
    src = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    valid = src >= 0
    src64 = src.to(tl.int64)
    rows64 = rows.to(tl.int64)
    cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    v = tl.load(src_ptr + src64[:, None] * W + cols[None, :],
                mask=valid[:, None] & cmask[None, :], other=0)
    tl.store(dst_ptr + rows64[:, None] * W + cols[None, :], v, mask=rmask[:, None] & cmask[None, :])
    if HAS_AUX:
        if pid_w == 0:
            acols = tl.arange(0, BLOCK_AW)
            amask = acols < AW
            a = tl.load(aux_src_ptr + src64[:, None] * AW + acols[None, :],
                        mask=valid[:, None] & amask[None, :], other=0)
            a = tl.where(valid[:, None], a, AUX_FILL)
            tl.store(aux_dst_ptr + rows64[:, None] * AW + acols[None, :], a,
                     mask=rmask[:, None] & amask[None, :])


@triton.jit
def _unpermute_kernel(y_ptr, pos_ptr, probs_ptr, out_ptr, T, H, K: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PROBS: tl.constexpr,
                      BF16: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    # Loop bounds are constexpr: the interpreter (numpy >= 2) cannot loop to a runtime scalar.
    for j in range(K):
        slot = toks.to(tl.int64) * K + j
        p = tl.load(pos_ptr + slot, mask=tmask, other=-1)
        valid = p >= 0
        v = _load_f32(y_ptr, p.to(tl.int64)[:, None] * H + cols[None, :],
                      valid[:, None] & cmask[None, :], BF16)
        if HAS_PROBS:
            w = tl.load(probs_ptr + slot, mask=valid, other=0.0)
            v = v * w[:, None]
        acc += v
    _store_f32(out_ptr, toks.to(tl.int64)[:, None] * H + cols[None, :], acc,
               tmask[:, None] & cmask[None, :], BF16)


@triton.jit
def _unpermute_bwd_kernel(dout_ptr, y_ptr, src_ptr, slot_ptr, probs_ptr, dy_ptr, dprobs_ptr, P, H,
                          BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, NUM_HB: tl.constexpr,
                          DOUT_BF16: tl.constexpr, Y_BF16: tl.constexpr):
    # One program owns whole padded rows, so the dot product of a row is reduced in one fixed
    # order and dprobs[slot] is written once (each slot has at most one row): no atomics.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < P
    rows64 = rows.to(tl.int64)
    src = tl.load(src_ptr + rows, mask=rmask, other=-1)
    valid = src >= 0
    slot = tl.load(slot_ptr + rows, mask=valid, other=0)
    w = tl.load(probs_ptr + slot, mask=valid, other=0.0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for hb in range(NUM_HB):  # constexpr bound, as in _unpermute_kernel
        cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        m = valid[:, None] & cmask[None, :]
        d = _load_f32(dout_ptr, src.to(tl.int64)[:, None] * H + cols[None, :], m, DOUT_BF16)
        offs = rows64[:, None] * H + cols[None, :]
        _store_f32(dy_ptr, offs, d * w[:, None], rmask[:, None] & cmask[None, :], DOUT_BF16)
        yv = _load_f32(y_ptr, offs, m, Y_BF16)
        acc += tl.sum(d * yv, axis=1)
    tl.store(dprobs_ptr + slot, acc, mask=valid)


# ---------------------------------------------------------------- launchers

_BLOCK_R = 8
#: Bytes of one row a gather program moves per column block. More, smaller programs keep more
#: random row reads in flight: H100, [8192, 7168] E4M3 -> 65536 rows, 0.293 ms with 4096 bytes,
#: 0.255 with 2048, 0.222 with 1024 (82% of copy bandwidth); BLOCK_R 4-32 made no difference.
_ROW_BYTES = 1024
_BLOCK_T = 16
_BLOCK_H = 256


def _word_view(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Views of same-width 2-D contiguous tensors as the widest integer words that divide a row
    and every base address: fewer, wider loads for the row gather, and a bit copy for any dtype."""
    row_bytes = ts[0].shape[1] * ts[0].element_size()
    for wt in (torch.int64, torch.int32, torch.int16):
        n = wt.itemsize
        if row_bytes % n == 0 and all(t.data_ptr() % n == 0 for t in ts):
            return [t.view(torch.uint8).view(wt) for t in ts]
    return [t.view(torch.uint8) for t in ts]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors go to the kernels as int16 (see _load_f32 / _store_f32)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _gather_rows_triton(x: torch.Tensor, idx: torch.Tensor, scales: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    P = idx.numel()
    out = torch.empty(P, x.shape[1], dtype=x.dtype, device=x.device)
    xw, ow = _word_view(x, out)
    W = xw.shape[1]
    block_w = min(triton.next_power_of_2(max(W, 1)), _ROW_BYTES // xw.element_size())
    s_out = None
    aux_src = aux_dst = idx  # unused when HAS_AUX is off
    AW = 0
    if scales is not None:
        s_out = torch.empty(P, scales.shape[1], dtype=torch.float32, device=x.device)
        aux_src, aux_dst = scales.view(torch.int32), s_out.view(torch.int32)
        AW = scales.shape[1]
    if P:
        grid = (cdiv(P, _BLOCK_R), max(cdiv(W, block_w), 1))
        _gather_rows_kernel[grid](
            xw, ow, idx, aux_src, aux_dst, P, W, AW, _ONE_BITS,
            BLOCK_R=_BLOCK_R, BLOCK_W=block_w, BLOCK_AW=triton.next_power_of_2(max(AW, 1)),
            HAS_AUX=scales is not None)
    return out, s_out


def permute_pad_fp8_triton(q: torch.Tensor, s: torch.Tensor, src_row: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    q_p, s_p = _gather_rows_triton(q, src_row, s)
    return q_p, s_p


def permute_pad_triton(x: torch.Tensor, src_row: torch.Tensor) -> torch.Tensor:
    return _gather_rows_triton(x, src_row)[0]


def unpermute_triton(y: torch.Tensor, pos: torch.Tensor, probs: torch.Tensor | None = None
                     ) -> torch.Tensor:
    T, K = pos.shape
    H = y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T and H:
        # No FMA contraction: acc + w*v rounds the product first, as the torch reference does.
        _unpermute_kernel[(cdiv(T, _BLOCK_T), cdiv(H, _BLOCK_H))](
            _bits(y), pos, pos if probs is None else probs, _bits(out), T, H, K,
            BLOCK_T=_BLOCK_T, BLOCK_H=_BLOCK_H, HAS_PROBS=probs is not None,
            BF16=y.dtype == torch.bfloat16, enable_fp_fusion=False)
    return out


def unpermute_backward_triton(dout: torch.Tensor, y: torch.Tensor | None, src_row: torch.Tensor,
                              src_slot: torch.Tensor, probs: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    if probs is None:
        return permute_pad_triton(dout, src_row), dout.new_empty(0, dtype=torch.float32)
    P = src_row.numel()
    H = dout.shape[1]
    dy = torch.empty(P, H, dtype=dout.dtype, device=dout.device)
    # Slots without a row (dropped ids) are never written by the kernel.
    dprobs = torch.zeros(probs.shape, dtype=torch.float32, device=dout.device)
    if P:
        _unpermute_bwd_kernel[(cdiv(P, _BLOCK_R),)](
            _bits(dout), _bits(y), src_row, src_slot, probs, _bits(dy), dprobs, P, H,
            BLOCK_R=_BLOCK_R, BLOCK_H=_BLOCK_H, NUM_HB=cdiv(H, _BLOCK_H),
            DOUT_BF16=dout.dtype == torch.bfloat16, Y_BF16=y.dtype == torch.bfloat16,
            enable_fp_fusion=False)
    return dy, dprobs


# ---------------------------------------------------------------- checks

def _check_2d(t: torch.Tensor, op: str, name: str) -> None:
    require(t.dim() == 2, op, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    require(t.is_contiguous(), op, f"{name} must be contiguous, got strides {tuple(t.stride())}")


def check_index(idx: torch.Tensor, op: str, name: str, dim: int, bound: int,
                 device: torch.device) -> None:
    """int32, contiguous, on `device`; values in [-1, bound) checked where that needs no sync."""
    require(idx.dim() == dim, op, f"{name} must be {dim}-D, got shape {tuple(idx.shape)}")
    require_dtype(idx, _INT, op, name)
    require(idx.is_contiguous(), op, f"{name} must be contiguous")
    require(idx.device == device, op, f"{name} is on {idx.device}, expected {device}")
    if _eager_cpu(idx) and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        require(lo >= -1 and hi < bound, op,
                f"{name} values must lie in [-1, {bound}), got range [{lo}, {hi}]")


def _check_probs(probs: torch.Tensor | None, shape: tuple[int, ...], op: str,
                 device: torch.device) -> None:
    if probs is None:
        return
    require_dtype(probs, (torch.float32,), op, "probs")
    require(tuple(probs.shape) == tuple(shape), op,
            f"probs must have shape {tuple(shape)}, got {tuple(probs.shape)}")
    require(probs.is_contiguous(), op, "probs must be contiguous")
    require(probs.device == device, op, f"probs is on {probs.device}, expected {device}")


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fp8flow::permute_pad_fp8", mutates_args=())
def permute_pad_fp8(q: torch.Tensor, s: torch.Tensor, src_row: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather FP8 rows and their 1x128 scale rows into the padded expert order of `src_row`;
    pad rows get zero data and scale 1."""
    op = "permute_pad_fp8"
    _check_2d(q, op, "data")
    _check_2d(s, op, "scales")
    require_dtype(q, (FP8,), op, "data")
    require_dtype(s, (torch.float32,), op, "scales")
    T, H = q.shape
    require(tuple(s.shape) == (T, cdiv(H, TILE)), op,
            f"scales must have shape {(T, cdiv(H, TILE))} (row-wise 1x{TILE} tiles), "
            f"got {tuple(s.shape)}")
    require(s.device == q.device, op, f"scales are on {s.device}, data on {q.device}")
    check_index(src_row, op, "src_row", 1, T, q.device)
    return (permute_pad_fp8_triton if use_triton(q) else permute_pad_fp8_ref)(q, s, src_row)


@permute_pad_fp8.register_fake
def _(q, s, src_row):
    P = src_row.shape[0]
    return q.new_empty(P, q.shape[1]), s.new_empty(P, s.shape[1])


@torch.library.custom_op("fp8flow::permute_pad", mutates_args=())
def permute_pad(x: torch.Tensor, src_row: torch.Tensor) -> torch.Tensor:
    """Gather rows of a floating-point x into the padded expert order of `src_row` (pad rows 0)."""
    op = "permute_pad"
    _check_2d(x, op, "input")
    require(x.is_floating_point(), op, f"input must be a floating-point tensor, got {x.dtype}")
    check_index(src_row, op, "src_row", 1, x.shape[0], x.device)
    return (permute_pad_triton if use_triton(x) else permute_pad_ref)(x, src_row)


@permute_pad.register_fake
def _(x, src_row):
    return x.new_empty(src_row.shape[0], x.shape[1])


@torch.library.custom_op("fp8flow::unpermute", mutates_args=())
def unpermute(y: torch.Tensor, pos: torch.Tensor, probs: torch.Tensor | None = None
              ) -> torch.Tensor:
    """out[t] = sum_j probs[t, j] * y[pos[t, j]] (weight 1 without probs), fp32 accumulation in
    slot order; slots with pos = -1 add nothing."""
    op = "unpermute"
    _check_2d(y, op, "y")
    require_dtype(y, ACC_OUT, op, "y")
    check_index(pos, op, "pos", 2, y.shape[0], y.device)
    _check_probs(probs, tuple(pos.shape), op, y.device)
    return (unpermute_triton if use_triton(y) else unpermute_ref)(y, pos, probs)


@unpermute.register_fake
def _(y, pos, probs=None):
    return y.new_empty(pos.shape[0], y.shape[1])


@torch.library.custom_op("fp8flow::unpermute_backward", mutates_args=())
def unpermute_backward(dout: torch.Tensor, y: torch.Tensor | None, src_row: torch.Tensor,
                       src_slot: torch.Tensor, probs: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of unpermute: (dy [P, H] in dout's dtype, dprobs [T, k] fp32).

    Without probs, dy = permute_pad(dout, src_row), y is not read (may be None) and dprobs is an
    empty tensor. With probs, y is the forward input [P, H].
    """
    op = "unpermute_backward"
    _check_2d(dout, op, "dout")
    require_dtype(dout, ACC_OUT, op, "dout")
    T, H = dout.shape
    check_index(src_row, op, "src_row", 1, T, dout.device)
    P = src_row.shape[0]
    if probs is not None:
        require(probs.dim() == 2 and probs.shape[0] == T, op,
                f"probs must be [T={T}, k], got shape {tuple(probs.shape)}")
        _check_probs(probs, tuple(probs.shape), op, dout.device)
        check_index(src_slot, op, "src_slot", 1, probs.numel(), dout.device)
        require(src_slot.shape[0] == P, op,
                f"src_slot must have {P} rows like src_row, got {src_slot.shape[0]}")
        require(y is not None, op, "y (the forward input) is needed to compute dprobs")
        _check_2d(y, op, "y")
        require_dtype(y, ACC_OUT, op, "y")
        require(tuple(y.shape) == (P, H), op, f"y must have shape {(P, H)}, got {tuple(y.shape)}")
        require(y.device == dout.device, op, f"y is on {y.device}, dout on {dout.device}")
    fn = unpermute_backward_triton if use_triton(dout) else unpermute_backward_ref
    return fn(dout, y, src_row, src_slot, probs)


@unpermute_backward.register_fake
def _(dout, y, src_row, src_slot, probs=None):
    dy = dout.new_empty(src_row.shape[0], dout.shape[1])
    if probs is None:
        return dy, dout.new_empty(0, dtype=torch.float32)
    return dy, probs.new_empty(probs.shape)
