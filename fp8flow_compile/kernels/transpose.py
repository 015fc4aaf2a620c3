"""Scaling-aware transpose: row-wise 1x128 FP8 -> column-wise 1x128 FP8 without leaving FP8.

The wgrad GEMM contracts over the token axis, so it wants its activation (or gradient) operand
quantized in 1x128 tiles along M, while the forward / dgrad GEMMs produced it in 1x128 tiles along
K. Instead of dequantizing and quantizing again (a cast the flow removes), this op rewrites the
E4M3 bytes of the row-wise form directly into the column-wise form.

Input and output
----------------
q [M, K] E4M3 with row scales s [M, K/128] (quantize_1x128 without groups; K a multiple of 128),
optional `offs` (groups along M, see kernels.groups) ->
qT [K, M] E4M3 and sT [K, T], T = max_tiles(M, G) (cdiv(M, 128) without groups): the layout
`quantize_1x128_col(x, offs)` produces. Tiles of up to 128 rows along M restart at each group
start; rows outside every group become zero bytes; unused scale slots hold 1.

Numerics
--------
For a tile slot (rows [start, end)) and a 128-column block kb, the new scale is
    sc = max s[r, kb] over the rows r of the tile whose block q[r, kb*128:(kb+1)*128] holds a byte
         other than +-0 (NaN bytes count), and 1 if there is none.
Rows that are all zero carry scale 1 (the amax == 0 rule) and would otherwise inflate sc above
the real data of the tile. sT[k, t] = sc for every k of the block. Scales are powers of two, so
each element only needs its value multiplied by 2**-k with k = exponent(sc) - exponent(s[r, kb])
>= 0, read from the fp32 exponent fields. That is done on the E4M3 byte with integer operations:

- while the result stays normal only the exponent field changes (the mantissa is kept, exact);
- where it falls into the subnormal range (inputs that are subnormal included) the significand is
  shifted right with round-to-nearest-even;
- at or below half the smallest subnormal (|q * 2**-k| <= 2**-10) it becomes a zero with the sign
  kept (the tie at 2**-10 goes to the even value, 0);
- NaN bytes (0x7F / 0xFF) stay NaN.

This equals exactly "dequantize with the row scales, divide by sc, round to E4M3 nearest-even"
for every element (the reference computes it that way), so the only elements lost are those whose
value is at most 2**-10 * sc: they flush to zero. The paper's transpose flushes every element
whose shifted exponent field drops below 1; keeping the subnormals that still fit is a refinement
that loses less and matches a fresh column-wise rounding of the dequantized values.

Precondition (not checked, it would cost a device sync): the scales are powers of two, as every
quantizer of this package produces them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import TILE
from .common import FP8, use_triton
from .fp8_math import HW_CAST
from .groups import (
    aligned_width,
    max_tiles,
    pad_groups,
    pad_offsets,
    tile_bounds,
)
from .quantize import _groups, check_align, tile_ranges

_OP = "scaling_aware_transpose"


# ---------------------------------------------------------------- torch reference (any device)

def scaling_aware_transpose_ref(q: torch.Tensor, s: torch.Tensor,
                                offs: torch.Tensor | None = None, align: int = 1
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose computed by dequantizing in float64 (exact for E4M3 values times
    power-of-two scales), dividing by the new scale and letting torch round to E4M3. The
    aligned layout is the plain one of the rows zero-padded per group (zero bytes, scale 1)."""
    if offs is not None and align > 1:
        M = q.shape[0]
        qp = pad_groups(q.view(torch.uint8), offs, align).view(FP8)
        return scaling_aware_transpose_ref(qp, pad_groups(s, offs, align, fill=1.0),
                                           pad_offsets(offs, align))
    M, K = q.shape
    KB = K // TILE
    starts, ends = tile_bounds(offs, M, device=q.device)
    qT = torch.zeros(K, M, dtype=FP8, device=q.device)
    sT = torch.ones(K, starts.numel(), dtype=torch.float32, device=q.device)
    qbytes = q.view(torch.uint8)
    for t, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        if b <= a:
            continue
        n = b - a
        blocks = qbytes[a:b].view(n, KB, TILE)
        nonzero = ((blocks & 0x7F) != 0).any(-1)  # [n, KB]; +-0 bytes are zero
        sc = torch.where(nonzero, s[a:b], 0.0).amax(0)
        sc = torch.where(sc == 0, 1.0, sc)  # scales are > 0, so 0 means "no nonzero row"
        deq = q[a:b].double().view(n, KB, TILE) * s[a:b].double().unsqueeze(-1)
        out = (deq / sc.double().view(1, KB, 1)).to(FP8).view(torch.uint8)
        # NaN bytes pass through as they are (rather than trusting the NaN sign of the cast).
        out = torch.where((blocks & 0x7F) == 0x7F, blocks, out)
        qT.view(torch.uint8)[:, a:b] = out.view(n, K).t()
        sT[:, t] = sc.repeat_interleave(TILE)
    return qT, sT


# ---------------------------------------------------------------- Triton kernels

@triton.jit
def shift_e4m3(byte, k):
    """The E4M3FN byte of (value of `byte`) * 2**-k, for int32 bytes and int32 k >= 0.

    Integer-only: normal results keep their mantissa and lose k from the exponent field;
    subnormal results shift the significand right with round-to-nearest-even (the encoding runs
    on from subnormals into normals, so a carry into 0x08 is the right byte); NaN stays NaN.
    """
    sign = byte & 0x80
    mag = byte & 0x7F
    ex = mag >> 3
    man = mag & 0x7
    new_ex = ex - k
    normal = (tl.maximum(new_ex, 0) << 3) | man
    # Subnormal result: the value is sig * 2**(max(ex, 1) - 1 - k) in units of 2**-9. A shift of
    # 5 already sends the largest significand (15) below half a unit, so larger shifts are capped
    # there (shift counts past the word width are undefined on the GPU).
    sig = tl.where(ex > 0, man | 0x8, man)
    sh = tl.minimum(tl.maximum(k + 1 - tl.maximum(ex, 1), 1), 5)
    kept = sig >> sh
    rem = sig - (kept << sh)
    half = 1 << (sh - 1)
    up = (rem > half) | ((rem == half) & ((kept & 1) == 1))
    sub = kept + up.to(tl.int32)
    out = tl.where((ex > 0) & (new_ex >= 1), normal, sub)
    out = tl.where((k == 0) | (mag == 0x7F), mag, out)
    return sign | out


@triton.jit
def rescale_e4m3(byte, k):
    """shift_e4m3 with the GPU's conversions when compiled: the byte decoded to fp32 (exact),
    multiplied by 2**-k (exact, or below E4M3's range where it flushes either way), converted
    back with round-to-nearest-even; NaN bytes kept as they are. The same bytes as the integer
    path for a fraction of its integer work, which bounded the kernel on the H100 (the transpose
    ran at 22% of copy bandwidth with the integer path). Under the interpreter, whose FP8
    conversions are wrong, the integer path."""
    if HW_CAST:
        v = byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        f = tl.where(k < 126, ((127 - k) << 23).to(tl.float32, bitcast=True), 0.0)
        out = (v * f).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        return tl.where((byte & 0x7F) == 0x7F, byte, out)
    return shift_e4m3(byte, k)


@triton.jit
def _load_block(q_ptr, s_ptr, rows, cols, lmask, K, KB, kb):
    """Bytes (as int32) and fp32 scale exponents of `rows` of one 128-column block; the
    exponent of a row whose block is all +-0 (or that is masked) is reported as 0."""
    byte = tl.load(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                   mask=lmask[:, None], other=0).to(tl.int32)
    s = tl.load(s_ptr + rows.to(tl.int64) * KB + kb, mask=lmask, other=1.0)
    s_ex = (s.to(tl.int32, bitcast=True) >> 23) & 0xFF
    nonzero = tl.max(((byte & 0x7F) != 0).to(tl.int32), axis=1) > 0
    return byte, s_ex, tl.where(nonzero & lmask, s_ex, 0)


@triton.jit
def _new_scale(sc_ex):
    # Normal fp32 scales have exponent field >= 1, so 0 marks "no nonzero row" -> scale 1.
    return tl.where(sc_ex == 0, 127, sc_ex)


@triton.jit
def _transpose_bytes(q_ptr, s_ptr, qt_ptr, start, end, ostart, oend, live, M, PM, K, KB, kb,
                     TILE_: tl.constexpr):
    # Byte stores: any tile. The layout change goes through shared memory as bytes.
    rows = start + tl.arange(0, TILE_)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    lmask = (rows < end) & (rows < M) & live
    byte, s_ex, live_ex = _load_block(q_ptr, s_ptr, rows, cols, lmask, K, KB, kb)
    sc_ex = _new_scale(tl.max(live_ex, axis=0))
    k = tl.maximum(sc_ex - s_ex, 0)  # negative only for all-zero rows, whose bytes stay zero
    out = tl.trans(rescale_e4m3(byte, k[:, None]).to(tl.uint8))
    ocols = ostart + tl.arange(0, TILE_)
    omask = (ocols < oend) & (ocols < PM)
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * PM + ocols[None, :], out, mask=omask[None, :])
    return sc_ex


@triton.jit
def _transpose_words(q_ptr, s_ptr, qt32_ptr, start, end, ostart, oend, live, PM, K, KB, kb,
                     TILE_: tl.constexpr):
    # Word stores: output tiles that start and end on multiples of 4 (PM too). Rows 4w..4w+3
    # are loaded as four row sets in the same layout, so packing their bytes into one int32 word
    # per (w, column) moves no data between threads; the transpose then moves 4-byte words.
    cols = kb * TILE_ + tl.arange(0, TILE_)
    w = tl.arange(0, TILE_ // 4)
    r0 = start + 4 * w
    b0, e0, l0 = _load_block(q_ptr, s_ptr, r0, cols, (r0 < end) & live, K, KB, kb)
    b1, e1, l1 = _load_block(q_ptr, s_ptr, r0 + 1, cols, (r0 + 1 < end) & live, K, KB, kb)
    b2, e2, l2 = _load_block(q_ptr, s_ptr, r0 + 2, cols, (r0 + 2 < end) & live, K, KB, kb)
    b3, e3, l3 = _load_block(q_ptr, s_ptr, r0 + 3, cols, (r0 + 3 < end) & live, K, KB, kb)
    sc_ex = _new_scale(tl.maximum(tl.maximum(tl.max(l0, axis=0), tl.max(l1, axis=0)),
                                  tl.maximum(tl.max(l2, axis=0), tl.max(l3, axis=0))))
    word = rescale_e4m3(b0, tl.maximum(sc_ex - e0, 0)[:, None])
    word |= rescale_e4m3(b1, tl.maximum(sc_ex - e1, 0)[:, None]) << 8
    word |= rescale_e4m3(b2, tl.maximum(sc_ex - e2, 0)[:, None]) << 16
    word |= rescale_e4m3(b3, tl.maximum(sc_ex - e3, 0)[:, None]) << 24
    out = tl.trans(word)  # [128 columns, 32 words]
    wq = ostart // 4 + w
    tl.store(qt32_ptr + cols[:, None].to(tl.int64) * (PM // 4) + wq[None, :], out,
             mask=(wq < oend // 4)[None, :])
    return sc_ex


@triton.jit
def _transpose_kernel(q_ptr, s_ptr, qt_ptr, qt32_ptr, st_ptr, offs_ptr, G, M, PM, K, KB, T,
                      TILE_: tl.constexpr, GROUPED: tl.constexpr, G_BLOCK: tl.constexpr,
                      WORDS: tl.constexpr, ALIGN: tl.constexpr):
    # One program per (tile slot t, column block kb): reads q[start:end, block] and s[rows, kb],
    # writes qT[block, ostart:oend] and sT[block, t]. The output range is the input range
    # (ALIGN == 1) or its place in the aligned layout (kernels.groups), padding included. The
    # rows past offs[-1] come as slots of their own that read nothing: zero bytes, scale 1.
    # WORDS (PM a multiple of 4): tiles on 4-column boundaries store int32 words, else bytes.
    t = tl.program_id(0)
    kb = tl.program_id(1)
    start, end, ostart, oend, live = tile_ranges(offs_ptr, G, t, M, PM, TILE_, GROUPED,
                                                 G_BLOCK, ALIGN)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    if WORDS:
        if (ostart % 4 == 0) & (oend % 4 == 0):
            sc_ex = _transpose_words(q_ptr, s_ptr, qt32_ptr, start, end, ostart, oend, live, PM,
                                     K, KB, kb, TILE_)
        else:
            sc_ex = _transpose_bytes(q_ptr, s_ptr, qt_ptr, start, end, ostart, oend, live, M,
                                     PM, K, KB, kb, TILE_)
    else:
        sc_ex = _transpose_bytes(q_ptr, s_ptr, qt_ptr, start, end, ostart, oend, live, M, PM,
                                 K, KB, kb, TILE_)
    sc = (sc_ex << 23).to(tl.float32, bitcast=True)
    tl.store(st_ptr + cols.to(tl.int64) * T + t, sc + tl.zeros([TILE_], tl.float32))


# ---------------------------------------------------------------- launcher

def scaling_aware_transpose_triton(q: torch.Tensor, s: torch.Tensor,
                                   offs: torch.Tensor | None = None, align: int = 1,
                                   num_warps: int | None = None, words: bool = True
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = q.shape
    KB = K // TILE
    G = None if offs is None else offs.numel()
    PM = M if offs is None else aligned_width(M, G, align)
    T = max_tiles(PM, G)
    qT = torch.empty(K, PM, dtype=FP8, device=q.device)
    # Every (slot, block) program writes its 128 scale entries, empty slots included.
    sT = torch.empty(K, T, dtype=torch.float32, device=q.device)
    og, G, grouped, gb = _groups(offs, q.device)
    words = words and PM % 4 == 0 and PM > 0  # an int32 view of [K, 0] bytes fails
    # H100, DeepSeek-V3 [P, 7168]: words 4 warps 0.76 ms, 8 warps 1.02; bytes 8 warps 1.01,
    # 4 warps 2.05.
    num_warps = num_warps or (4 if words else 8)
    if T and KB:
        qt8 = qT.view(torch.uint8)
        _transpose_kernel[(T, KB)](q.view(torch.uint8), s, qt8,
                                   qt8.view(torch.int32) if words else qt8, sT, og, G, M, PM, K,
                                   KB, T, TILE_=TILE, GROUPED=grouped, G_BLOCK=gb, WORDS=words,
                                   ALIGN=align, num_warps=num_warps)
    return qT, sT


# ---------------------------------------------------------------- checks and custom op

def _check(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None, align: int) -> None:
    require(q.dim() == 2, _OP, f"data must be 2-D, got shape {tuple(q.shape)}")
    require_dtype(q, (FP8,), _OP, "data")
    require_dtype(s, (torch.float32,), _OP, "scales")
    M, K = q.shape
    require(K % TILE == 0, _OP, f"K = {K} must be a multiple of {TILE} (whole 1x{TILE} tiles)")
    require(tuple(s.shape) == (M, K // TILE), _OP,
            f"row-wise scales must have shape {(M, K // TILE)}, got {tuple(s.shape)}")
    require(q.is_contiguous() and s.is_contiguous(), _OP, "data and scales must be contiguous")
    if offs is not None:
        require(offs.dim() == 1 and offs.numel() >= 1, _OP, "offs must be a non-empty 1-D tensor")
        require_dtype(offs, (torch.int32,), _OP, "offs")
        require(offs.device == q.device, _OP, "offs must be on the device of the data")
    require(s.device == q.device, _OP, "scales must be on the device of the data")
    check_align(align, offs, _OP)


@torch.library.custom_op("fp8flow::scaling_aware_transpose", mutates_args=())
def scaling_aware_transpose(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None = None,
                            align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 1x128 FP8 (q [M, K], s [M, K/128]) -> column-wise 1x128 FP8 (qT [K, W],
    sT [K, T]) as quantize_1x128_col lays it out, tiles along M restarting at groups of `offs`.
    W = M, or with align > 1 the aligned group layout of kernels.groups (read it with
    `pad_offsets(offs, align)` as its group ends)."""
    _check(q, s, offs, align)
    fn = scaling_aware_transpose_triton if use_triton(q) else scaling_aware_transpose_ref
    return fn(q, s, offs, align)


@scaling_aware_transpose.register_fake
def _(q, s, offs=None, align=1):
    M, K = q.shape
    G = None if offs is None else offs.shape[0]
    W = M if offs is None else aligned_width(M, G, align)
    return q.new_empty(K, W, dtype=FP8), q.new_empty(K, max_tiles(W, G), dtype=torch.float32)
