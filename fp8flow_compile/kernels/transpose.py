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

With `src_row` (int32 [M]) the rows are gathered on the way in: row r of the input is
q[src_row[r]] (scale row s[src_row[r]]), a zero row with scale 1 where src_row[r] < 0, as
`permute_pad_fp8(q, s, src_row)` would make them; q then has any number of rows. The result is
that of the gather followed by the transpose, bit for bit, without writing and reading the
gathered rows: the backward's second gather of the tokens for the FC1 wgrad is this
(passes/flow_gather.py).

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
from .permute import check_index, permute_pad_fp8_ref
from .quantize import check_align, raster, slot_ranges, tile_table

_OP = "scaling_aware_transpose"


# ---------------------------------------------------------------- torch reference (any device)

def scaling_aware_transpose_ref(q: torch.Tensor, s: torch.Tensor,
                                offs: torch.Tensor | None = None, align: int = 1,
                                src_row: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The transpose computed by dequantizing in float64 (exact for E4M3 values times
    power-of-two scales), dividing by the new scale and letting torch round to E4M3. The
    aligned layout is the plain one of the rows zero-padded per group (zero bytes, scale 1).
    src_row: the rows gathered first (permute_pad_fp8's reference)."""
    if src_row is not None:
        q, s = permute_pad_fp8_ref(q, s, src_row)
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
def _source_rows(src_ptr, rows, lmask, GATHER: tl.constexpr):
    """The rows of q to read for the input rows `rows` (masked by lmask): themselves, or with
    GATHER src_row[rows], a row < 0 (a pad row of the gather) masked off, so it reads as zero
    bytes, which the new scale ignores and the rescale keeps zero."""
    if GATHER:
        src = tl.load(src_ptr + rows, mask=lmask, other=-1)
        return src, lmask & (src >= 0)
    return rows, lmask


@triton.jit
def _transpose_bytes(q_ptr, s_ptr, qt_ptr, src_ptr, start, end, ostart, oend, live, M, PM, K, KB,
                     kb, TILE_: tl.constexpr, GATHER: tl.constexpr):
    # Byte stores: any tile. The layout change goes through shared memory as bytes.
    rows = start + tl.arange(0, TILE_)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    src, lmask = _source_rows(src_ptr, rows, (rows < end) & (rows < M) & live, GATHER)
    byte, s_ex, live_ex = _load_block(q_ptr, s_ptr, src, cols, lmask, K, KB, kb)
    sc_ex = _new_scale(tl.max(live_ex, axis=0))
    k = tl.maximum(sc_ex - s_ex, 0)  # negative only for all-zero rows, whose bytes stay zero
    out = tl.trans(rescale_e4m3(byte, k[:, None]).to(tl.uint8))
    ocols = ostart + tl.arange(0, TILE_)
    omask = (ocols < oend) & (ocols < PM)
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * PM + ocols[None, :], out, mask=omask[None, :])
    return sc_ex


@triton.jit
def _f16_pow2_neg(k):
    """fp16 bits of 2**-k for int32 k >= 0 (subnormal from k = 15, 0 from k = 25), both
    halves of an int32 (an f16x2 operand)."""
    h = tl.where(k <= 14, (15 - k) << 10, tl.where(k <= 24, 1 << tl.minimum(24 - k, 9), 0))
    return h | (h << 16)


@triton.jit
def rescale_words(x, k):
    """Four E4M3FN bytes per int32 word, each multiplied by 2**-k (int32 k >= 0, one per word):
    the bytes shift_e4m3 gives, NaN bytes kept as they are.

    Compiled: two bytes at a time through f16x2 (`cvt.rn.f16x2.e4m3x2`, `mul.rn.f16x2`,
    `cvt.rn.satfinite.e4m3x2.f16x2`). Exact: an E4M3 value has 4 significant bits, so its
    product with 2**-k is an fp16 number unless it is below 2**-20, where fp16 rounds it but
    E4M3 flushes it to a zero of the same sign either way (E4M3's smallest step is 2**-9, the
    last rounding boundary 2**-10). NaN bytes are put back from the input with a byte mask.
    Interpreted: shift_e4m3 per byte."""
    if HW_CAST:
        f = _f16_pow2_neg(k)
        y = tl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi, o0, o1;
            .reg .b32 h0, h1;
            mov.b32 {lo, hi}, $1;
            cvt.rn.f16x2.e4m3x2 h0, lo;
            cvt.rn.f16x2.e4m3x2 h1, hi;
            mul.rn.f16x2 h0, h0, $2;
            mul.rn.f16x2 h1, h1, $2;
            cvt.rn.satfinite.e4m3x2.f16x2 o0, h0;
            cvt.rn.satfinite.e4m3x2.f16x2 o1, h1;
            mov.b32 $0, {o0, o1};
            }""",
            "=r,r,r", [x, f + tl.zeros_like(x)], dtype=tl.int32, is_pure=True, pack=1)
        # 0x80 in every byte whose low 7 bits are 0x7F (no carry crosses a byte), then 0xFF
        nan = ((((x & 0x7F7F7F7F) + 0x01010101) >> 7) & 0x01010101) * 255
        return (y & ~nan) | (x & nan)
    else:
        out = shift_e4m3(x & 0xFF, k)
        out |= shift_e4m3((x >> 8) & 0xFF, k) << 8
        out |= shift_e4m3((x >> 16) & 0xFF, k) << 16
        out |= shift_e4m3((x >> 24) & 0xFF, k) << 24
        return out


@triton.jit
def _byte(x, J: tl.constexpr):
    return (x >> (8 * J)) & 0xFF


@triton.jit
def transpose_bytes_4x4(y0, y1, y2, y3):
    """Words o_j holding byte j of y0, y1, y2, y3 (in that order, y0 lowest): the 4 x 4 byte
    matrix of four words transposed. Compiled: eight byte permutes."""
    if HW_CAST:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t0, t1, t2, t3;
            prmt.b32 t0, $4, $5, 0x5140;
            prmt.b32 t1, $4, $5, 0x7362;
            prmt.b32 t2, $6, $7, 0x5140;
            prmt.b32 t3, $6, $7, 0x7362;
            prmt.b32 $0, t0, t2, 0x5410;
            prmt.b32 $1, t0, t2, 0x7632;
            prmt.b32 $2, t1, t3, 0x5410;
            prmt.b32 $3, t1, t3, 0x7632;
            }""",
            "=r,=r,=r,=r,r,r,r,r", [y0, y1, y2, y3], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    else:
        o0 = _byte(y0, 0) | (_byte(y1, 0) << 8) | (_byte(y2, 0) << 16) | (_byte(y3, 0) << 24)
        o1 = _byte(y0, 1) | (_byte(y1, 1) << 8) | (_byte(y2, 1) << 16) | (_byte(y3, 1) << 24)
        o2 = _byte(y0, 2) | (_byte(y1, 2) << 8) | (_byte(y2, 2) << 16) | (_byte(y3, 2) << 24)
        o3 = _byte(y0, 3) | (_byte(y1, 3) << 8) | (_byte(y2, 3) << 16) | (_byte(y3, 3) << 24)
        return o0, o1, o2, o3


@triton.jit
def _load_words(q32_ptr, s_ptr, rows, w, lmask, K4, KB, kb):
    """Words [rows, 32] of one 128-column block, the rows' scale exponents, and per word the
    row's exponent where the word holds a byte other than +-0 (else 0): the new scale's
    exponent is the max of the last over the tile, one reduction for the whole tile."""
    x = tl.load(q32_ptr + rows[:, None].to(tl.int64) * K4 + (kb * 32 + w)[None, :],
                mask=lmask[:, None], other=0)
    s = tl.load(s_ptr + rows.to(tl.int64) * KB + kb, mask=lmask, other=1.0)
    s_ex = (s.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return x, s_ex, tl.where((x & 0x7F7F7F7F) != 0, s_ex[:, None], 0)


@triton.jit
def _transpose_words(q32_ptr, s_ptr, qt32_ptr, src_ptr, start, end, ostart, oend, live, PM, K, KB,
                     kb, TILE_: tl.constexpr, GATHER: tl.constexpr):
    # Word loads and stores: output tiles that start and end on multiples of 4 (PM too). The
    # input is read as words (4 columns of a row) for rows 4g + i, i = 0..3, all four sets in
    # the same layout; each word is rescaled whole (its 4 bytes share the row's shift); the
    # 4 x 4 byte blocks of rows 4g..4g+3 x words are transposed in registers, which gives the
    # output words of rows (columns of q) 4w + j holding rows 4g..4g+3 of q; the last step
    # moves whole words between threads.
    g = tl.arange(0, TILE_ // 4)
    w = tl.arange(0, TILE_ // 4)
    K4 = K // 4
    r0 = start + 4 * g
    s0, m0 = _source_rows(src_ptr, r0, (r0 < end) & live, GATHER)
    s1, m1 = _source_rows(src_ptr, r0 + 1, (r0 + 1 < end) & live, GATHER)
    s2, m2 = _source_rows(src_ptr, r0 + 2, (r0 + 2 < end) & live, GATHER)
    s3, m3 = _source_rows(src_ptr, r0 + 3, (r0 + 3 < end) & live, GATHER)
    x0, e0, l0 = _load_words(q32_ptr, s_ptr, s0, w, m0, K4, KB, kb)
    x1, e1, l1 = _load_words(q32_ptr, s_ptr, s1, w, m1, K4, KB, kb)
    x2, e2, l2 = _load_words(q32_ptr, s_ptr, s2, w, m2, K4, KB, kb)
    x3, e3, l3 = _load_words(q32_ptr, s_ptr, s3, w, m3, K4, KB, kb)
    sc_ex = _new_scale(tl.max(tl.maximum(tl.maximum(l0, l1), tl.maximum(l2, l3))))
    y0 = rescale_words(x0, tl.maximum(sc_ex - e0, 0)[:, None])
    y1 = rescale_words(x1, tl.maximum(sc_ex - e1, 0)[:, None])
    y2 = rescale_words(x2, tl.maximum(sc_ex - e2, 0)[:, None])
    y3 = rescale_words(x3, tl.maximum(sc_ex - e3, 0)[:, None])
    o0, o1, o2, o3 = transpose_bytes_4x4(y0, y1, y2, y3)  # o_j[g, w]: column 4w + j
    wq = ostart // 4 + g
    omask = (wq < oend // 4)[None, :]
    base = qt32_ptr + (kb * TILE_ + 4 * w)[:, None].to(tl.int64) * (PM // 4) + wq[None, :]
    tl.store(base, tl.trans(o0), mask=omask)
    tl.store(base + PM // 4, tl.trans(o1), mask=omask)
    tl.store(base + 2 * (PM // 4), tl.trans(o2), mask=omask)
    tl.store(base + 3 * (PM // 4), tl.trans(o3), mask=omask)
    return sc_ex


@triton.jit
def _transpose_kernel(q_ptr, q32_ptr, s_ptr, qt_ptr, qt32_ptr, st_ptr, table_ptr, src_ptr, M, PM,
                      K, KB, T, TILE_: tl.constexpr, GROUPED: tl.constexpr, WORDS: tl.constexpr,
                      GATHER: tl.constexpr, GROUP_T):
    # One program per (tile slot t, column block kb): reads q[start:end, block] and s[rows, kb],
    # writes qT[block, ostart:oend] and sT[block, t]. The output range is the input range
    # or its place in the aligned layout (kernels.groups), padding included: grouped, read
    # from tile_table. The rows past offs[-1] come as slots of their own that read nothing:
    # zero bytes, scale 1. WORDS (PM a multiple of 4): tiles on 4-column boundaries store int32
    # words, else bytes. (On the H100 two column blocks per program measured slower, 0.48
    # against 0.46 ms; so did a words-only kernel for the aligned layout, 0.46 against 0.42
    # ms: ptxas gave it 32 registers, four programs of 16 warps per SM instead of three.)
    t, kb = raster(tl.program_id(0), T, KB, GROUP_T)
    start, end, ostart, oend, live = slot_ranges(table_ptr, t, M, TILE_, GROUPED)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    if WORDS:
        if (ostart % 4 == 0) & (oend % 4 == 0):
            sc_ex = _transpose_words(q32_ptr, s_ptr, qt32_ptr, src_ptr, start, end, ostart,
                                     oend, live, PM, K, KB, kb, TILE_, GATHER)
        else:
            sc_ex = _transpose_bytes(q_ptr, s_ptr, qt_ptr, src_ptr, start, end, ostart, oend,
                                     live, M, PM, K, KB, kb, TILE_, GATHER)
    else:
        sc_ex = _transpose_bytes(q_ptr, s_ptr, qt_ptr, src_ptr, start, end, ostart, oend, live,
                                 M, PM, K, KB, kb, TILE_, GATHER)
    sc = (sc_ex << 23).to(tl.float32, bitcast=True)
    tl.store(st_ptr + cols.to(tl.int64) * T + t, sc + tl.zeros([TILE_], tl.float32))


# ---------------------------------------------------------------- launcher

def scaling_aware_transpose_triton(q: torch.Tensor, s: torch.Tensor,
                                   offs: torch.Tensor | None = None, align: int = 1,
                                   src_row: torch.Tensor | None = None,
                                   num_warps: int | None = None, words: bool = True,
                                   group_t: int = 1 << 30) -> tuple[torch.Tensor, torch.Tensor]:
    K = q.shape[1]
    M = q.shape[0] if src_row is None else src_row.shape[0]
    KB = K // TILE
    G = None if offs is None else offs.numel()
    PM = M if offs is None else aligned_width(M, G, align)
    T = max_tiles(PM, G)
    qT = torch.empty(K, PM, dtype=FP8, device=q.device)
    # Every (slot, block) program writes its 128 scale entries, empty slots included.
    sT = torch.empty(K, T, dtype=torch.float32, device=q.device)
    grouped = offs is not None
    # int32 views: of [K, 0] bytes one fails; q's rows are whole words (K % 128 == 0)
    words = words and PM % 4 == 0 and PM > 0 and q.data_ptr() % 4 == 0 and q.shape[0] > 0
    # H100, DeepSeek-V3 [66016, 7168] in the aligned layout: 16 warps 0.42 ms with the tile
    # table (0.51 ms searching the groups in every program), 8 warps 0.49, 4 warps 0.51.
    # group_t (the launch order in bands, quantize.raster): the plain order was fastest
    # (bands of 8 or 32 slots 0.51 / 0.49 ms). Through src_row 8 warps are fastest instead:
    # DeepSeek-V3 (q [8192, 7168], 66016 rows gathered) 0.302 ms against 0.354 with 16 warps
    # and 0.326 with 4; Mixtral (q [8192, 4096], 16504 rows) 0.0566 against 0.0595 / 0.0606.
    num_warps = num_warps or (16 if src_row is None else 8)
    if T and KB and (q.shape[0] or src_row is None):
        qt8 = qT.view(torch.uint8)
        q8 = q.view(torch.uint8)
        table = tile_table(offs, M, PM, T, align) if grouped else sT
        _transpose_kernel[(T * KB,)](
            q8, q8.view(torch.int32) if words else q8, s, qt8,
            qt8.view(torch.int32) if words else qt8, sT, table,
            sT if src_row is None else src_row, M, PM, K, KB, T, TILE_=TILE,
            GROUPED=grouped, WORDS=words, GATHER=src_row is not None, GROUP_T=min(group_t, T),
            num_warps=num_warps)
    elif T and KB:  # gathering from no rows: every row is a pad row
        qT.zero_()
        sT.fill_(1.0)
    return qT, sT


# ---------------------------------------------------------------- checks and custom op

def _check(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None, align: int,
           src_row: torch.Tensor | None = None) -> None:
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
    if src_row is not None:  # the gather's own index checks (values only where no sync)
        check_index(src_row, _OP, "src_row", 1, M, q.device)


@torch.library.custom_op("fp8flow::scaling_aware_transpose", mutates_args=())
def scaling_aware_transpose(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None = None,
                            align: int = 1, src_row: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 1x128 FP8 (q [M, K], s [M, K/128]) -> column-wise 1x128 FP8 (qT [K, W],
    sT [K, T]) as quantize_1x128_col lays it out, tiles along M restarting at groups of `offs`.
    W = M, or with align > 1 the aligned group layout of kernels.groups (read it with
    `pad_offsets(offs, align)` as its group ends). src_row (int32 [M'], values in [-1, M)):
    transpose the rows gathered by it instead (`permute_pad_fp8(q, s, src_row)`, -1 a zero
    row), without making them; M' then takes M's place above."""
    _check(q, s, offs, align, src_row)
    fn = scaling_aware_transpose_triton if use_triton(q) else scaling_aware_transpose_ref
    return fn(q, s, offs, align, src_row)


@scaling_aware_transpose.register_fake
def _(q, s, offs=None, align=1, src_row=None):
    M, K = q.shape
    if src_row is not None:
        M = src_row.shape[0]
    G = None if offs is None else offs.shape[0]
    W = M if offs is None else aligned_width(M, G, align)
    return q.new_empty(K, W, dtype=FP8), q.new_empty(K, max_tiles(W, G), dtype=torch.float32)
