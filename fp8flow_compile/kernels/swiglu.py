"""SwiGLU (optionally weighted by the router probability) fused with the 1x128 quantization.

FP8-Flow-MoE's "fused weighted SwiGLU + quant": the FC1 output h [P, 2I] holds the gate
projection in h[:, :I] and the up projection in h[:, I:]. Forward:

    y = silu(gate) * up * probs[:, None]            (fp32, probs optional)
    swiglu_quant(h, probs) -> (q [P, I] E4M3, s [P, I/128] fp32)   row-wise 1x128 along I

Backward, from dy [P, I] (the FC2 dgrad output, high precision):

    d_gate = dy * up * silu'(gate) * probs,  d_up = dy * silu(gate) * probs
    dprobs = sum_i dy * silu(gate) * up
    swiglu_quant_backward(dy, h, probs) -> (dh_q [P, 2I] E4M3, dh_s [P, 2I/128], dprobs [P] fp32)

dh is quantized row-wise along 2I because the FC1 dgrad GEMM contracts 2I; its first I/128 scale
columns belong to d_gate, the rest to d_up. dprobs is [0] when probs is None. I must be a
multiple of 128 so no tile straddles the gate/up boundary.

Gate and up from two GEMMs (torchtitan's w1 and w3, a dense MLP's gate_proj and up_proj): every
op takes `up=`, and h is then the gate [P, I]. The backward's `split=True` writes dh as two
contiguous planes [2, P, I] (d_gate, then d_up) with scales [2, P, I/128], the operands of the
two GEMMs' dgrads. Tiles never straddle gate and up, so the bytes are those of the one-tensor
form, only placed differently.

Saving h in FP8 (as DeepSeek-V3 caches the SwiGLU inputs): `swiglu_quant_save(h, probs)` also
returns h quantized 1x128 along 2I, (h_q [P, 2I] E4M3, h_s [P, 2I/128]), from the same pass over
h; `swiglu_quant_backward(dy, h_q, probs, h_s)` then reads the dequantized h. The forward output
is computed from h itself; only the backward sees h's rounding (relative 2^-4 at most per
element), half the bytes to keep between forward and backward.

Everything is computed in fp32: silu(g) = g * sigmoid(g), silu'(g) = sigmoid(g) * (1 + g *
(1 - sigmoid(g))), with sigmoid = r = 1 / (1 + exp(-g)) and 1 - sigmoid = 1 - r. For g below
-88.7 exp(-g) overflows to inf and r is 0: silu is -0 (the exact value is below 2^-120 in
magnitude), silu' is 0, never inf * 0 = NaN. 1 - r keeps an absolute error of 2^-24 where r is
near 1 (large g), which moves silu' = r * (1 + g * (1 - r)) by at most g * 2^-24 relative, far
below the E4M3 step. (The form from exp(-|g|) keeps full relative precision in both,
but its compare and two selects per element made these issue-bound kernels slower.)
Only a non-finite input gives NaN, as the recipe's NaN rule wants. The Triton kernels and the
torch references evaluate the same expressions in the same order; they differ only where exp
differs in its last bits between implementations (and where the GPU contracts a*b+c into an FMA).

`swiglu` and `swiglu_backward` are the unfused high-precision ops the naive recipe quantizes
separately (one rounding to the input dtype, no FP8); having no tiles, they take any even width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import TILE
from . import fp8_math as fm
from .common import FP8, HIGH, use_triton
from .groups import cdiv
from .quantize import dequantize_1x128_ref, quantize_1x128_ref

# ---------------------------------------------------------------- torch reference (any device)


def _sigmoid_ref(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid(g), 1 - sigmoid(g)) by the kernels' formula (not torch.sigmoid, whose vectorized
    CPU code rounds differently)."""
    r = 1.0 / (1.0 + torch.exp(-g))
    return r, 1.0 - r


def _gate_up(h: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) as fp32: the halves of h [P, 2I], or h [P, I] and up [P, I]."""
    if up is not None:
        return h.float(), up.float()
    half = h.shape[1] // 2
    return h[:, :half].float(), h[:, half:].float()


def swiglu_ref(h: torch.Tensor, probs: torch.Tensor | None = None,
               up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up [* probs] in fp32, [P, I]."""
    g, u = _gate_up(h, up)
    y = g * _sigmoid_ref(g)[0] * u
    if probs is not None:
        y = y * probs.float()[:, None]
    return y


def swiglu_quant_ref(h: torch.Tensor, probs: torch.Tensor | None = None,
                     up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_1x128_ref(swiglu_ref(h, probs, up))


def swiglu_quant_save_ref(h: torch.Tensor, probs: torch.Tensor | None = None,
                          up: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    hh = h.float() if up is None else torch.cat([h.float(), up.float()], 1)
    return (*swiglu_quant_ref(h, probs, up), *quantize_1x128_ref(hh))


def _h_value(h: torch.Tensor, h_scales: torch.Tensor | None) -> torch.Tensor:
    """h as fp32: decoded and scaled if it is the FP8 copy."""
    if h_scales is None:
        return h.float()
    return dequantize_1x128_ref(h, h_scales, None, torch.float32)


def swiglu_backward_ref(dy: torch.Tensor, h: torch.Tensor, probs: torch.Tensor | None = None,
                        h_scales: torch.Tensor | None = None, up: torch.Tensor | None = None,
                        split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh [P, 2I] fp32, or [2, P, I] with split, dprobs [P] fp32 or [0])."""
    g, u = _gate_up(_h_value(h, h_scales), up)
    d = dy.float()
    sig, sig_c = _sigmoid_ref(g)
    d_gate = d * u * (sig * (1.0 + g * sig_c))
    d_up = d * (g * sig)
    if probs is None:
        dprobs = torch.empty(0, dtype=torch.float32, device=h.device)
    else:
        p = probs.float()[:, None]
        dprobs = (d_up * u).sum(1)
        d_gate, d_up = d_gate * p, d_up * p
    if split:
        return torch.stack([d_gate, d_up]), dprobs
    return torch.cat([d_gate, d_up], 1), dprobs


def swiglu_quant_backward_ref(dy: torch.Tensor, h: torch.Tensor,
                              probs: torch.Tensor | None = None,
                              h_scales: torch.Tensor | None = None,
                              up: torch.Tensor | None = None, split: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dprobs = swiglu_backward_ref(dy, h, probs, h_scales, up, split)
    if split:  # each plane quantized along its own I: the same tiles as the halves
        (qg, sg), (qu, su) = quantize_1x128_ref(dh[0]), quantize_1x128_ref(dh[1])
        return torch.stack([qg, qu]), torch.stack([sg, su]), dprobs
    return (*quantize_1x128_ref(dh), dprobs)


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _sigmoid(g):
    """(sigmoid(g), 1 - sigmoid(g)) as r = 1 / (1 + exp(-g)) and 1 - r (module docstring)."""
    r = 1.0 / (1.0 + tl.exp(-g))  # tl.exp: the interpreter has no libdevice
    return r, 1.0 - r


@triton.jit
def _decode(ptrs, mask, COMPILED: tl.constexpr):
    """E4M3 to fp32, exact either way: the GPU's conversion when compiled (the integer decode
    bounds the kernel there), the integer decode of the bytes under the interpreter."""
    byte = tl.load(ptrs, mask=mask, other=0)
    if COMPILED:
        return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return fm.e4m3_to_f32(byte)


@triton.jit
def _swiglu_quant_kernel(g_ptr, u_ptr, p_ptr, q_ptr, s_ptr, v_ptr, hq_ptr, hs_ptr, P, half,
                         h_stride, T,
                         BLOCK_R: tl.constexpr, TILE_: tl.constexpr,
                         HAS_PROBS: tl.constexpr, STORE_VALUE: tl.constexpr,
                         SAVE_H: tl.constexpr):
    # Tiles of a row block first: neighbouring programs read neighbouring segments of the same
    # rows of h.
    pid = tl.program_id(0)
    t = pid % T
    pid_r = pid // T
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = t * TILE_ + tl.arange(0, TILE_)
    rmask = rows < P
    mask = rmask[:, None] & (cols < half)[None, :]
    # gate and up: the two halves of one h (u_ptr = g_ptr + half) or two tensors, rows h_stride
    # apart either way
    in_offs = rows[:, None].to(tl.int64) * h_stride + cols[None, :]
    g = tl.load(g_ptr + in_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + in_offs, mask=mask, other=0.0).to(tl.float32)
    if SAVE_H:  # h's own 1x128 tiles: gate tile t, then up tile t (scale column T + t)
        h_offs = rows[:, None].to(tl.int64) * (2 * half) + cols[None, :]
        hs_row = hs_ptr + rows.to(tl.int64) * (2 * T) + t
        fm.store_quantized_rows(g, hq_ptr + h_offs, hs_row, mask, rmask)
        fm.store_quantized_rows(u, hq_ptr + h_offs + half, hs_row + T, mask, rmask)
    y = g * _sigmoid(g)[0] * u
    if HAS_PROBS:
        p = tl.load(p_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        y = y * p[:, None]
    y_offs = rows[:, None].to(tl.int64) * half + cols[None, :]
    if STORE_VALUE:
        tl.store(v_ptr + y_offs, y, mask=mask)
    fm.store_quantized_rows(y, q_ptr + y_offs, s_ptr + rows.to(tl.int64) * T + t, mask, rmask)


@triton.jit
def _swiglu_quant_bwd_kernel(dy_ptr, g_ptr, u_ptr, hs_ptr, p_ptr, qg_ptr, qu_ptr, sg_ptr,
                             su_ptr, dp_ptr, vg_ptr, vu_ptr, P, h_stride, q_stride, s_stride,
                             T: tl.constexpr, BLOCK_R: tl.constexpr, TILE_: tl.constexpr,
                             CHUNK: tl.constexpr, NC: tl.constexpr,
                             HAS_PROBS: tl.constexpr, STORE_VALUE: tl.constexpr,
                             H_FP8: tl.constexpr, COMPILED: tl.constexpr):
    # One program per (row block, chunk of CHUNK tiles of I), the chunks of a row block next to
    # each other in a 1-D grid (neighbouring programs read neighbouring segments of the same
    # rows, as in the forward). Each program sums its part of dprobs in one
    # fixed order and writes it to column c of dp [P, NC] (NC = cdiv(T, CHUNK) chunks), which
    # the launcher sums over c (deterministic, no atomics). T = I / TILE_ tiles per half of
    # dh; it and CHUNK are constexprs because the interpreter (triton 3.6 with numpy 2) cannot
    # loop to a runtime bound, and I is fixed per model anyway. gate and up are read from g_ptr
    # and u_ptr, rows h_stride apart (the halves of one h, or two tensors); d_gate and d_up go
    # to qg/sg and qu/su, rows q_stride / s_stride apart (the halves of one [P, 2I] dh, or the
    # two planes of a [2, P, I] one).
    half = T * TILE_
    pid = tl.program_id(0)
    c = pid % NC
    pid_r = pid // NC
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < P
    rows64 = rows.to(tl.int64)
    if HAS_PROBS:
        p = tl.load(p_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in range(0, CHUNK):
        t = c * CHUNK + j
        cols = t * TILE_ + tl.arange(0, TILE_)
        smask = rmask & (t < T)  # the last chunk may run past I: those tiles do nothing
        mask = smask[:, None] & (cols < half)[None, :]
        h_offs = rows64[:, None] * h_stride + cols[None, :]
        if H_FP8:  # g_ptr / u_ptr: the E4M3 bytes of h's halves, hs_ptr its scales [P, 2T]
            hs_row = hs_ptr + rows64 * (2 * T) + t
            g = _decode(g_ptr + h_offs, mask, COMPILED) * \
                tl.load(hs_row, mask=smask, other=1.0)[:, None]
            u = _decode(u_ptr + h_offs, mask, COMPILED) * \
                tl.load(hs_row + T, mask=smask, other=1.0)[:, None]
        else:
            g = tl.load(g_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dy_ptr + rows64[:, None] * half + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        sig, sig_c = _sigmoid(g)
        d_gate = d * u * (sig * (1.0 + g * sig_c))
        d_up = d * (g * sig)
        if HAS_PROBS:
            acc += tl.sum(d_up * u, axis=1)
            d_gate = d_gate * p[:, None]
            d_up = d_up * p[:, None]
        q_offs = rows64[:, None] * q_stride + cols[None, :]
        if STORE_VALUE:
            tl.store(vg_ptr + q_offs, d_gate, mask=mask)
            tl.store(vu_ptr + q_offs, d_up, mask=mask)
        s_offs = rows64 * s_stride + t
        fm.store_quantized_rows(d_gate, qg_ptr + q_offs, sg_ptr + s_offs, mask, smask)
        fm.store_quantized_rows(d_up, qu_ptr + q_offs, su_ptr + s_offs, mask, smask)
    if HAS_PROBS:
        tl.store(dp_ptr + rows64 * NC + c, acc, mask=rmask)


# ---------------------------------------------------------------- launchers

#: Rows per program of the forward, one 128-column tile of gate and up each, and its warps.
#: H100, swiglu_quant_save with probs (the flow's call), programs ordered row block first:
#: P = 65536, I = 2048: 0.480 ms with 8 rows and 2 warps, 0.486 with 16 and 4, 0.569 with 32
#: and 4 (ptxas gave it 140 registers); P = 16384, I = 14336: 0.731, 0.755, 0.900 ms. Ordered
#: tile first (the kernel now) with 4 rows and 1 warp: 0.477 -> 0.382 ms and 0.731 -> 0.666 ms
#: (CUDA-graph replays, the same instance, the same bytes); in a sweep of single launches 8 rows
#: and 2 warps and 16 and 4 were 5-15% slower than 4 and 1.
_BLOCK_R = 4
_FWD_WARPS = 1
#: Rows per program of the backward and its warps: more, smaller programs keep more loads in
#: flight. H100, P = 66016, I = 2048, 4 warps: 0.527 ms with 32 rows, 0.409 with 16, 0.396 with
#: 8 (bf16 h; 0.531 -> 0.366 ms with h in FP8); with h in FP8 and chunks of 16 tiles, 4 rows and
#: 2 warps 0.358 ms against 0.364 with 8 and 4 (P = 65536), and at P = 16384, I = 14336 0.636
#: against 0.648 ms.
_BWD_ROWS = 4
_BWD_WARPS = 2
#: Tiles of I per backward program (one program per row block and chunk): at I = 2048 (16 tiles) one
#: chunk, the whole row block; at larger I more programs, each with a shorter loop. H100,
#: P = 16384, I = 14336 (112 tiles), h in FP8: 0.694 ms walking all of I per program, 0.648
#: with chunks of 16, 0.654 of 8, 0.698 of 4, 0.724 of 32 (8 rows, 4 warps).
#: Chunks of a row block next to each other (the kernel now) against row blocks first, at 16
#: tiles, 4 rows, 2 warps, CUDA-graph replays in one process: P = 65536, I = 2048: 0.359 ->
#: 0.351 ms; P = 16384, I = 14336: 0.636 -> 0.624 ms (chunks of 4: 0.353 / 0.619-0.620).
_BWD_CHUNK = 16


def swiglu_quant_triton(h: torch.Tensor, probs: torch.Tensor | None = None,
                        value_out: torch.Tensor | None = None, save_h: bool = False,
                        block_r: int = _BLOCK_R, num_warps: int = _FWD_WARPS,
                        up: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(q, s), and with save_h also (h_q, h_s). value_out (fp32 [P, I], optional) receives the
    fp32 values the kernel quantized, so tests can check the quantization bit-exactly apart from
    the transcendental's last ulp. With up, h is the gate [P, I] and up the up projection."""
    P = h.shape[0]
    half = h.shape[1] if up is not None else h.shape[1] // 2
    T = half // TILE
    q = torch.empty(P, half, dtype=FP8, device=h.device)
    s = torch.empty(P, T, dtype=torch.float32, device=h.device)
    hq = torch.empty(P, 2 * half if save_h else 0, dtype=FP8, device=h.device)
    hs = torch.empty(P, 2 * T if save_h else 0, dtype=torch.float32, device=h.device)
    if P and T:
        g, u = (h, up) if up is not None else (h, h[:, half:])
        _swiglu_quant_kernel[(cdiv(P, block_r) * T,)](
            g, u, h if probs is None else probs, q.view(torch.uint8), s,
            s if value_out is None else value_out, hq.view(torch.uint8), hs, P, half,
            h.stride(0), T, BLOCK_R=block_r, TILE_=TILE, HAS_PROBS=probs is not None,
            STORE_VALUE=value_out is not None, SAVE_H=save_h, num_warps=num_warps)
    return (q, s, hq, hs) if save_h else (q, s)


def swiglu_quant_backward_triton(dy: torch.Tensor, h: torch.Tensor,
                                 probs: torch.Tensor | None = None,
                                 h_scales: torch.Tensor | None = None,
                                 value_out: torch.Tensor | None = None,
                                 block_r: int = _BWD_ROWS, num_warps: int = _BWD_WARPS,
                                 chunk: int = _BWD_CHUNK, up: torch.Tensor | None = None,
                                 split: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: high precision [P, 2I] (or the gate [P, I] with up), or the FP8 copy [P, 2I] with its
    1x128 scales h_scales. split: dh as [2, P, I] (d_gate, d_up planes) rather than [P, 2I].
    value_out (fp32, dh's shape, optional): the fp32 dh the kernel quantized, for tests."""
    P, half = dy.shape
    T = half // TILE
    if split:
        q = torch.empty(2, P, half, dtype=FP8, device=h.device)
        s = torch.empty(2, P, T, dtype=torch.float32, device=h.device)
    else:
        q = torch.empty(P, 2 * half, dtype=FP8, device=h.device)
        s = torch.empty(P, 2 * T, dtype=torch.float32, device=h.device)
    dprobs = torch.empty(0 if probs is None else P, dtype=torch.float32, device=h.device)
    if P and T:
        fp8_h = h_scales is not None
        chunk = max(1, min(chunk, T))
        nc = cdiv(T, chunk)
        # dprobs per chunk, summed below; one chunk writes dprobs itself
        dp_part = dprobs if probs is None or nc == 1 else \
            torch.empty(P, nc, dtype=torch.float32, device=h.device)
        hb = h.view(torch.uint8) if fp8_h else h
        g, u = (hb, up) if up is not None else (hb, hb[:, half:])

        def planes(x, cols):  # (gate part, up part) of a dh-shaped tensor
            return (x[0], x[1]) if split else (x, x[:, cols:])
        qg, qu = planes(q.view(torch.uint8), half)
        sg, su = planes(s, T)
        vg, vu = (sg, su) if value_out is None else planes(value_out, half)
        _swiglu_quant_bwd_kernel[(cdiv(P, block_r) * nc,)](
            dy, g, u, h_scales if fp8_h else s, dy if probs is None else probs, qg, qu, sg, su,
            s if probs is None else dp_part, vg, vu, P, h.stride(0), qg.stride(0), sg.stride(0),
            T=T, BLOCK_R=block_r, TILE_=TILE, CHUNK=chunk, NC=nc, HAS_PROBS=probs is not None,
            STORE_VALUE=value_out is not None, H_FP8=fp8_h, COMPILED=h.is_cuda,
            num_warps=num_warps)
        if probs is not None and nc > 1:
            torch.sum(dp_part, dim=1, out=dprobs)
    elif probs is not None:
        dprobs.zero_()  # I == 0: an empty sum
    return q, s, dprobs


# ---------------------------------------------------------------- checks


def _check_h(h: torch.Tensor, probs: torch.Tensor | None, op: str, tiled: bool = True,
             h_scales: torch.Tensor | None = None, fp8_ok: bool = False,
             up: torch.Tensor | None = None) -> None:
    if up is not None:
        _check_gate_up(h, up, op, tiled)
    else:
        require(h.dim() == 2, op, f"h must be 2-D [P, 2I], got shape {tuple(h.shape)}")
    if h.dtype == FP8 and fp8_ok and up is None:
        require(h_scales is not None, op, "an FP8 h needs its 1x128 scales (h_scales)")
        T2 = h.shape[1] // TILE
        require(h_scales.dtype == torch.float32 and tuple(h_scales.shape) == (h.shape[0], T2)
                and h_scales.is_contiguous() and h_scales.device == h.device, op,
                f"h_scales must be contiguous fp32 [{h.shape[0]}, {T2}] on {h.device}, got "
                f"{h_scales.dtype} {tuple(h_scales.shape)} on {h_scales.device}")
    else:
        require_dtype(h, HIGH, op, "h")
        require(h_scales is None, op, f"h_scales is only for an FP8 h; h is {h.dtype}")
    require(h.is_contiguous(), op, f"h must be contiguous, got strides {tuple(h.stride())}")
    if up is None:
        C = h.shape[1]
        require(C % 2 == 0, op, f"h.shape[1] = 2I = {C} must be even ([gate, up] halves)")
        require(not tiled or C // 2 % TILE == 0, op,
                f"I = h.shape[1] // 2 = {C // 2} must be a multiple of {TILE} "
                f"(1x{TILE} tiles may not straddle the gate/up boundary)")
    if probs is None:
        return
    require(tuple(probs.shape) == (h.shape[0],), op,
            f"probs must have shape ({h.shape[0]},) (one per row of h), got {tuple(probs.shape)}")
    require_dtype(probs, HIGH, op, "probs")
    require(probs.is_contiguous(), op, "probs must be contiguous")
    require(probs.device == h.device, op,
            f"probs is on {probs.device} but h is on {h.device}")


def _check_gate_up(gate: torch.Tensor, up: torch.Tensor, op: str, tiled: bool) -> None:
    """gate (passed as h) and up as two tensors [P, I]."""
    require(gate.dim() == 2, op, f"with up given, h is the gate [P, I]; got shape "
            f"{tuple(gate.shape)}")
    require(up.shape == gate.shape, op, f"up must have the gate's shape {tuple(gate.shape)}, got "
            f"{tuple(up.shape)}")
    require_dtype(up, HIGH, op, "up")
    require(up.is_contiguous(), op, f"up must be contiguous, got strides {tuple(up.stride())}")
    require(up.device == gate.device, op, f"up is on {up.device} but h is on {gate.device}")
    require(not tiled or gate.shape[1] % TILE == 0, op,
            f"I = {gate.shape[1]} must be a multiple of {TILE} (1x{TILE} tiles)")


def _width(h: torch.Tensor, up: torch.Tensor | None) -> int:
    """I: the SwiGLU's output width."""
    return h.shape[1] if up is not None else h.shape[1] // 2


def _check_dy(dy: torch.Tensor, h: torch.Tensor, op: str, up: torch.Tensor | None = None) -> None:
    shape = (h.shape[0], _width(h, up))
    require(tuple(dy.shape) == shape, op, f"dy must have shape {shape}, got {tuple(dy.shape)}")
    require_dtype(dy, HIGH, op, "dy")
    require(dy.is_contiguous(), op, f"dy must be contiguous, got strides {tuple(dy.stride())}")
    require(dy.device == h.device, op, f"dy is on {dy.device} but h is on {h.device}")


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("fp8flow::swiglu_quant", mutates_args=())
def swiglu_quant(h: torch.Tensor, probs: torch.Tensor | None = None,
                 up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(h[:, :I]) * h[:, I:] [* probs] in fp32, quantized 1x128 along I:
    (q [P, I] E4M3, s [P, I/128] fp32). With up, h is the gate [P, I] and up [P, I] the up
    projection (gate and up from two GEMMs): silu(h) * up [* probs]."""
    _check_h(h, probs, "swiglu_quant", up=up)
    if use_triton(h):
        return swiglu_quant_triton(h, probs, up=up)
    return swiglu_quant_ref(h, probs, up)


@swiglu_quant.register_fake
def _(h, probs=None, up=None):
    P, half = h.shape[0], _width(h, up)
    return h.new_empty(P, half, dtype=FP8), h.new_empty(P, half // TILE, dtype=torch.float32)


@torch.library.custom_op("fp8flow::swiglu_quant_save", mutates_args=())
def swiglu_quant_save(h: torch.Tensor, probs: torch.Tensor | None = None,
                      up: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """swiglu_quant's (q, s), plus h quantized 1x128 along 2I for the backward to keep:
    (q [P, I], s [P, I/128], h_q [P, 2I] E4M3, h_s [P, 2I/128] fp32), one pass over h. With up,
    h_q holds [gate, up] side by side, as if they were the halves of one h."""
    _check_h(h, probs, "swiglu_quant_save", up=up)
    if use_triton(h):
        return swiglu_quant_triton(h, probs, save_h=True, up=up)
    return swiglu_quant_save_ref(h, probs, up)


@swiglu_quant_save.register_fake
def _(h, probs=None, up=None):
    P, half = h.shape[0], _width(h, up)
    return (h.new_empty(P, half, dtype=FP8), h.new_empty(P, half // TILE, dtype=torch.float32),
            h.new_empty(P, 2 * half, dtype=FP8),
            h.new_empty(P, 2 * half // TILE, dtype=torch.float32))


@torch.library.custom_op("fp8flow::swiglu_quant_backward", mutates_args=())
def swiglu_quant_backward(dy: torch.Tensor, h: torch.Tensor, probs: torch.Tensor | None = None,
                          h_scales: torch.Tensor | None = None, up: torch.Tensor | None = None,
                          split: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of swiglu_quant's SwiGLU w.r.t. h, quantized 1x128 along 2I, and w.r.t. probs:
    (dh_q [P, 2I] E4M3, dh_s [P, 2I/128] fp32, dprobs [P] fp32, or [0] without probs).
    h is the high-precision FC1 output, or its FP8 copy from swiglu_quant_save with h_scales,
    or the high-precision gate [P, I] with up. split: dh_q [2, P, I] and dh_s [2, P, I/128],
    d_gate and d_up as two contiguous planes (for gate and up GEMMs of their own); the same
    tiles and bytes."""
    _check_h(h, probs, "swiglu_quant_backward", h_scales=h_scales, fp8_ok=True, up=up)
    _check_dy(dy, h, "swiglu_quant_backward", up)
    if use_triton(h):
        return swiglu_quant_backward_triton(dy, h, probs, h_scales, up=up, split=split)
    return swiglu_quant_backward_ref(dy, h, probs, h_scales, up, split)


@swiglu_quant_backward.register_fake
def _(dy, h, probs=None, h_scales=None, up=None, split=False):
    P, half = dy.shape
    dp = h.new_empty(0 if probs is None else P, dtype=torch.float32)
    if split:
        return (h.new_empty(2, P, half, dtype=FP8),
                h.new_empty(2, P, half // TILE, dtype=torch.float32), dp)
    return (h.new_empty(P, 2 * half, dtype=FP8),
            h.new_empty(P, 2 * half // TILE, dtype=torch.float32), dp)


@torch.library.custom_op("fp8flow::swiglu", mutates_args=())
def swiglu(h: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Unfused SwiGLU [P, I] in h's dtype (fp32 math, one rounding): the naive recipe's op."""
    _check_h(h, probs, "swiglu", tiled=False)
    return swiglu_ref(h, probs).to(h.dtype)


@swiglu.register_fake
def _(h, probs=None):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("fp8flow::swiglu_backward", mutates_args=())
def swiglu_backward(dy: torch.Tensor, h: torch.Tensor, probs: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused SwiGLU backward: (dh [P, 2I] in dy's dtype, dprobs [P] fp32 or [0])."""
    _check_h(h, probs, "swiglu_backward", tiled=False)
    _check_dy(dy, h, "swiglu_backward")
    dh, dprobs = swiglu_backward_ref(dy, h, probs)
    return dh.to(dy.dtype), dprobs


@swiglu_backward.register_fake
def _(dy, h, probs=None):
    return (h.new_empty(h.shape, dtype=dy.dtype),
            h.new_empty(0 if probs is None else h.shape[0], dtype=torch.float32))
