"""Quantize and dequantize: 1x128 tiles (activations, gradients) and 128x128 blocks (weights).

Forms
-----
- row-wise 1x128: x [R, C] -> q [R, C] E4M3, s [R, T] fp32, tiles along the last dim. With `offs`
  (groups along the last dim) the tiles restart at each group start and T = max_tiles(C, G).
- column-wise 1x128: x [M, K] -> the row-wise form of x^T, written by one kernel that reads x and
  stores transposed: qT [K, M], sT [K, T], tiles along M restarting at each group of `offs`.
  This is the wgrad operand of the naive recipe; the flow gets it from scaling_aware_transpose.
- 128x128 blocks: w [N, K] or [E, N, K] -> q, s [.., cdiv(N,128), cdiv(K,128)].

Partial tiles are allowed here (a GEMM checks its own contraction dim). Scale rule and NaN rule:
see fp8flow_compile.recipe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import E4M3_MAX, TILE
from . import fp8_math as fm
from .common import FP8, HIGH, use_triton
from .groups import (
    aligned_width,
    cdiv,
    group_block,
    group_slot,
    group_slot_aligned,
    max_tiles,
    pad_groups,
    pad_offsets,
    tile_bounds,
)

# ---------------------------------------------------------------- torch reference (any device)

def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(amax / 448)) exactly, 1 where amax == 0, clamped to [2**-126, 2**126]."""
    bits = amax.float().contiguous().view(torch.int32)
    ef = (bits >> 23) & 0xFF
    e = ef - 135 + ((bits & 0x7FFFFF) > 0x600000).int()
    e = torch.where(amax == 0, 0, e).clamp(-126, 126)
    return ((e + 127) << 23).view(torch.float32)


def _quantize_last_ref(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xf [..., n] fp32 -> one scale over the last dim."""
    finite = torch.isfinite(xf)
    amax = torch.where(finite, xf.abs(), 0.0).amax(-1)
    s = pow2_scale(amax)
    q = (torch.where(finite, xf, 0.0) / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX)
    q = torch.where(finite, q, float("nan")).to(FP8)
    return q, s


def quantize_1x128_ref(x: torch.Tensor, offs: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    R, C = x.shape
    starts, ends = tile_bounds(offs, C, device=x.device)
    q = torch.zeros(R, C, dtype=FP8, device=x.device)
    s = torch.ones(R, starts.numel(), dtype=torch.float32, device=x.device)
    xf = x.float()
    for t, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        if b > a:
            q[:, a:b], s[:, t] = _quantize_last_ref(xf[:, a:b])
    return q, s


def quantize_1x128_col_ref(x: torch.Tensor, offs: torch.Tensor | None = None, align: int = 1
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    if offs is not None and align > 1:
        return quantize_1x128_ref(pad_groups(x, offs, align).t(),
                                  pad_offsets(offs, align))
    return quantize_1x128_ref(x.t(), offs)


def dequantize_1x128_ref(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    R, C = q.shape
    starts, ends = tile_bounds(offs, C, device=q.device)
    out = torch.zeros(R, C, dtype=torch.float32, device=q.device)
    qf = q.float()
    for t, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        if b > a:
            out[:, a:b] = qf[:, a:b] * s[:, t:t + 1]
    return out.to(out_dtype)


def quantize_128x128_ref(w: torch.Tensor, below: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    if below is not None:
        w = torch.cat([w, below], -2)
    *lead, N, K = w.shape
    nb, kb = cdiv(N, TILE), cdiv(K, TILE)
    wf = torch.nn.functional.pad(w.float(), (0, kb * TILE - K, 0, nb * TILE - N))
    tiles = wf.reshape(*lead, nb, TILE, kb, TILE).transpose(-3, -2)
    q, s = _quantize_last_ref(tiles.reshape(*lead, nb, kb, TILE * TILE))
    q = q.reshape(*lead, nb, kb, TILE, TILE).transpose(-3, -2).reshape(*lead, nb * TILE, kb * TILE)
    return q[..., :N, :K].contiguous(), s


def dequantize_128x128_ref(q: torch.Tensor, s: torch.Tensor,
                           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    N, K = q.shape[-2:]
    se = s.repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[..., :N, :K]
    return (q.float() * se).to(out_dtype)


# ---------------------------------------------------------------- Triton kernels

@triton.jit
def tile_range(offs_ptr, G, t, C, TILE_: tl.constexpr, GROUPED: tl.constexpr,
               G_BLOCK: tl.constexpr):
    """Rows [start, end) of tile slot t along an axis of C rows, and whether they hold data.

    Grouped: tiles restart at each group start (groups.group_slot, from offs on the device); the
    rows past offs[-1] follow as tiles of their own that hold no data (callers write zero bytes
    and scale 1 there, so no output byte is left unwritten). Else the plain t-th tile."""
    if GROUPED:
        g, start, end = group_slot(offs_ptr, G, C, t, TILE_, G_BLOCK, True)
        live = g < G
    else:
        start = t * TILE_
        end = tl.minimum(start + TILE_, C)
        live = start < end
    return start, end, live


@triton.jit
def tile_ranges(offs_ptr, G, t, M, PM, TILE_: tl.constexpr, GROUPED: tl.constexpr,
                G_BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """tile_range for the column-wise producers: (input rows [start, end), output slots
    [ostart, oend) of the axis of PM, live). The output range is the input range, or with
    ALIGN > 1 its place in the aligned group layout (groups.group_slot_aligned)."""
    if GROUPED:
        g, start, end, ostart, oend = group_slot_aligned(offs_ptr, G, M, PM, t, TILE_, G_BLOCK,
                                                         ALIGN)
        live = g < G
    else:
        start = t * TILE_
        end = tl.minimum(start + TILE_, M)
        live = start < end
        ostart = start
        oend = end
    return start, end, ostart, oend, live


@triton.jit
def _tile_table_kernel(offs_ptr, table_ptr, G, M, PM, TILE_: tl.constexpr,
                       G_BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    t = tl.program_id(0)
    start, end, ostart, oend, live = tile_ranges(offs_ptr, G, t, M, PM, TILE_, True, G_BLOCK,
                                                 ALIGN)
    i = tl.arange(0, 4)
    row = tl.where(i == 0, tl.where(live, start, 0),
                   tl.where(i == 1, tl.where(live, end, 0), tl.where(i == 2, ostart, oend)))
    tl.store(table_ptr + 4 * t + i, row)


def tile_table(offs: torch.Tensor, M: int, PM: int, T: int, align: int) -> torch.Tensor:
    """int32 [T, 4]: per tile slot of the grouped column-wise layout, (first, end) input row and
    (first, end) output slot, as tile_ranges gives them, with an empty input range where the
    slot holds no data. Made once per call by a small kernel, so that the producers' programs
    (thousands per tile slot) read four numbers instead of each searching the group table:
    on the H100 that search, ahead of every program's loads, cost quantize_1x128_col at
    DeepSeek-V3 shapes a quarter of its time (0.70 ms grouped against 0.53 ms without groups)."""
    table = torch.empty(T, 4, dtype=torch.int32, device=offs.device)
    if T:
        _tile_table_kernel[(T,)](offs, table, offs.numel(), M, PM, TILE_=TILE,
                                 G_BLOCK=group_block(offs.numel()), ALIGN=align, num_warps=1)
    return table


@triton.jit
def slot_ranges(table_ptr, t, M, TILE_: tl.constexpr, GROUPED: tl.constexpr):
    """tile_ranges of slot t read from tile_table (GROUPED), or the plain t-th tile of M rows:
    (input rows [start, end), output slots [ostart, oend), whether the slot holds data)."""
    if GROUPED:
        start = tl.load(table_ptr + 4 * t)
        end = tl.load(table_ptr + 4 * t + 1)
        ostart = tl.load(table_ptr + 4 * t + 2)
        oend = tl.load(table_ptr + 4 * t + 3)
    else:
        start = t * TILE_
        end = tl.minimum(start + TILE_, M)
        ostart = start
        oend = end
    return start, end, ostart, oend, start < end


@triton.jit
def raster(pid, NT, NK, GROUP_T):
    """(t, k) of program `pid` of a 1-D grid over NT x NK tiles, visited in bands of GROUP_T
    t-tiles: within a band t runs fastest, then k. The column-wise producers read along t and
    write along k (or the other way round), so a band keeps both the reads and the writes of the
    programs running at one time inside a compact region of each tensor. GROUP_T >= NT is the
    plain order (t fastest over all of NT)."""
    per_band = GROUP_T * NK
    band = pid // per_band
    first = band * GROUP_T
    size = tl.minimum(NT - first, GROUP_T)
    r = pid - band * per_band
    return first + r % size, r // size


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, offs_ptr, G, R, C, T,
                          BLOCK_R: tl.constexpr, TILE_: tl.constexpr, GROUPED: tl.constexpr,
                          G_BLOCK: tl.constexpr):
    pid_r = tl.program_id(0)
    t = tl.program_id(1)
    start, end, live = tile_range(offs_ptr, G, t, C, TILE_, GROUPED, G_BLOCK)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = start + tl.arange(0, TILE_)
    rmask = rows < R
    mask = rmask[:, None] & (cols < end)[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask & live, other=0.0).to(tl.float32)
    fm.store_quantized_rows(x, q_ptr + offs, s_ptr + rows.to(tl.int64) * T + t, mask, rmask)


@triton.jit
def _quantize_cols_bytes(x_ptr, qt_ptr, st_ptr, start, end, ostart, oend, live, PM, K, T, t,
                         pid_k, BLOCK_K: tl.constexpr, TILE_: tl.constexpr):
    rows = start + tl.arange(0, TILE_)
    ocols = ostart + tl.arange(0, TILE_)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = cols < K
    mask = (rows < end)[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask & live,
                other=0.0)
    byte, scale = fm.quantize_tile(x.to(tl.float32), 0)
    # Store through a transposed tile so that the contiguous dim of the store (rows of x, i.e.
    # the columns of qT) is the tile's fast dim: coalesced writes instead of strided bytes.
    omask = (ocols < oend)[:, None] & kmask[None, :]
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * PM + ocols[None, :],
             tl.trans(byte.to(tl.uint8)), mask=tl.trans(omask))
    tl.store(st_ptr + cols.to(tl.int64) * T + t, scale, mask=kmask)


@triton.jit
def _load_rows(x_ptr, rows, cols, mask, K):
    """x[rows, cols] in its own dtype, which of them are finite, and |x| with the non-finite
    ones as 0 (the amax's operand; a max of |x| is exact in any float type)."""
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
    a = tl.abs(x)
    finite = a < float("inf")  # False for NaN and +-Inf
    return x, finite, tl.where(finite, a, 0.0)


@triton.jit
def _quantize_cols_words(x_ptr, qt32_ptr, st_ptr, start, end, ostart, oend, live, PM, K, T, t,
                         pid_k, BLOCK_K: tl.constexpr, TILE_: tl.constexpr):
    # Output tiles on 4-column boundaries: rows 4g + i (i = 0..3) of the tile are loaded as four
    # row sets in one layout, so the bytes of rows 4g..4g+3 of a column pack into one int32
    # word without moving data between threads; the transpose then moves whole words. The
    # numbers are quantize_tile's over the 128 rows (one scale per column); the four bytes of a
    # word come from two paired conversions (fm.encode_e4m3x4).
    g = tl.arange(0, TILE_ // 4)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = cols < K
    r0 = start + 4 * g
    x0, f0, a0 = _load_rows(x_ptr, r0, cols, ((r0 < end) & live)[:, None] & kmask[None, :], K)
    x1, f1, a1 = _load_rows(x_ptr, r0 + 1, cols,
                            ((r0 + 1 < end) & live)[:, None] & kmask[None, :], K)
    x2, f2, a2 = _load_rows(x_ptr, r0 + 2, cols,
                            ((r0 + 2 < end) & live)[:, None] & kmask[None, :], K)
    x3, f3, a3 = _load_rows(x_ptr, r0 + 3, cols,
                            ((r0 + 3 < end) & live)[:, None] & kmask[None, :], K)
    amax = tl.max(tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3)), axis=0).to(tl.float32)
    e = fm.scale_exponent(amax)
    inv = fm.exp2i(-e)[None, :]
    word = fm.encode_e4m3x4(x0.to(tl.float32) * inv, x1.to(tl.float32) * inv,
                            x2.to(tl.float32) * inv, x3.to(tl.float32) * inv, f0, f1, f2, f3)
    wq = ostart // 4 + g
    tl.store(qt32_ptr + cols[:, None].to(tl.int64) * (PM // 4) + wq[None, :], tl.trans(word),
             mask=kmask[:, None] & (wq < oend // 4)[None, :])
    tl.store(st_ptr + cols.to(tl.int64) * T + t, fm.exp2i(e), mask=kmask)


@triton.jit
def _quantize_cols_kernel(x_ptr, qt_ptr, qt32_ptr, st_ptr, table_ptr, M, PM, K, T,
                          BLOCK_K: tl.constexpr, TILE_: tl.constexpr, GROUPED: tl.constexpr,
                          WORDS: tl.constexpr, ALL_WORDS: tl.constexpr, GROUP_T):
    # x [M, K] row-major; tile t reads rows [start, end) and writes columns [ostart, oend) of
    # qT [K, PM] (grouped: from tile_table; the same range unless the layout is aligned, see
    # kernels.groups, whose padding gets zero bytes) and sT [K, T]. WORDS (PM a multiple of
    # 4): tiles on 4-column boundaries store int32 words, the others bytes. ALL_WORDS: every tile
    # is on 4-column boundaries (no groups, or groups aligned to a multiple of 4), so the
    # kernel has no bytes path, whose registers would count against every program.
    t, pid_k = raster(tl.program_id(0), T, tl.cdiv(K, BLOCK_K), GROUP_T)
    start, end, ostart, oend, live = slot_ranges(table_ptr, t, M, TILE_, GROUPED)
    if ALL_WORDS:
        _quantize_cols_words(x_ptr, qt32_ptr, st_ptr, start, end, ostart, oend, live, PM, K, T,
                             t, pid_k, BLOCK_K, TILE_)
    elif WORDS:
        if (ostart % 4 == 0) & (oend % 4 == 0):
            _quantize_cols_words(x_ptr, qt32_ptr, st_ptr, start, end, ostart, oend, live, PM, K,
                                 T, t, pid_k, BLOCK_K, TILE_)
        else:
            _quantize_cols_bytes(x_ptr, qt_ptr, st_ptr, start, end, ostart, oend, live, PM, K,
                                 T, t, pid_k, BLOCK_K, TILE_)
    else:
        _quantize_cols_bytes(x_ptr, qt_ptr, st_ptr, start, end, ostart, oend, live, PM, K, T,
                             t, pid_k, BLOCK_K, TILE_)


@triton.jit
def _dequantize_rows_kernel(q_ptr, s_ptr, out_ptr, offs_ptr, G, R, C, T,
                            BLOCK_R: tl.constexpr, TILE_: tl.constexpr, GROUPED: tl.constexpr,
                            G_BLOCK: tl.constexpr):
    pid_r = tl.program_id(0)
    t = tl.program_id(1)
    start, end, live = tile_range(offs_ptr, G, t, C, TILE_, GROUPED, G_BLOCK)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = start + tl.arange(0, TILE_)
    rmask = rows < R
    mask = rmask[:, None] & (cols < end)[None, :] & live
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    v = fm.e4m3_to_f32(tl.load(q_ptr + offs, mask=mask, other=0))
    s = tl.load(s_ptr + rows.to(tl.int64) * T + t, mask=rmask, other=1.0)
    tl.store(out_ptr + offs, (v * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_blocks_kernel(w_ptr, below_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, N1, K, NB, KB,
                            TILE_: tl.constexpr, DUAL: tl.constexpr, BELOW: tl.constexpr):
    e = tl.program_id(0)
    nb = tl.program_id(1)
    kb = tl.program_id(2)
    rows = nb * TILE_ + tl.arange(0, TILE_)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    base = e.to(tl.int64) * N * K
    offs = base + rows[:, None].to(tl.int64) * K + cols[None, :]
    if BELOW:
        # The output's rows [0, N1) come from w [.., N1, K], the rest from `below`; N1 is a
        # multiple of the tile, so a block reads one source.
        if nb * TILE_ < N1:
            src = e.to(tl.int64) * N1 * K + rows[:, None].to(tl.int64) * K + cols[None, :]
            x = tl.load(w_ptr + src, mask=mask, other=0.0).to(tl.float32)
        else:
            src = (e.to(tl.int64) * (N - N1) * K + (rows - N1)[:, None].to(tl.int64) * K
                   + cols[None, :])
            x = tl.load(below_ptr + src, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")
    amax = tl.max(tl.max(tl.where(finite, tl.abs(x), 0.0), axis=1), axis=0)
    ex = fm.scale_exponent(amax)
    byte = fm.encode_e4m3(tl.where(finite, x, 0.0) * fm.exp2i(-ex), finite).to(tl.uint8)
    tl.store(q_ptr + offs, byte, mask=mask)
    tl.store(s_ptr + (e * NB + nb) * KB + kb, fm.exp2i(ex))
    if DUAL:
        # The same bytes, transposed: W^T [K, N] for the dgrad GEMM, whose tensor-core operand
        # must have the contracted dim contiguous.
        offs_t = base + cols[:, None].to(tl.int64) * N + rows[None, :]
        tl.store(qt_ptr + offs_t, tl.trans(byte), mask=tl.trans(mask))
        tl.store(st_ptr + (e * KB + kb) * NB + nb, fm.exp2i(ex))


@triton.jit
def _dequantize_blocks_kernel(q_ptr, s_ptr, out_ptr, N, K, NB, KB, TILE_: tl.constexpr):
    e = tl.program_id(0)
    nb = tl.program_id(1)
    kb = tl.program_id(2)
    rows = nb * TILE_ + tl.arange(0, TILE_)
    cols = kb * TILE_ + tl.arange(0, TILE_)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = e.to(tl.int64) * N * K + rows[:, None].to(tl.int64) * K + cols[None, :]
    v = fm.e4m3_to_f32(tl.load(q_ptr + offs, mask=mask, other=0))
    s = tl.load(s_ptr + (e * NB + nb) * KB + kb)
    tl.store(out_ptr + offs, (v * s).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers

_BLOCK_R = 32


def _groups(offs, device):
    """(offs or a dummy, number of groups, grouped, G_BLOCK) for the launchers."""
    if offs is None:
        return torch.empty(1, dtype=torch.int32, device=device), 0, False, 1
    return offs, offs.numel(), True, group_block(offs.numel())


#: H100, [8192, 7168] bf16: 0.073 ms with 16 rows x 4 warps (81% of copy bandwidth), 0.075 ms
#: with 32 x 4; 8 rows x 8 warps 0.094.
_QUANT_ROWS = 16


def quantize_1x128_triton(x, offs=None, block_r: int = _QUANT_ROWS, num_warps: int = 4):
    R, C = x.shape
    T = max_tiles(C, None if offs is None else offs.numel())
    q = torch.empty(R, C, dtype=FP8, device=x.device)
    s = torch.ones(R, T, dtype=torch.float32, device=x.device)
    og, G, grouped, gb = _groups(offs, x.device)
    if R and T:
        _quantize_rows_kernel[(cdiv(R, block_r), T)](
            x, q.view(torch.uint8), s, og, G, R, C, T,
            BLOCK_R=block_r, TILE_=TILE, GROUPED=grouped, G_BLOCK=gb, num_warps=num_warps)
    return q, s


def quantize_1x128_col_triton(x, offs=None, align: int = 1, block_k: int = 64,
                              num_warps: int = 4, group_t: int = 1 << 30, words: bool = True,
                              maxnreg: int | None = 128):
    M, K = x.shape
    G = None if offs is None else offs.numel()
    PM = M if offs is None else aligned_width(M, G, align)
    T = max_tiles(PM, G)
    qt = torch.empty(K, PM, dtype=FP8, device=x.device)
    st = torch.ones(K, T, dtype=torch.float32, device=x.device)
    if K and T:
        # H100, [66016, 7168] bf16 in the aligned layout (the naive baseline's wgrad operand):
        # 0.57 ms with the tile table, the words-only kernel and at most 128 registers (84% of
        # copy bandwidth); without the register cap 0.62 ms (ptxas took 162 registers, three
        # programs per SM); 32 columns per program or 8 warps slower (0.70 / 0.64 ms). The
        # plain layout's two-path kernel spills 104 bytes under the cap and still runs 0.57 ms
        # (0.75 ms uncapped).
        grouped = offs is not None
        table = tile_table(offs, M, PM, T, align) if grouped else st
        words = words and PM % 4 == 0 and PM > 0  # an int32 view of [K, 0] bytes fails
        all_words = words and (not grouped or align % 4 == 0)
        qt8 = qt.view(torch.uint8)
        _quantize_cols_kernel[(T * cdiv(K, block_k),)](
            x, qt8, qt8.view(torch.int32) if words else qt8, st, table, M, PM, K, T,
            BLOCK_K=block_k, TILE_=TILE, GROUPED=grouped, WORDS=words, ALL_WORDS=all_words,
            GROUP_T=min(group_t, T), num_warps=num_warps,
            **({} if maxnreg is None else {"maxnreg": maxnreg}))
    return qt, st


def dequantize_1x128_triton(q, s, offs=None, out_dtype=torch.float32):
    R, C = q.shape
    T = s.shape[1]
    out = torch.zeros(R, C, dtype=out_dtype, device=q.device)
    og, G, grouped, gb = _groups(offs, q.device)
    if R and T:
        _dequantize_rows_kernel[(cdiv(R, _BLOCK_R), T)](
            q.view(torch.uint8), s, out, og, G, R, C, T,
            BLOCK_R=_BLOCK_R, TILE_=TILE, GROUPED=grouped, G_BLOCK=gb)
    return out


def quantize_128x128_triton(w, dual: bool = False, num_warps: int | None = None, below=None):
    """below: a weight whose rows follow w's (the result is that of cat([w, below], -2))."""
    N1 = w.shape[-2]
    *lead, _, K = w.shape
    N = N1 + (0 if below is None else below.shape[-2])
    w2 = w if below is None else below
    E = math.prod(lead)
    NB, KB = cdiv(N, TILE), cdiv(K, TILE)
    q = torch.empty(*lead, N, K, dtype=FP8, device=w.device)
    s = torch.empty(*lead, NB, KB, dtype=torch.float32, device=w.device)
    if num_warps is None:
        # A 128x128 tile per program spills at 4 warps: on the H100 (triton 3.6) the dual form
        # ran at 82 GB/s with 4 warps and 1167 GB/s with 16; the single form peaks at 8.
        num_warps = 16 if dual else 8
    qt = w.new_empty(*lead, K, N, dtype=FP8) if dual else q
    st = w.new_empty(*lead, KB, NB, dtype=torch.float32) if dual else s
    if E and NB and KB:
        _quantize_blocks_kernel[(E, NB, KB)](w, w2, q.view(torch.uint8), s,
                                             qt.view(torch.uint8), st, N, N1, K, NB, KB,
                                             TILE_=TILE, DUAL=dual, BELOW=below is not None,
                                             num_warps=num_warps)
    return (q, s, qt, st) if dual else (q, s)


def quantize_128x128_dual_triton(w, below=None):
    return quantize_128x128_triton(w, dual=True, below=below)


def quantize_128x128_dual_ref(w, below=None):
    q, s = quantize_128x128_ref(w, below)
    # clone, not contiguous(): with a size-1 dim the transpose is already contiguous and
    # contiguous() would return an alias, which a custom op must not.
    fmt = torch.contiguous_format
    return (q, s, q.transpose(-2, -1).clone(memory_format=fmt),
            s.transpose(-2, -1).clone(memory_format=fmt))


def dequantize_128x128_triton(q, s, out_dtype=torch.float32):
    *lead, N, K = q.shape
    E = q.numel() // max(N * K, 1)
    NB, KB = cdiv(N, TILE), cdiv(K, TILE)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if E and NB and KB:
        _dequantize_blocks_kernel[(E, NB, KB)](q.view(torch.uint8), s, out, N, K, NB, KB,
                                               TILE_=TILE)
    return out


# ---------------------------------------------------------------- checks

def _check_high(x, op):
    require(x.dim() == 2, op, f"input must be 2-D, got shape {tuple(x.shape)}")
    require_dtype(x, HIGH, op, "input")
    require(x.is_contiguous(), op, f"input must be contiguous, got strides {tuple(x.stride())}")


def _check_offs(offs, length, op):
    if offs is None:
        return
    require(offs.dim() == 1 and offs.numel() >= 1, op, "offs must be a non-empty 1-D tensor")
    require_dtype(offs, (torch.int32,), op, "offs")
    del length  # group ends beyond the axis are a data error the kernels cannot see cheaply


def check_align(align: int, offs, op: str) -> None:
    """align: 1 (plain layout) or a power of two for the aligned group layout (kernels.groups),
    which needs groups."""
    require(isinstance(align, int) and align >= 1 and align & (align - 1) == 0, op,
            f"align must be a power of two >= 1, got {align}")
    require(align == 1 or offs is not None, op, f"align = {align} needs offs (groups to align)")
    require(align <= TILE, op, f"align = {align} must not exceed the {TILE}-row tile")


def _check_weight(w, op):
    require(w.dim() in (2, 3), op, f"weight must be 2-D or 3-D, got shape {tuple(w.shape)}")
    require_dtype(w, HIGH, op, "weight")
    require(w.is_contiguous(), op, f"weight must be contiguous, got strides {tuple(w.stride())}")


def _check_below(w, below, op):
    if below is None:
        return
    _check_weight(below, op)
    require(below.dtype == w.dtype and below.device == w.device, op,
            f"below must have w's dtype and device, got {below.dtype} on {below.device} and "
            f"{w.dtype} on {w.device}")
    require(below.dim() == w.dim() and below.shape[:-2] == w.shape[:-2]
            and below.shape[-1] == w.shape[-1], op,
            f"below must match w but in dim -2, got {tuple(below.shape)} and {tuple(w.shape)}")
    require(w.shape[-2] % TILE == 0, op,
            f"w's dim -2 ({w.shape[-2]}) must be a multiple of {TILE} when below is given, so "
            "that no block spans both weights")


def _check_fp8(q, s, op, scale_shape):
    require_dtype(q, (FP8,), op, "data")
    require_dtype(s, (torch.float32,), op, "scales")
    require(q.is_contiguous() and s.is_contiguous(), op, "data and scales must be contiguous")
    require(tuple(s.shape) == tuple(scale_shape), op,
            f"scales must have shape {tuple(scale_shape)}, got {tuple(s.shape)}")


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fp8flow::quantize_1x128", mutates_args=())
def quantize_1x128(x: torch.Tensor, offs: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 1x128 quantization along the last dim (tiles restart at groups of `offs`)."""
    _check_high(x, "quantize_1x128")
    _check_offs(offs, x.shape[1], "quantize_1x128")
    return (quantize_1x128_triton if use_triton(x) else quantize_1x128_ref)(x, offs)


@quantize_1x128.register_fake
def _(x, offs=None):
    T = max_tiles(x.shape[1], None if offs is None else offs.shape[0])
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], T, dtype=torch.float32)


@torch.library.custom_op("fp8flow::quantize_1x128_col", mutates_args=())
def quantize_1x128_col(x: torch.Tensor, offs: torch.Tensor | None = None, align: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-wise 1x128 quantization of x [M, K]: returns (qT [K, W], sT [K, T]), tiles along M
    restarting at each group of `offs`. W = M, or with align > 1 the aligned group layout of
    kernels.groups (read it with `pad_offsets(offs, align)` as its group ends)."""
    _check_high(x, "quantize_1x128_col")
    _check_offs(offs, x.shape[0], "quantize_1x128_col")
    check_align(align, offs, "quantize_1x128_col")
    return (quantize_1x128_col_triton if use_triton(x) else quantize_1x128_col_ref)(x, offs,
                                                                                     align)


@quantize_1x128_col.register_fake
def _(x, offs=None, align=1):
    M, K = x.shape
    G = None if offs is None else offs.shape[0]
    W = M if offs is None else aligned_width(M, G, align)
    return x.new_empty(K, W, dtype=FP8), x.new_empty(K, max_tiles(W, G), dtype=torch.float32)


@torch.library.custom_op("fp8flow::dequantize_1x128", mutates_args=())
def dequantize_1x128(q: torch.Tensor, s: torch.Tensor, offs: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_1x128 (and, on (qT, sT), of quantize_1x128_col, giving x^T)."""
    require(q.dim() == 2, "dequantize_1x128", f"data must be 2-D, got {tuple(q.shape)}")
    T = max_tiles(q.shape[1], None if offs is None else offs.numel())
    _check_fp8(q, s, "dequantize_1x128", (q.shape[0], T))
    _check_offs(offs, q.shape[1], "dequantize_1x128")
    fn = dequantize_1x128_triton if use_triton(q) else dequantize_1x128_ref
    return fn(q, s, offs, out_dtype)


@dequantize_1x128.register_fake
def _(q, s, offs=None, out_dtype=torch.float32):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("fp8flow::quantize_128x128", mutates_args=())
def quantize_128x128(w: torch.Tensor, below: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 block quantization of a weight [N, K] or per-expert weights [E, N, K].

    below: a second weight [.., N2, K] whose rows follow w's; the result is that of
    cat([w, below], -2), read from the two tensors (w's N a multiple of 128, so that no block
    spans both)."""
    _check_weight(w, "quantize_128x128")
    _check_below(w, below, "quantize_128x128")
    if use_triton(w):
        return quantize_128x128_triton(w, below=below)
    return quantize_128x128_ref(w, below)


def _stacked_shape(w, below):
    *lead, N, K = w.shape
    return lead, N + (0 if below is None else below.shape[-2]), K


@quantize_128x128.register_fake
def _(w, below=None):
    lead, N, K = _stacked_shape(w, below)
    return (w.new_empty(*lead, N, K, dtype=FP8),
            w.new_empty(*lead, cdiv(N, TILE), cdiv(K, TILE), dtype=torch.float32))


@torch.library.custom_op("fp8flow::dequantize_128x128", mutates_args=())
def dequantize_128x128(q: torch.Tensor, s: torch.Tensor,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    op = "dequantize_128x128"
    require(q.dim() in (2, 3), op, f"data must be 2-D or 3-D, got shape {tuple(q.shape)}")
    *lead, N, K = q.shape
    _check_fp8(q, s, op, (*lead, cdiv(N, TILE), cdiv(K, TILE)))
    fn = dequantize_128x128_triton if use_triton(q) else dequantize_128x128_ref
    return fn(q, s, out_dtype)


@dequantize_128x128.register_fake
def _(q, s, out_dtype=torch.float32):
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.custom_op("fp8flow::quantize_128x128_dual", mutates_args=())
def quantize_128x128_dual(w: torch.Tensor, below: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """128x128 block quantization in both orientations from one read of the weight:
    (q [.., N, K], s [.., N/128, K/128], qT [.., K, N], sT [.., K/128, N/128]); qT holds the same
    bytes as q, transposed, for GEMMs that contract N (dgrad).

    below: as for quantize_128x128, a second weight whose rows follow w's (N = N1 + N2): the
    forms of cat([w, below], -2) without that concatenation (gate and up projections kept as
    two weights, quantized for one GEMM over both)."""
    _check_weight(w, "quantize_128x128_dual")
    _check_below(w, below, "quantize_128x128_dual")
    if use_triton(w):
        return quantize_128x128_dual_triton(w, below)
    return quantize_128x128_dual_ref(w, below)


@quantize_128x128_dual.register_fake
def _(w, below=None):
    lead, N, K = _stacked_shape(w, below)
    nb, kb = cdiv(N, TILE), cdiv(K, TILE)
    return (w.new_empty(*lead, N, K, dtype=FP8), w.new_empty(*lead, nb, kb, dtype=torch.float32),
            w.new_empty(*lead, K, N, dtype=FP8), w.new_empty(*lead, kb, nb, dtype=torch.float32))
