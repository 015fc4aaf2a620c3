"""FP8 GEMMs for the three training uses, dense and grouped (MoE experts).

Every GEMM contracts E4M3 operands in steps of one scale tile and promotes each step to fp32:

    acc += (dot(a_step, b_step) * sa[:, None]) * sb        (BLOCK_K = 128 = the scale tile)

The fp8 x fp8 products are exact in fp32 and the scales are powers of two, so the only rounding is
the fp32 accumulation and the final cast. Applying sa before sb keeps the intermediate at the
magnitude of a dequantized row times an E4M3 value, so tiny-times-tiny scales cannot underflow
before the product does.

Operand forms (produced by kernels/quantize.py)
-----------------------------------------------
- activation / gradient, row-wise 1x128 along the contracted dim: q [M, K] E4M3, s [M, K/128].
- weight, 128x128 blocks: q [N, K] (or [E, N, K]), s [.., cdiv(N,128), cdiv(K,128)].
- wgrad operands, column-wise 1x128 (tokens contiguous): qT [R, P], sT [R, T], token tiles
  restarting at each group start, T = max_tiles(P, E); slot -> rows as in groups.tile_bounds.
  Either operand may give its scales in 128x128 blocks instead, sT [cdiv(R, 128), T]: one scale
  per 128 rows of a token tile (row r reads block r // 128). The scaling-aware transpose's scales
  are of that kind (constant over each 128-row block), and passes/block_scales.py hands them to
  the wgrad in this form: cuBLAS then runs the wgrad with the scaling pair of the fprop
  (1x128 x 128x128), at that pair's rate rather than the 1x128 x 1x128 pair's (kernels/cublas.py).
  The result is the same: the form only says which scales are equal.

Ops
---
- gemm_fp8(a_q, a_s, b_q, b_s, trans_b, out_dtype) -> [M, N]
    trans_b=True : b is [N, K], out = a @ b^T  (fprop: y = x @ W^T with W [N, K])
    trans_b=False: b is [K, N], out = a @ b    (dgrad: dx = dy @ W, W [N, K] contracted over its
                   first dim). The same 128x128 blocks serve both directions: the kernel reads B
                   through strides, W^T is never materialised.
- grouped_gemm_fp8(a_q [P, K], a_s, b_q [E, ..], b_s, offs, trans_b, out_dtype) -> [P, N]
    rows of group g (offs as in torch._grouped_mm) use expert g's weight; rows past offs[-1]
    belong to no group and get zeros.
- gemm_fp8_wgrad(a_q [N, P], a_s [N, T], b_q [K, P], b_s [K, T], out_dtype) -> [N, K]
    (a_s or b_s may be in the block form above)
- grouped_gemm_fp8_wgrad(.., offs, out_dtype) -> [E, N, K]: dW_g = dY_g^T X_g over the tokens of
    group g, one K step per token tile of the group (the last one partial, masked). Empty groups
    give zeros.

The contracted dim of fprop/dgrad must be a multiple of 128 (a partial 1x128 tile would pair
with a partial 128x128 block row, which no producer makes); every other dim is free.

Two kernel paths (constexpr COMPILED)
-------------------------------------
- CUDA: fp8 tiles go straight into tl.dot (wgmma on Hopper) in a software-pipelined `for` loop.
  Hopper's fp8 wgmma takes B K-major only, so the dgrad orientation (B = W [N, K] contracted over
  N) has its B tiles transposed on chip; if that shows in a benchmark, calling with trans_b=True
  on the transposed FP8 weight (q and s `.t().contiguous()`) gives bit-identical results.
- Interpreter (CPU tests): E4M3 decoded to fp32 (the interpreter's fp8 dot maps the NaN byte to
  480) and a `while` loop (its `range` rejects runtime bounds under NumPy 2.4, which refuses
  int() of a 1-element array). The fp32 -> bf16 output cast is rounded explicitly on both paths
  (round_bf16), since the interpreter's cast truncates.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import TILE
from . import cublas
from . import fp8_math as fm
from .common import FP8, expand_block_scales, use_triton
from .groups import cdiv, group_block, group_slot, group_span, max_tiles
from .quantize import dequantize_1x128_ref, dequantize_128x128_ref

OUT_DTYPES = (torch.bfloat16, torch.float32)
# E4M3 elements in one 16-byte vector load: the token alignment the wgrad fast path needs.
_VEC = 16


# ---------------------------------------------------------------- launch configuration

@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options. One config per launch (the interpreter cannot autotune).

    fprop/dgrad: (block_m, block_n) tile the output [M, N], block_k steps the contracted dim and
    must divide the scale tile; block_n must divide or be a multiple of it.
    wgrad: (block_m, block_n) tile the output [N, K], block_k steps the token axis (divides the
    scale tile). group_m: output tiles along M that share a band in the launch order (L2 reuse).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = TILE
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    unroll: int = 1  # K steps per loop iteration (1 or 2), see _gemm_step

    def check(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}={v}: must be a power of two >= 16 (tl.dot)")
        if TILE % self.block_k:
            raise ValueError(f"GemmConfig.block_k={self.block_k} must divide the scale tile {TILE}")
        if self.unroll not in (1, 2):
            raise ValueError(f"GemmConfig.unroll={self.unroll} must be 1 or 2")
        if self.group_m < 1:
            raise ValueError(f"GemmConfig.group_m={self.group_m} must be >= 1")


DEFAULT_CONFIG = GemmConfig()


# ---------------------------------------------------------------- torch reference (any device)

def _dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return dequantize_1x128_ref(q, s, None, torch.float32)


def _weight(b_q: torch.Tensor, b_s: torch.Tensor, trans_b: bool) -> torch.Tensor:
    """Dequantized B as [contracted, out] (a view for trans_b)."""
    w = dequantize_128x128_ref(b_q, b_s, torch.float32)
    return w.transpose(-2, -1) if trans_b else w


def gemm_fp8_ref(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                 trans_b: bool = True, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (_dequant_rows(a_q, a_s) @ _weight(b_q, b_s, trans_b)).to(out_dtype)


def grouped_gemm_fp8_ref(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                         b_s: torch.Tensor, offs: torch.Tensor, trans_b: bool = True,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    a = _dequant_rows(a_q, a_s)
    w = _weight(b_q, b_s, trans_b)
    out = torch.zeros(a.shape[0], w.shape[-1], dtype=out_dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = (a[start:end] @ w[g]).to(out_dtype)
        start = max(start, end)
    return out


def gemm_fp8_wgrad_ref(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                       b_s: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    a_s, b_s = expand_block_scales(a_s, a_q.shape[0]), expand_block_scales(b_s, b_q.shape[0])
    a = dequantize_1x128_ref(a_q, a_s, None, torch.float32)
    b = dequantize_1x128_ref(b_q, b_s, None, torch.float32)
    return (a @ b.t()).to(out_dtype)


def grouped_gemm_fp8_wgrad_ref(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                               b_s: torch.Tensor, offs: torch.Tensor,
                               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    a_s, b_s = expand_block_scales(a_s, a_q.shape[0]), expand_block_scales(b_s, b_q.shape[0])
    a = dequantize_1x128_ref(a_q, a_s, offs, torch.float32)
    b = dequantize_1x128_ref(b_q, b_s, offs, torch.float32)
    out = torch.zeros(offs.numel(), a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[g] = (a[:, start:end] @ b[:, start:end].t()).to(out_dtype)
        start = max(start, end)
    return out


# ---------------------------------------------------------------- Triton kernels

@triton.jit
def tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Launch index -> (m tile, n tile), GROUP_M m tiles per band so that consecutive programs
    share A rows and B columns in L2. A persistent kernel calls it once per tile it walks."""
    per_band = GROUP_M * num_pid_n
    band = pid // per_band
    first_m = band * GROUP_M
    band_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_band) % band_m
    pid_n = (pid % per_band) // band_m
    return pid_m, pid_n


@triton.jit
def round_bf16(x):
    """Round fp32 to the nearest-even bf16 value, returned in fp32 so the cast after it is exact.

    The interpreter's fp32 -> bf16 cast truncates; rounding here makes both paths agree.
    """
    bits = x.to(tl.int32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, x)  # the carry could turn a NaN payload into Inf or 0


@triton.jit
def _load_fp8(ptrs, mask, COMPILED: tl.constexpr):
    """E4M3 operand for tl.dot: fp8 for the tensor cores, or fp32 decoded exactly.

    The interpreter's fp8 dot goes through fp16 and turns the E4M3 NaN byte into 480, breaking the
    NaN rule; decoding to fp32 keeps NaN and is exact (fp8 products fit in fp32). The compiled
    path loads fp8 straight into the dot: a bitcast in between stops Triton's software pipelining.
    """
    if mask is None:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    if not COMPILED:
        v = fm.e4m3_to_f32(v.to(tl.uint8, bitcast=True))
    return v


@triton.jit
def _step_dot(a, b, COMPILED: tl.constexpr):
    if COMPILED:
        d = tl.dot(a, b)
    else:
        d = tl.dot(a, b, input_precision="ieee")
    return d


@triton.jit
def _store_out(c_ptrs, acc, mask, OUT_BF16: tl.constexpr):
    if OUT_BF16:
        tl.store(c_ptrs, round_bf16(acc).to(tl.bfloat16), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def _scale_b(d, sb, BLOCK_N: tl.constexpr, TILE_: tl.constexpr):
    if BLOCK_N <= TILE_:
        return d * sb
    return d * sb[None, :]


@triton.jit
def _gemm_step(acc, k0, a_ptrs, b_ptrs, as_ptrs, bs_cols, stride_bk, stride_bsk,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_: tl.constexpr,
               COMPILED: tl.constexpr, UNROLL: tl.constexpr):
    # UNROLL = 2 takes two K steps per iteration: both MMAs are issued before either result is
    # rescaled, so the tensor cores run them back to back instead of idling during each
    # promotion (the launcher uses it only when K is a multiple of 2 * BLOCK_K).
    a = _load_fp8(a_ptrs + k0, None, COMPILED)
    b = _load_fp8(b_ptrs + k0 * stride_bk, None, COMPILED)
    kt = k0 // TILE_
    sa = tl.load(as_ptrs + kt)
    sb = tl.load(bs_cols + kt * stride_bsk)
    if UNROLL == 2:
        a2 = _load_fp8(a_ptrs + (k0 + BLOCK_K), None, COMPILED)
        b2 = _load_fp8(b_ptrs + (k0 + BLOCK_K) * stride_bk, None, COMPILED)
        kt2 = (k0 + BLOCK_K) // TILE_
        sa2 = tl.load(as_ptrs + kt2)
        sb2 = tl.load(bs_cols + kt2 * stride_bsk)
        d = _step_dot(a, b, COMPILED)
        d2 = _step_dot(a2, b2, COMPILED)
        acc += _scale_b(d * sa[:, None], sb, BLOCK_N, TILE_)
        acc += _scale_b(d2 * sa2[:, None], sb2, BLOCK_N, TILE_)
    else:
        acc += _scale_b(_step_dot(a, b, COMPILED) * sa[:, None], sb, BLOCK_N, TILE_)
    return acc


@triton.jit
def _wgrad_load(p0, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr, rows_ld, cols_ld, P, T, t,
                BLOCK_K: tl.constexpr, COMPILED: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_K)
    # Both operands masked: a token of the next group may hold NaN, and 0 * NaN is NaN.
    pm = p < tok_end
    a = _load_fp8(a_ptr + rows_ld[:, None] * P + p[None, :], pm[None, :], COMPILED)
    b = _load_fp8(b_ptr + cols_ld[None, :] * P + p[:, None], pm[:, None], COMPILED)
    # A step wholly past the group (the second half of an unrolled step) reads scale 0.
    live = p0 < tok_end
    sa = tl.load(as_ptr + rows_ld * T + t, mask=live, other=0.0)
    sb = tl.load(bs_ptr + cols_ld * T + t, mask=live, other=0.0)
    return a, b, sa, sb


@triton.jit
def _wgrad_step(acc, p0, tok_start, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr, rows_ld, cols_ld,
                P, T, slot0, BLOCK_K: tl.constexpr, TILE_: tl.constexpr,
                COMPILED: tl.constexpr, UNROLL: tl.constexpr):
    t = slot0 + (p0 - tok_start) // TILE_
    a, b, sa, sb = _wgrad_load(p0, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr, rows_ld, cols_ld,
                               P, T, t, BLOCK_K, COMPILED)
    if UNROLL == 2:
        a2, b2, sa2, sb2 = _wgrad_load(p0 + BLOCK_K, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr,
                                       rows_ld, cols_ld, P, T,
                                       slot0 + (p0 + BLOCK_K - tok_start) // TILE_, BLOCK_K,
                                       COMPILED)
        d = _step_dot(a, b, COMPILED)
        d2 = _step_dot(a2, b2, COMPILED)
        acc += (d * sa[:, None]) * sb[None, :]
        acc += (d2 * sa2[:, None]) * sb2[None, :]
    else:
        acc += (_step_dot(a, b, COMPILED) * sa[:, None]) * sb[None, :]
    return acc


@triton.jit
def _gemm_fp8_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr,
        M, N, K, NUM_E, NUM_SLOTS,
        stride_be, stride_bk, stride_bn, stride_bse, stride_bsk, stride_bsn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, TILE_: tl.constexpr, GROUPED: tl.constexpr,
        COMPILED: tl.constexpr, OUT_BF16: tl.constexpr, G_BLOCK: tl.constexpr,
        UNROLL: tl.constexpr):
    # A [M, K] row-major E4M3 with scales [M, K/TILE_]. B element (e, k, n) at
    # e*stride_be + k*stride_bk + n*stride_bn, its block scale at the same with the stride_bs*
    # strides on (k // TILE_, n // TILE_): strides alone pick the orientation (fprop or dgrad).
    pid = tl.program_id(0)
    slot, pid_n = tile_coords(pid, NUM_SLOTS, tl.cdiv(N, BLOCK_N), GROUP_M)
    if GROUPED:
        # Row tiles restart at each group start; the rows past offs[-1] (g == NUM_E) and
        # unused slots run no K step: they store zeros or nothing.
        g, row_start, row_end = group_slot(offs_ptr, NUM_E, M, slot, BLOCK_M, G_BLOCK, True)
        k_end = tl.where(g < NUM_E, K, 0)
        g = tl.minimum(g, NUM_E - 1).to(tl.int64)
        b_ptr += g * stride_be
        bs_ptr += g * stride_bse
    else:
        row_start = slot * BLOCK_M
        row_end = tl.minimum(row_start + BLOCK_M, M)
        k_end = K

    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamped indices keep every load in bounds without masks; the rows and columns they
    # duplicate are never stored, and rows of a neighbouring group only feed unstored rows.
    rows_ld = tl.minimum(rows, M - 1).to(tl.int64)
    cols_ld = tl.minimum(cols, N - 1).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    KT = K // TILE_

    a_ptrs = a_ptr + rows_ld[:, None] * K + ks[None, :]
    b_ptrs = b_ptr + ks[:, None].to(tl.int64) * stride_bk + cols_ld[None, :] * stride_bn
    as_ptrs = as_ptr + rows_ld * KT
    if BLOCK_N <= TILE_:
        bs_cols = bs_ptr + (pid_n * BLOCK_N // TILE_) * stride_bsn
    else:
        bs_cols = bs_ptr + (cols_ld // TILE_) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPILED:
        for k0 in range(0, k_end, BLOCK_K * UNROLL):
            acc = _gemm_step(acc, k0, a_ptrs, b_ptrs, as_ptrs, bs_cols, stride_bk, stride_bsk,
                             BLOCK_N, BLOCK_K, TILE_, COMPILED, UNROLL)
    else:
        k0 = 0
        while k0 < k_end:
            acc = _gemm_step(acc, k0, a_ptrs, b_ptrs, as_ptrs, bs_cols, stride_bk, stride_bsk,
                             BLOCK_N, BLOCK_K, TILE_, COMPILED, UNROLL)
            k0 += BLOCK_K * UNROLL

    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = (rows < row_end)[:, None] & (cols < N)[None, :]
    _store_out(c_ptrs, acc, mask, OUT_BF16)


@triton.jit
def _wgrad_fp8_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, offs_ptr, G, N, K, P, T,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, TILE_: tl.constexpr, COMPILED: tl.constexpr,
        OUT_BF16: tl.constexpr, ALIGN: tl.constexpr, GROUPED: tl.constexpr,
        G_BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    # out[g] [N, K] = A[:, group g] @ B[:, group g]^T with A [N, P], B [K, P] (tokens contiguous:
    # both operands K-major, as fp8 wgmma wants). Scales per (row, token tile slot).
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(N, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    if GROUPED:
        tok_start, tok_end, slot0 = group_span(offs_ptr, G, P, g, TILE_, G_BLOCK)
    else:
        tok_start = 0
        tok_end = P
        slot0 = 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ld = tl.minimum(rows, N - 1).to(tl.int64)
    cols_ld = tl.minimum(cols, K - 1).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPILED:
        # Token loads vectorise (and so pipeline) only when the compiler can see ALIGN-token
        # alignment of the group bounds; padded groups (permute_pad_fp8) take the first loop.
        # Both loops get their own stage buffers: 2 x 3 stages x 32 KiB at the default tiles,
        # within Hopper's 227 KiB, but num_stages=4 would not fit.
        if (tok_start % ALIGN == 0) & (tok_end % ALIGN == 0):
            # The hints go on fresh values: tl.multiple_of marks the op that defines its
            # argument, so hinting tok_start itself would leak the claim into the unaligned
            # branch below (seen on the H100 as a misaligned-address fault).
            start = tl.multiple_of((tok_start // ALIGN) * ALIGN, ALIGN)
            end = tl.multiple_of((tok_end // ALIGN) * ALIGN, ALIGN)
            for p0 in range(start, end, BLOCK_K * UNROLL):
                acc = _wgrad_step(acc, p0, start, end, a_ptr, as_ptr, b_ptr, bs_ptr,
                                  rows_ld, cols_ld, P, T, slot0, BLOCK_K, TILE_, COMPILED, UNROLL)
        else:
            for p0 in range(tok_start, tok_end, BLOCK_K * UNROLL):
                acc = _wgrad_step(acc, p0, tok_start, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr,
                                  rows_ld, cols_ld, P, T, slot0, BLOCK_K, TILE_, COMPILED, UNROLL)
    else:
        p0 = tok_start
        while p0 < tok_end:
            acc = _wgrad_step(acc, p0, tok_start, tok_end, a_ptr, as_ptr, b_ptr, bs_ptr,
                              rows_ld, cols_ld, P, T, slot0, BLOCK_K, TILE_, COMPILED, UNROLL)
            p0 += BLOCK_K * UNROLL

    c_ptrs = c_ptr + g.to(tl.int64) * N * K + rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    _store_out(c_ptrs, acc, mask, OUT_BF16)


# ---------------------------------------------------------------- launchers

def _b_strides(b_q: torch.Tensor, b_s: torch.Tensor, trans_b: bool
               ) -> tuple[int, int, int, int, int, int, int]:
    """(N, stride_be, stride_bk, stride_bn, stride_bse, stride_bsk, stride_bsn) of contiguous
    B [.., d0, d1] and its block scales, for the contracted dim k and the output dim n."""
    d0, d1 = b_q.shape[-2:]
    s0, s1 = b_s.shape[-2:]
    se = d0 * d1 if b_q.dim() == 3 else 0
    sse = s0 * s1 if b_s.dim() == 3 else 0
    if trans_b:  # b [N, K]
        return d0, se, 1, d1, sse, 1, s1
    return d1, se, d1, 1, sse, s1, 1  # b [K, N]


def _launch_gemm(a_q, a_s, b_q, b_s, trans_b, out_dtype, offs, config):
    config.check()
    if config.block_n % TILE and TILE % config.block_n:
        raise ValueError(f"GemmConfig.block_n={config.block_n} must divide or be a multiple "
                         f"of the scale tile {TILE}")
    M, K = a_q.shape
    N, *strides = _b_strides(b_q, b_s, trans_b)
    grouped = offs is not None
    out = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if K == 0:
        return out.zero_()
    if grouped:
        num_e = offs.numel()
        num_slots = max_tiles(M, num_e, config.block_m)
        og, g_block = offs, group_block(num_e)
    else:
        og = torch.empty(1, dtype=torch.int32, device=a_q.device)
        num_e, num_slots, g_block = 1, cdiv(M, config.block_m), 1
    if M == 0 or N == 0 or num_slots == 0:
        return out
    grid = (num_slots * cdiv(N, config.block_n),)
    _gemm_fp8_kernel[grid](
        a_q, a_s, b_q, b_s, out, og,
        M, N, K, num_e, num_slots, *strides,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, TILE_=TILE, GROUPED=grouped, COMPILED=a_q.is_cuda,
        OUT_BF16=out_dtype == torch.bfloat16, G_BLOCK=g_block,
        UNROLL=config.unroll if K % (config.block_k * config.unroll) == 0 else 1,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def gemm_fp8_triton(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                    trans_b: bool = True, out_dtype: torch.dtype = torch.bfloat16,
                    config: GemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    return _launch_gemm(a_q, a_s, b_q, b_s, trans_b, out_dtype, None, config)


def grouped_gemm_fp8_triton(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                            b_s: torch.Tensor, offs: torch.Tensor, trans_b: bool = True,
                            out_dtype: torch.dtype = torch.bfloat16,
                            config: GemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    return _launch_gemm(a_q, a_s, b_q, b_s, trans_b, out_dtype, offs, config)


def _launch_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, config):
    config.check()
    N, P = a_q.shape
    K = b_q.shape[0]
    # Block-form scales read per row: a copy of R x T scales, small beside the GEMM (the
    # cuBLAS path takes the block form as it is).
    a_s, b_s = expand_block_scales(a_s, N), expand_block_scales(b_s, K)
    E = 1 if offs is None else offs.numel()
    out = torch.empty(E, N, K, dtype=out_dtype, device=a_q.device)
    if N == 0 or K == 0 or E == 0:
        return out
    og = offs if offs is not None else torch.empty(1, dtype=torch.int32, device=a_q.device)
    grid = (cdiv(N, config.block_m) * cdiv(K, config.block_n), E)
    _wgrad_fp8_kernel[grid](
        a_q, a_s, b_q, b_s, out, og, E,
        N, K, P, a_s.shape[1],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, TILE_=TILE, COMPILED=a_q.is_cuda,
        OUT_BF16=out_dtype == torch.bfloat16, ALIGN=_VEC, GROUPED=offs is not None,
        G_BLOCK=group_block(E), UNROLL=config.unroll,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def gemm_fp8_wgrad_triton(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                          b_s: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                          config: GemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    return _launch_wgrad(a_q, a_s, b_q, b_s, None, out_dtype, config)[0]


def grouped_gemm_fp8_wgrad_triton(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                                  b_s: torch.Tensor, offs: torch.Tensor,
                                  out_dtype: torch.dtype = torch.float32,
                                  config: GemmConfig = DEFAULT_CONFIG) -> torch.Tensor:
    return _launch_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, config)


# ---------------------------------------------------------------- checks

def _check_fp8_2d(q, s, op, name, scale_shape):
    require(q.dim() == 2, op, f"{name} must be 2-D, got shape {tuple(q.shape)}")
    require_dtype(q, (FP8,), op, name)
    require_dtype(s, (torch.float32,), op, f"{name} scales")
    require(q.is_contiguous() and s.is_contiguous(), op,
            f"{name} and its scales must be contiguous (row-major)")
    require(tuple(s.shape) == tuple(scale_shape), op,
            f"{name} scales must have shape {tuple(scale_shape)}, got {tuple(s.shape)}")


def _check_out_dtype(out_dtype, op):
    require(out_dtype in OUT_DTYPES, op, f"out_dtype must be bfloat16 or float32, got {out_dtype}")


def _check_offs(offs, num_groups, op):
    require(offs.dim() == 1 and offs.numel() == num_groups, op,
            f"offs must be 1-D with one end per group ({num_groups}), got shape "
            f"{tuple(offs.shape)}")
    require_dtype(offs, (torch.int32,), op, "offs")


def _check_same_device(op, *ts):
    require(len({t.device for t in ts}) == 1, op,
            f"all tensors must be on one device, got {[str(t.device) for t in ts]}")


def _check_fwd(a_q, a_s, b_q, b_s, trans_b, out_dtype, op, grouped):
    require(a_q.dim() == 2, op, f"a must be 2-D, got shape {tuple(a_q.shape)}")
    M, K = a_q.shape
    require(K % TILE == 0, op,
            f"contracted dim K = {K} must be a multiple of {TILE} (1x{TILE} scale tiles)")
    _check_fp8_2d(a_q, a_s, op, "a", (M, K // TILE))
    want = 3 if grouped else 2
    require(b_q.dim() == want, op,
            f"b must be {want}-D{' [E, ..]' if grouped else ''}, got shape {tuple(b_q.shape)}")
    require_dtype(b_q, (FP8,), op, "b")
    require_dtype(b_s, (torch.float32,), op, "b scales")
    require(b_q.is_contiguous() and b_s.is_contiguous(), op,
            "b and its scales must be contiguous (row-major)")
    *lead, d0, d1 = b_q.shape
    kb = d1 if trans_b else d0
    layout = "[N, K] (trans_b=True)" if trans_b else "[K, N] (trans_b=False)"
    require(kb == K, op, f"b {layout} has contracted dim {kb}, a has K = {K}")
    want_s = (*lead, cdiv(d0, TILE), cdiv(d1, TILE))
    require(tuple(b_s.shape) == want_s, op,
            f"b scales must have shape {want_s} ({TILE}x{TILE} blocks), got {tuple(b_s.shape)}")
    _check_out_dtype(out_dtype, op)


def _check_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, op):
    require(a_q.dim() == 2 and b_q.dim() == 2, op,
            f"a [N, P] and b [K, P] must be 2-D, got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    P = a_q.shape[1]
    require(b_q.shape[1] == P, op,
            f"a [N, P] and b [K, P] must share the token dim, got {a_q.shape[1]} and "
            f"{b_q.shape[1]}")
    T = max_tiles(P, None if offs is None else offs.numel())
    for name, q, s in (("a", a_q, a_s), ("b", b_q, b_s)):
        rows, blocks = q.shape[0], cdiv(q.shape[0], TILE)
        require(tuple(s.shape) in ((rows, T), (blocks, T)), op,
                f"{name} scales must have shape {(rows, T)} (one row per row of {name}) or "
                f"{(blocks, T)} ({TILE}x{TILE} blocks), got {tuple(s.shape)}")
        _check_fp8_2d(q, s, op, name, s.shape)
    _check_out_dtype(out_dtype, op)


# ---------------------------------------------------------------- custom ops

@torch.library.custom_op("fp8flow::gemm_fp8", mutates_args=())
def gemm_fp8(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
             trans_b: bool = True, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] (1x128) times b (128x128): trans_b=True b is [N, K] -> a @ b^T (fprop);
    trans_b=False b is [K, N] -> a @ b (dgrad with the forward weight as stored)."""
    op = "gemm_fp8"
    _check_fwd(a_q, a_s, b_q, b_s, trans_b, out_dtype, op, grouped=False)
    _check_same_device(op, a_q, a_s, b_q, b_s)
    if not use_triton(a_q):
        return gemm_fp8_ref(a_q, a_s, b_q, b_s, trans_b, out_dtype)
    if trans_b and cublas.choose(a_q, "fwd", out_dtype, tuple(b_q.shape)):
        return cublas.gemm_fwd(a_q, a_s, b_q, b_s, out_dtype)
    return gemm_fp8_triton(a_q, a_s, b_q, b_s, trans_b, out_dtype)


@gemm_fp8.register_fake
def _(a_q, a_s, b_q, b_s, trans_b=True, out_dtype=torch.bfloat16):
    n = b_q.shape[0] if trans_b else b_q.shape[1]
    return a_q.new_empty(a_q.shape[0], n, dtype=out_dtype)


def grouped_fwd_sizes(M: int, b_shape, trans_b: bool, num_groups: int):
    """(dims, mean multiply-adds per group, mean 128x128 output tiles per group) of a grouped
    fprop/dgrad, as `cublas.choose` weighs them."""
    N, K = (b_shape[1], b_shape[2]) if trans_b else (b_shape[2], b_shape[1])
    rows = M / max(num_groups, 1)
    return (N, K), rows * N * K, rows * N / TILE**2


def grouped_wgrad_sizes(N: int, P: int, K: int, num_groups: int):
    """(dims, mean multiply-adds per group) of a grouped wgrad dW [E, N, K] over P tokens."""
    return (N, K), P / max(num_groups, 1) * N * K


def _check_offs_host(offs_host, offs, op):
    if offs_host is None:
        return
    require(offs_host.device.type == "cpu" and offs_host.shape == offs.shape, op,
            f"offs_host must be a CPU copy of offs (shape {tuple(offs.shape)}), got "
            f"{offs_host.device} tensor of shape {tuple(offs_host.shape)}")


@torch.library.custom_op("fp8flow::offsets_to_host", mutates_args=())
def offsets_to_host(offs: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the group ends `offs`. The compiled graph makes it once, where offs is made,
    and passes it to every grouped GEMM that loops over groups on the host, forward and backward
    (the backward reads the copy the forward saved). On CUDA the copy is started without
    waiting (see cublas.host_copy): the host goes on issuing work and waits only where a
    grouped GEMM first reads the copy, by which time the GPU is usually past it."""
    return cublas.host_copy(offs)


@offsets_to_host.register_fake
def _(offs):
    return torch.empty(offs.shape, dtype=offs.dtype, device="cpu")


@torch.library.custom_op("fp8flow::grouped_gemm_fp8", mutates_args=())
def grouped_gemm_fp8(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                     offs: torch.Tensor, trans_b: bool = True,
                     out_dtype: torch.dtype = torch.bfloat16,
                     offs_host: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of group g (offs: cumulative group ends, int32 [E]) times expert g's weight b[g];
    b [E, N, K] (trans_b=True, fprop) or [E, K, N] (trans_b=False, dgrad). Rows past offs[-1]
    get zeros. offs_host: optional CPU copy of offs (`offsets_to_host`), read instead of offs
    where the group ends are needed on the host; it must hold the same values."""
    op = "grouped_gemm_fp8"
    _check_fwd(a_q, a_s, b_q, b_s, trans_b, out_dtype, op, grouped=True)
    _check_offs(offs, b_q.shape[0], op)
    _check_offs_host(offs_host, offs, op)
    _check_same_device(op, a_q, a_s, b_q, b_s, offs)
    if not use_triton(a_q):
        return grouped_gemm_fp8_ref(a_q, a_s, b_q, b_s, offs, trans_b, out_dtype)
    dims, work, tiles = grouped_fwd_sizes(a_q.shape[0], b_q.shape, True, offs.numel())
    if trans_b and cublas.choose(a_q, "fwd", out_dtype, dims, work, tiles):
        return cublas.grouped_fwd(a_q, a_s, b_q, b_s, offs, out_dtype, offs_host=offs_host)
    return grouped_gemm_fp8_triton(a_q, a_s, b_q, b_s, offs, trans_b, out_dtype)


@grouped_gemm_fp8.register_fake
def _(a_q, a_s, b_q, b_s, offs, trans_b=True, out_dtype=torch.bfloat16, offs_host=None):
    n = b_q.shape[1] if trans_b else b_q.shape[2]
    return a_q.new_empty(a_q.shape[0], n, dtype=out_dtype)


@torch.library.custom_op("fp8flow::gemm_fp8_wgrad", mutates_args=())
def gemm_fp8_wgrad(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight gradient dW [N, K] = dY^T X from the column-wise forms
    a = (dY^T [N, P], [N, cdiv(P,128)]) and b = (X^T [K, P], [K, cdiv(P,128)]); either scale
    tensor may be in the 128x128-block form [cdiv(rows, 128), cdiv(P, 128)]."""
    op = "gemm_fp8_wgrad"
    _check_wgrad(a_q, a_s, b_q, b_s, None, out_dtype, op)
    _check_same_device(op, a_q, a_s, b_q, b_s)
    if not use_triton(a_q):
        return gemm_fp8_wgrad_ref(a_q, a_s, b_q, b_s, out_dtype)
    if cublas.choose(a_q, "wgrad", out_dtype, (a_q.shape[1], a_q.shape[0], b_q.shape[0])):
        return cublas.gemm_wgrad(a_q, a_s, b_q, b_s, out_dtype)
    return gemm_fp8_wgrad_triton(a_q, a_s, b_q, b_s, out_dtype)


@gemm_fp8_wgrad.register_fake
def _(a_q, a_s, b_q, b_s, out_dtype=torch.float32):
    return a_q.new_empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype)


@torch.library.custom_op("fp8flow::grouped_gemm_fp8_wgrad", mutates_args=())
def grouped_gemm_fp8_wgrad(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor,
                           b_s: torch.Tensor, offs: torch.Tensor,
                           out_dtype: torch.dtype = torch.float32,
                           offs_host: torch.Tensor | None = None) -> torch.Tensor:
    """Per-expert weight gradients dW [E, N, K], dW_g = dY_g^T X_g over the tokens of group g,
    from the column-wise forms with token tiles restarting at each group start
    (scales [rows, max_tiles(P, E)], or [cdiv(rows, 128), max_tiles(P, E)] in the 128x128-block
    form). Empty groups give zeros. offs_host as in grouped_gemm_fp8."""
    op = "grouped_gemm_fp8_wgrad"
    require(offs.dim() == 1 and offs.numel() >= 1, op, "offs must be a non-empty 1-D tensor")
    _check_offs(offs, offs.numel(), op)
    _check_offs_host(offs_host, offs, op)
    _check_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, op)
    _check_same_device(op, a_q, a_s, b_q, b_s, offs)
    if not use_triton(a_q):
        return grouped_gemm_fp8_wgrad_ref(a_q, a_s, b_q, b_s, offs, out_dtype)
    N, P = a_q.shape
    dims, work = grouped_wgrad_sizes(N, P, b_q.shape[0], offs.numel())
    if cublas.choose(a_q, "wgrad", out_dtype, dims, work):
        return cublas.grouped_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, offs_host=offs_host)
    return grouped_gemm_fp8_wgrad_triton(a_q, a_s, b_q, b_s, offs, out_dtype)


@grouped_gemm_fp8_wgrad.register_fake
def _(a_q, a_s, b_q, b_s, offs, out_dtype=torch.float32, offs_host=None):
    return a_q.new_empty(offs.shape[0], a_q.shape[0], b_q.shape[0], dtype=out_dtype)
