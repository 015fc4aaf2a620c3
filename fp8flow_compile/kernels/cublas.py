"""Blockwise FP8 GEMMs through cuBLAS (torch's `_scaled_mm_v2`), dense and one call per group.

cuBLAS has dense blockwise FP8 GEMMs on Hopper (1x128 x 128x128 for fprop/dgrad, 1x128 x 1x128
for wgrad) but no grouped one. A grouped GEMM therefore runs here as one dense call per expert
group, on slices of the operands: the same data, layouts and recipe as the Triton kernels in
gemm.py, so the two are interchangeable behind the fp8flow ops. cuBLAS accumulates in fp32 and
applies each 1x128 / 128x128 scale per K block, as the Triton kernels do; the results agree to
the fp32 accumulation order (checked against the same reference in the tests).

Cost and when it pays
---------------------
The loop needs the group ends on the host. The compiled graph copies `offs` to the host once per
step (`fp8flow::offsets_to_host`, placed where offs is made, started without waiting) and hands the
copy to every grouped GEMM of the step, forward and backward, which wait on its event; called
without it, each call copies offs itself (a sync per call). On the GPU the per-group GEMMs run at
cuBLAS's dense rate (H100, DeepSeek-V3 shard: 1250 TFLOP/s for fprop/dgrad, 946 for wgrad with
1x128 x 1x128 scales and about 15-18% more with one operand's in 128x128 blocks, against
680-715 and 300-333 for the Triton kernel), but each call also costs host time: through torch
about 57 us per `_scaled_mm_v2` call (torch 2.11, measured with the GPU kept busy), 1.9-2.6 ms for a
grouped fprop of 32 groups, where one group's GEMM takes 80-95 us on the GPU. The loop therefore
calls cuBLASLt directly (cublaslt.py: the algorithm search, layouts and descriptor kept between
calls, raw offsets instead of tensor views per group): 1.2 ms for the same grouped fprop, the same
output bits. With many small groups the host time still dominates and the single Triton launch
wins; `choose()` picks by the mean work per group. From one host thread the calls go to two
streams (cublaslt.STREAMS), so that one group's last partial wave of tiles overlaps the next
group's GEMM (84 -> 89% of the dense rate for the FC1 fprop). Issuing the calls from worker
threads does not help: the same grouped fprop took 3.1 / 4.5 / 5.0 ms of host time from 2 / 4 /
8 threads. The host copy of offs also rules out CUDA-graph capture, where the Triton kernel is
used.

Layout rules of cuBLAS (found on the H100, torch 2.11; tests/test_gemm.py runs the loop on CPU
against a stand-in that asserts them, and on the GPU against cuBLAS itself)
----------------------------------------------------------------------------------------------
- A and B K-major (A row-major, B given as the transpose of a row-major [N, K]).
- 1x128 scales column-major with packed strides (1, rows): a row slice of a bigger scale tensor
  is refused, so the groups' scales are repacked (one scatter for all groups).
- The contracted dim a multiple of 16 (wgrad: a group's token count), and slices starting on
  16-element boundaries. Groups that break this run on a zero-padded copy of their columns:
  zero tokens add nothing to the sum, and the group's scale tiles are unchanged because 16
  divides the 128-token tile. The compiled graph avoids those copies: it has the wgrad
  operands written in the aligned group layout (kernels.groups), where every group starts on
  16 tokens and spans a multiple of 16.
- fprop/dgrad row counts a multiple of 4, and B's 128x128 scales a multiple of 4 blocks along
  K: each group's call covers its rows rounded up to 4, running into the next group's rows,
  which that group's later call overwrites (see grouped_fwd); K not a multiple of 512 stays on
  Triton. The output dims (N; for wgrad also the rows of A) multiples of 16, else Triton.

Selection
---------
`FP8FLOW_GEMM=auto|triton|cublas` (environment) or `set_gemm_backend(...)`. `auto` (default)
uses cuBLAS on CUDA devices where a probe GEMM of the same kind and output dtype runs, and for
grouped GEMMs only when the mean group is large enough (`GROUP_WORK`); `cublas` forces it
wherever the probe passes; `triton` never uses it. A failed probe is logged once with its reason.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..recipe import TILE
from . import cublaslt, deepgemm
from .common import expand_block_scales, is_block_scaled
from .groups import cdiv

log = logging.getLogger("fp8flow_compile")

_BACKENDS = ("auto", "triton", "cublas")
_backend = os.environ.get("FP8FLOW_GEMM", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"FP8FLOW_GEMM={_backend!r}: must be one of {_BACKENDS}")

#: Elements per 16-byte access of E4M3 data: the alignment cuBLAS wants for a contracted dim.
ALIGN = 16
#: fprop/dgrad: cuBLAS takes row counts that are multiples of 4 (CUBLAS_STATUS_NOT_SUPPORTED
#: for 1-3, 5-7, ... rows on the H100): a group's call covers its rows rounded up to this (see
#: grouped_fwd); only where that would pass the last row do the last m % 4 rows take a padded copy.
ROW_ALIGN = 4
#: fprop/dgrad: cuBLAS wants the 128x128 scales of B with a multiple of 4 blocks along K
#: ("scale_b must have shape 4 x 1" for K = 128), so K must be a multiple of 4 * 128.
K_BLOCKS = 4
#: Mean multiply-adds per group (rows x N x K) from which `auto` loops over cuBLAS: below it the
#: host work per group (slicing and launching, tens of microseconds) outweighs what the GPU
#: gains. Measured on the H100 (benchmarks/moe_layer.py): DeepSeek-V3 (FC1 groups 2048 x 4096 x
#: 7168 = 6e10) steps 51.3 -> 42.8 ms with cuBLAS; the OLMoE-like shape (64 groups of 1024 x
#: 2048 x 2048 = 4.3e9 and 2.1e9) went 12.3 -> 21.3 ms with its wgrads on cuBLAS.
GROUP_WORK = 1e10
#: fprop/dgrad: fewest waves of 128x128 output tiles per group for `auto` to loop over cuBLAS.
#: One call per group quantises each group to whole waves, where the Triton kernel fills the
#: machine with all groups at once. Measured in the layer (benchmarks/moe_layer.py, H100,
#: DeepSeek-V3 shard): with the FC2 dgrad (2048 x 2048 outputs per group, 1.9 waves on 132 SMs)
#: on cuBLAS as well the step took 25.3 ms against 27.3 ms with it on Triton (its loop alone had
#: timed slower, 3.09 against 2.82 ms, but there the host's launches were what it waited on).
WAVES = 1


def set_gemm_backend(name: str) -> None:
    """Pick the GEMM implementation on CUDA: 'auto' (default), 'triton' or 'cublas'."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"gemm backend {name!r}: must be one of {_BACKENDS}")
    _backend = name


def gemm_backend() -> str:
    return _backend


# ---------------------------------------------------------------- the dense calls

def _recipes():
    F = torch.nn.functional
    return F.ScalingType.BlockWise1x128.value, F.ScalingType.BlockWise128x128.value


def col_major(s: torch.Tensor) -> torch.Tensor:
    """The same values with packed column-major strides (1, rows), as cuBLAS takes 1x128
    scales."""
    return s.t().contiguous().t()


def dense_fwd(a_q: torch.Tensor, a_s_cm: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
              out: torch.Tensor) -> None:
    """out [M, N] = a [M, K] (1x128 scales, column-major) @ b [N, K]^T (128x128 blocks)."""
    r1, r128 = _recipes()
    torch.ops.aten._scaled_mm_v2.out(a_q, b_q.t(), [a_s_cm], [r1], [], [b_s.t()], [r128], [],
                                     None, out.dtype, out=out)


def dense_wgrad(a_q: torch.Tensor, a_s_cm: torch.Tensor, b_q: torch.Tensor,
                b_s_cm: torch.Tensor, out: torch.Tensor) -> None:
    """out [N, K] = a [N, P] @ b [K, P]^T, both with 1x128 scales along P (column-major)."""
    r1, _ = _recipes()
    torch.ops.aten._scaled_mm_v2.out(a_q, b_q.t(), [a_s_cm], [r1], [], [b_s_cm], [r1], [],
                                     None, out.dtype, out=out)


def _dense(kind: str, device: torch.device, out_dtype: torch.dtype) -> Callable:
    """The dense call for the loop: straight into cuBLASLt (cublaslt.py, less host time per
    call) where enabled and its probe passes on the device, else through torch. The wgrad
    kinds with an operand in 128x128 blocks (wgrad_a, wgrad_b) go through cuBLASLt only: their
    torch fallback is the per-row call, on scales expanded first (`_wgrad_kind`)."""
    if device.type == "cuda" and cublaslt.enabled():
        why = cublaslt.probe(device.index or 0, kind, out_dtype)
        if why is None:
            return cublaslt.Caller(device, kind, out_dtype)
        _warn_lt_once(kind, out_dtype, why)
    return dense_fwd if kind == "fwd" else dense_wgrad


def _wgrad_kind(a_s, N, b_s, K, dense, device, out_dtype):
    """(kind, a_s, b_s, dense) for a wgrad whose scales may be in 128x128 blocks: cuBLAS takes
    one operand in blocks (b's if both are: a's are expanded to rows); the block form runs only
    where `dense` is a cuBLASLt caller of that kind, else both are expanded to rows for the
    per-row call."""
    if is_block_scaled(a_s, N) and is_block_scaled(b_s, K):
        a_s = expand_block_scales(a_s, N)
    kind = "wgrad_a" if is_block_scaled(a_s, N) else "wgrad_b" if is_block_scaled(b_s, K) \
        else "wgrad"
    auto = dense is None
    if auto:
        dense = _dense(kind, device, out_dtype)
    if kind != "wgrad" and getattr(dense, "kind", None) != kind:
        a_s, b_s = expand_block_scales(a_s, N), expand_block_scales(b_s, K)
        if auto or isinstance(dense, cublaslt.Caller):
            # the per-row call of our choosing: cuBLASLt directly where its probe passes
            dense = _dense("wgrad", device, out_dtype)
        kind = "wgrad"
    return kind, a_s, b_s, dense


def grid_ld(tiles: int) -> int:
    """The row stride cuBLAS reads a 128x128 scale grid of `tiles` K blocks with."""
    return cdiv(tiles, cublaslt.GRID_LD) * cublaslt.GRID_LD


def block_grid(s: torch.Tensor) -> torch.Tensor:
    """128x128 block scales [RB, T] as one cuBLAS call reads them: row-major, the row stride T
    rounded up to cublaslt.GRID_LD (the extra slots hold 1)."""
    RB, T = s.shape
    ld = grid_ld(T)
    if ld == T and s.is_contiguous():
        return s
    out = s.new_ones(RB, ld)
    out[:, :T] = s
    return out


@functools.cache
def _warn_lt_once(kind, out_dtype, why):
    log.warning("fp8flow: %s GEMMs (%s output) call cuBLAS through torch: %s", kind, out_dtype,
                why)


# ---------------------------------------------------------------- grouped: one call per group

def host_copy(offs: torch.Tensor) -> torch.Tensor:
    """A CPU copy of offs. From a CUDA tensor the copy goes to pinned memory without waiting,
    and the event that marks its end rides on the returned tensor (`_host_bounds` waits on it
    before reading). Pinned buffers come from torch's cache after the first of a size."""
    if not offs.is_cuda:
        return offs.to("cpu", copy=True)
    out = torch.empty(offs.shape, dtype=offs.dtype, pin_memory=True)
    out.copy_(offs, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(offs.device))
    out._fp8flow_ready = ready
    return out


def _host_bounds(offs: torch.Tensor, length: int, offs_host: torch.Tensor | None = None
                 ) -> list[tuple[int, int]]:
    """[(start, end)] per group, clamped to [0, length] as the kernels clamp. Reads `offs_host`
    (a CPU copy of offs) when given, else copies offs to the host (a sync). A copy from
    `host_copy` is read once its event has completed; a CPU copy without that event, made from
    a CUDA offs, is read after a synchronize of the current stream (it may come from a
    non-blocking copy whose end nothing else marks)."""
    return _clamped(_host_ends(offs, offs_host), length)


def _host_ends(offs: torch.Tensor, offs_host: torch.Tensor | None) -> list[int]:
    """The group ends as given (unclamped), on the host: see _host_bounds."""
    if offs_host is not None:
        ready = getattr(offs_host, "_fp8flow_ready", None)
        if ready is not None:
            ready.synchronize()
        elif offs.is_cuda:
            torch.cuda.current_stream(offs.device).synchronize()
    return (offs if offs_host is None else offs_host).tolist()


def _clamped(ends: list[int], length: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for end in ends:
        end = min(max(end, start), length)
        bounds.append((start, end))
        start = end
    return bounds


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    out = x.new_zeros(rows, *x.shape[1:])
    out[:x.shape[0]] = x
    return out


def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], cols)
    out[:, :x.shape[1]] = x
    return out


def _fwd_rows(a, s_cm, b_q, b_s, out, dense):
    """Rows of one group: s_cm the group's packed column-major scales."""
    m = a.shape[0]
    head = m - m % ROW_ALIGN
    if head == m:
        dense(a, s_cm, b_q, b_s, out)
        return
    if head:
        dense(a[:head], col_major(s_cm[:head]), b_q, b_s, out[:head])
    # the last m % ROW_ALIGN rows, through a zero-padded copy
    tmp = out.new_empty(ROW_ALIGN, out.shape[1])
    dense(_pad_rows(a[head:], ROW_ALIGN), col_major(_pad_rows(s_cm[head:], ROW_ALIGN)), b_q,
          b_s, tmp)
    out[head:] = tmp[:m - head]


def gemm_fwd(a_q, a_s, b_q, b_s, out_dtype, dense: Callable | None = None):
    """a [M, K] (1x128) @ b [N, K]^T (128x128 blocks)."""
    dense = dense or _dense("fwd", a_q.device, out_dtype)
    out = torch.empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype, device=a_q.device)
    if a_q.shape[0] == 0 or a_q.shape[1] == 0:
        return out.zero_()
    _fwd_rows(a_q, col_major(a_s), b_q, b_s, out, dense)
    return out


def gemm_wgrad(a_q, a_s, b_q, b_s, out_dtype, dense: Callable | None = None):
    """a [N, P] @ b [K, P]^T, 1x128 scales along P (a multiple of ALIGN); either operand's
    scales may be in 128x128 blocks ([cdiv(rows, 128), T])."""
    N, K = a_q.shape[0], b_q.shape[0]
    out = torch.empty(N, K, dtype=out_dtype, device=a_q.device)
    if a_q.shape[1] == 0:
        return out.zero_()
    kind, a_s, b_s, dense = _wgrad_kind(a_s, N, b_s, K, dense, a_q.device, out_dtype)
    sa = block_grid(a_s) if kind == "wgrad_a" else col_major(a_s)
    sb = block_grid(b_s) if kind == "wgrad_b" else col_major(b_s)
    try:
        dense(a_q, sa, b_q, sb, out)
    except cublaslt.CublasLtError as e:
        if kind == "wgrad":
            raise
        _warn_lt_once(kind, out_dtype, str(e))  # again per row, through torch
        dense_wgrad(a_q, col_major(expand_block_scales(a_s, N)), b_q,
                    col_major(expand_block_scales(b_s, K)), out)
    return out


def _pack_group_scales(a_s: torch.Tensor, offs: torch.Tensor, bounds: list[tuple[int, int]],
                       rows: list[int]) -> list[torch.Tensor]:
    """Scales of rows [start, start + rows[g]) of each group g of the 1x128 scales [M, KB], as a
    packed column-major [rows[g], KB] view each, all written by one kernel (CUDA) or one gather
    (elsewhere) instead of a copy per group: host time is what limits the loop. rows[g] is the
    group's size rounded up to ROW_ALIGN, so a group's last rows may be the next group's (rows
    past M read scale 1). The group table is rebuilt on the device from offs, as _host_bounds
    builds it."""
    KB = a_s.shape[1]
    buf = _pack_scales_buffer(a_s, offs, rows)
    # group g occupies [pstart*KB, (pstart + r)*KB) of the buffer as a row-major [KB, r] block
    out, pstart = [], 0
    for r in rows:
        out.append(buf.as_strided((r, KB), (1, r), pstart * KB))
        pstart += r
    return out


def _pack_scales_buffer(a_s: torch.Tensor, offs: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The buffer behind _pack_group_scales: the groups' packed blocks one after another."""
    M, KB = a_s.shape
    total = sum(rows)
    buf = a_s.new_empty(max(total, 1) * KB)
    if total:
        if a_s.is_cuda:
            _pack_scales_kernel[(cdiv(total, _PACK_ROWS),)](
                a_s, offs, buf, offs.numel(), M, KB, total, ROW_ALIGN_=ROW_ALIGN,
                BLOCK_R=_PACK_ROWS, G_BLOCK=triton.next_power_of_2(offs.numel()),
                KB_BLOCK=triton.next_power_of_2(KB))
        else:
            src, dest = _pack_index(offs, M, KB, total)
            vals = torch.cat([a_s, a_s.new_ones(1, KB)])[src]  # row M: scale 1
            buf[dest] = vals.reshape(-1)
    return buf


def _pack_index(offs: torch.Tensor, M: int, KB: int, total: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row, clamped to M, per packed row; destination of each (packed row, kb))."""
    dev = offs.device
    ends = offs.to(torch.int64).clamp(min=0).cummax(0).values.clamp(max=M)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    r = (ends - starts + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
    pstarts = torch.cumsum(r, 0) - r
    g = torch.repeat_interleave(torch.arange(offs.numel(), device=dev), r, output_size=total)
    j = torch.arange(total, device=dev) - pstarts[g]
    src = (starts[g] + j).clamp(max=M)
    dest = (pstarts[g] * KB + j)[:, None] + torch.arange(KB, device=dev)[None, :] * r[g][:, None]
    return src, dest.reshape(-1)


_PACK_ROWS = 64


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _host_bounds_in_kernel(offs_ptr, G, length, G_BLOCK: tl.constexpr):
    """(lanes, start, end) per group as _host_bounds makes them on the host: offs made
    non-decreasing (a running max from 0) and clamped to [0, length]; lanes >= G are past the
    last group."""
    gi = tl.arange(0, G_BLOCK)
    ends = tl.minimum(tl.associative_scan(
        tl.maximum(tl.load(offs_ptr + gi, mask=gi < G, other=0), 0), 0, _max2), length)
    prev = tl.minimum(tl.associative_scan(tl.maximum(
        tl.load(offs_ptr + gi - 1, mask=(gi >= 1) & (gi < G), other=0), 0), 0, _max2), length)
    return gi, prev, ends


@triton.jit
def _pack_scales_kernel(s_ptr, offs_ptr, buf_ptr, G, M, KB, total, ROW_ALIGN_: tl.constexpr,
                        BLOCK_R: tl.constexpr, G_BLOCK: tl.constexpr, KB_BLOCK: tl.constexpr):
    # Packed row p of group g (groups of r = size rounded up to ROW_ALIGN_ rows, from offs made
    # non-decreasing and clamped to M, as _host_bounds does) holds source row start_g + j,
    # j = p - pstart_g, and goes to buf[pstart_g*KB + kb*r_g + j]; source rows past M read 1.
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    gi, prev, ends = _host_bounds_in_kernel(offs_ptr, G, M, G_BLOCK)
    r = tl.where(gi < G, (ends - prev + ROW_ALIGN_ - 1) // ROW_ALIGN_ * ROW_ALIGN_, 0)
    pends = tl.cumsum(r, 0)
    g = tl.sum((pends[None, :] <= p[:, None]).to(tl.int32), 1)
    sel = gi[None, :] == g[:, None]
    pstart = tl.sum(tl.where(sel, pends - r, 0), 1)
    rg = tl.sum(tl.where(sel, r, 0), 1)
    j = p - pstart
    src = tl.sum(tl.where(sel, prev, 0), 1) + j
    live = p < total
    kb = tl.arange(0, KB_BLOCK)
    m = live[:, None] & (kb[None, :] < KB)
    v = tl.load(s_ptr + src[:, None].to(tl.int64) * KB + kb[None, :],
                mask=m & (src < M)[:, None], other=1.0)
    dest = pstart.to(tl.int64)[:, None] * KB + kb[None, :] * rg[:, None] + j[:, None]
    tl.store(buf_ptr + dest, v, mask=m)


def grouped_fwd(a_q, a_s, b_q, b_s, offs, out_dtype, dense: Callable | None = None,
                offs_host: torch.Tensor | None = None):
    """Rows of group g times b[g] (b [E, N, K], 128x128 blocks); rows past offs[-1] get 0.

    cuBLAS takes row counts in multiples of ROW_ALIGN, so each group's call covers its rows
    rounded up to that: the extra rows read the next group's data and write output rows that a
    later call (the next group's, run after it on the same stream) or the final zero fill
    overwrites. Only a group whose rounded rows would run past M takes a zero-padded copy."""
    M = a_q.shape[0]
    out = torch.empty(M, b_q.shape[1], dtype=out_dtype, device=a_q.device)
    if a_q.shape[1] == 0:
        return out.zero_()
    ends = _host_ends(offs, offs_host)
    bounds = _clamped(ends, M)
    used = bounds[-1][1]
    if used == 0:
        return out.zero_()
    # one DeepGEMM call for all groups where it is installed and reads this layout
    if dense is None and deepgemm.fits(a_q, b_q, b_s, out_dtype, ends, M) and \
            deepgemm.grouped_fwd(a_q, a_s, b_q, b_s, offs, out, used):
        out[used:].zero_()
        return out
    sizes = [e - s for s, e in bounds]
    rows = [cdiv(m, ROW_ALIGN) * ROW_ALIGN for m in sizes]
    dense = dense or _dense("fwd", a_q.device, out_dtype)
    if isinstance(dense, cublaslt.Caller) and b_q.is_contiguous() and b_s.is_contiguous() \
            and a_q.stride(1) == 1:
        try:
            _grouped_fwd_direct(dense, a_q, a_s, b_q, b_s, offs, bounds, rows, out)
            out[used:].zero_()
            return out
        except cublaslt.CublasLtError as e:  # every group is written again below
            _warn_lt_once("fwd", out_dtype, str(e))
            dense = dense_fwd
    scales = _pack_group_scales(a_s, offs, bounds, rows)
    for g, ((s, e), r, b, bs) in enumerate(zip(bounds, rows, b_q.unbind(0), b_s.unbind(0))):
        if e == s:
            continue
        if s + r <= M:
            dense(a_q[s:s + r], scales[g], b, bs, out[s:s + r])
        else:
            _fwd_rows(a_q[s:e], scales[g][:e - s], b, bs, out[s:e], dense)
    out[used:].zero_()
    return out


def _grouped_fwd_direct(dense, a_q, a_s, b_q, b_s, offs, bounds, rows, out):
    """grouped_fwd's loop on raw offsets into a_q, b_q, out and the packed scales (no tensor
    views per group), through cuBLASLt directly. The groups whose rounded rows would pass M
    take the padded path after the others, as in grouped_fwd."""
    M, K = a_q.shape
    KB = a_s.shape[1]
    N = b_q.shape[1]
    buf = _pack_scales_buffer(a_s, offs, rows)
    pbuf, pbs = buf.data_ptr(), b_s.data_ptr()
    bs_step = b_s.stride(0) * b_s.element_size()
    calls, tails, pstart = [], [], 0
    for g, ((s, e), r) in enumerate(zip(bounds, rows)):
        if e > s:
            if s + r <= M:
                calls.append((s * a_q.stride(0), r, g * b_q.stride(0), N, K, s * N,
                              pbuf + pstart * KB * buf.element_size(), pbs + g * bs_step))
            else:
                tails.append((g, s, e, pstart, r))
        pstart += r
    # A group whose rows are rounded up writes into the next group's first rows, which the next
    # group's call must overwrite after it: on one stream then.
    exact = all(r == e - s for (s, e), r in zip(bounds, rows))
    dense.many(a_q, b_q.view(-1, K), out, calls, cublaslt.STREAMS if exact else 1)
    for g, s, e, pstart, r in tails:
        scales = buf.as_strided((r, KB), (1, r), pstart * KB)
        _fwd_rows(a_q[s:e], scales[:e - s], b_q[g], b_s[g], out[s:e], dense)


def grouped_wgrad(a_q, a_s, b_q, b_s, offs, out_dtype, dense: Callable | None = None,
                  offs_host: torch.Tensor | None = None):
    """dW[g] = a[:, group g] @ b[:, group g]^T from the column-wise forms (token tiles restart
    at each group start, see kernels.groups); empty groups give zeros. Either operand's scales
    may be in 128x128 blocks ([cdiv(rows, 128), T]): cuBLAS then runs the pair 1x128 x 128x128,
    faster than 1x128 x 1x128 (cublaslt.MODES), on the same values."""
    N, P = a_q.shape
    K = b_q.shape[0]
    bounds = _host_bounds(offs, P, offs_host)
    out = torch.empty(len(bounds), N, K, dtype=out_dtype, device=a_q.device)
    sizes = [e - s for s, e in bounds]
    tiles = [cdiv(n, TILE) for n in sizes]
    used = bounds[-1][1]
    a_g = a_q[:, :used].split(sizes, dim=1)
    b_g = b_q[:, :used].split(sizes, dim=1)
    o_g = out.unbind(0)
    kind, a_s, b_s, dense = _wgrad_kind(a_s, N, b_s, K, dense, a_q.device, out_dtype)
    sa = _wgrad_group_scales(a_s, offs, P, tiles, kind == "wgrad_a")
    sb = _wgrad_group_scales(b_s, offs, P, tiles, kind == "wgrad_b")
    direct = isinstance(dense, cublaslt.Caller) and a_q.stride(1) == 1 and b_q.stride(1) == 1
    try:
        return _grouped_wgrad_loop(a_g, sa, b_g, sb, o_g, bounds, sizes, dense, direct, a_q, b_q,
                                   out)
    except cublaslt.CublasLtError as e:  # every group is written again through torch
        _warn_lt_once(kind, out_dtype, str(e))
        if kind != "wgrad":
            sa = _wgrad_group_scales(expand_block_scales(a_s, N), offs, P, tiles, False)
            sb = _wgrad_group_scales(expand_block_scales(b_s, K), offs, P, tiles, False)
        return _grouped_wgrad_loop(a_g, sa, b_g, sb, o_g, bounds, sizes, dense_wgrad, False,
                                   a_q, b_q, out)


def _wgrad_group_scales(s: torch.Tensor, offs: torch.Tensor, P: int, tiles: list[int],
                        blocks: bool) -> list[torch.Tensor]:
    """Each group's scales as its cuBLAS call reads them. Per row: one transposed copy of the
    whole tensor, a group's tiles then being a column range of the (rows, T) view with strides
    (1, rows), the packed column-major form. In 128x128 blocks: each group's
    [RB, tiles rounded up to GRID_LD] grid, packed one after another by one kernel
    (`pack_block_grids`)."""
    if not blocks:
        return list(s.t().contiguous().t()[:, :sum(tiles)].split(tiles, dim=1))
    RB = s.shape[0]
    lds = [grid_ld(t) for t in tiles]
    buf = pack_block_grids(s, offs, P, tiles)
    out, start = [], 0
    for ld in lds:
        out.append(buf[start:start + RB * ld].view(RB, ld))
        start += RB * ld
    return out


_GRID_ROWS, _GRID_COLS = 16, 32


def pack_block_grids(s: torch.Tensor, offs: torch.Tensor, P: int, tiles: list[int]
                     ) -> torch.Tensor:
    """The 128x128 block scales s [RB, T] of a grouped wgrad operand as one grid per group,
    back to back: group g's [RB, ld_g] row-major block (ld_g = tiles[g] rounded up to
    cublaslt.GRID_LD, the extra slots 1) holds its token tiles, which start after the earlier
    groups' tiles (kernels.groups). `tiles` comes from the group bounds on the host; the CUDA
    kernel rebuilds them from offs on the device, as `_host_bounds` makes them."""
    RB = s.shape[0]
    lds = [grid_ld(t) for t in tiles]
    total = RB * sum(lds)
    buf = s.new_empty(max(total, 1))
    if not total:
        return buf
    if s.is_cuda:
        G = offs.numel()
        _pack_grids_kernel[(G, cdiv(RB, _GRID_ROWS))](
            s, offs, buf, G, P, RB, s.stride(0), TILE_=TILE, LD_=cublaslt.GRID_LD,
            BLOCK_R=_GRID_ROWS, BLOCK_J=_GRID_COLS, G_BLOCK=triton.next_power_of_2(G))
        return buf
    start, t0 = 0, 0
    for t, ld in zip(tiles, lds):
        grid = buf[start:start + RB * ld].view(RB, ld)
        grid.fill_(1.0)
        grid[:, :t] = s[:, t0:t0 + t]
        start, t0 = start + RB * ld, t0 + t
    return buf


@triton.jit
def _pack_grids_kernel(s_ptr, offs_ptr, buf_ptr, G, P, RB, stride_s, TILE_: tl.constexpr,
                       LD_: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                       G_BLOCK: tl.constexpr):
    # Program (g, row block): group g's tiles [t0, t0 + n) of rows r go to buf[base + r * ld + j]
    # (j < n), slots n <= j < ld get 1; group bounds from offs made non-decreasing and clamped
    # to P, as _host_bounds makes them.
    g = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    gi, prev, ends = _host_bounds_in_kernel(offs_ptr, G, P, G_BLOCK)
    tiles = tl.where(gi < G, (ends - prev + TILE_ - 1) // TILE_, 0)
    lds = (tiles + LD_ - 1) // LD_ * LD_
    before = gi < g
    t0 = tl.sum(tl.where(before, tiles, 0), 0)
    base = RB * tl.sum(tl.where(before, lds, 0), 0)
    n = tl.sum(tl.where(gi == g, tiles, 0), 0)
    ld = tl.sum(tl.where(gi == g, lds, 0), 0)
    rm = (r < RB)[:, None]
    j0 = 0
    while j0 < ld:
        j = j0 + tl.arange(0, BLOCK_J)[None, :]
        v = tl.load(s_ptr + r[:, None].to(tl.int64) * stride_s + t0 + j, mask=rm & (j < n),
                    other=1.0)
        tl.store(buf_ptr + base + r[:, None].to(tl.int64) * ld + j, v, mask=rm & (j < ld))
        j0 += BLOCK_J


def _grouped_wgrad_loop(a_g, sa, b_g, sb, o_g, bounds, sizes, dense, direct, a_q, b_q, out):
    N, K = out.shape[1], out.shape[2]
    calls = []
    for g, (start, n) in enumerate(zip((s for s, _ in bounds), sizes)):
        if not n:  # a memset per empty group: indexing `out` with a host list would copy (and sync)
            o_g[g].zero_()
        elif direct and not (start % ALIGN or n % ALIGN):
            # raw offsets: a's and b's columns from start, out[g]; each operand's scales are
            # the [tiles, rows] block at its first tile in the transposed copy (rows-major)
            calls.append((start, N, start, K, n, g * N * K, sa[g].data_ptr(), sb[g].data_ptr()))
        else:
            _wgrad_group(a_g[g], sa[g], b_g[g], sb[g], o_g[g], start, dense)
    if calls:  # each writes its own out[g]
        dense.many(a_q, b_q, out.view(-1, K), calls, cublaslt.STREAMS)
    return out


def _wgrad_group(a, sa, b, sb, out, start, dense):
    n = a.shape[1]
    if start % ALIGN or n % ALIGN:
        width = cdiv(n, ALIGN) * ALIGN  # <= tiles * TILE: the scale tiles still cover it
        a, b = _pad_cols(a, width), _pad_cols(b, width)
    dense(a, sa, b, sb, out)


# ---------------------------------------------------------------- when to use it

@functools.cache
def _probe(device_index: int, kind: str, out_dtype: torch.dtype) -> str | None:
    """None if a small GEMM of this kind runs through cuBLAS on the device, else the reason."""
    dev = torch.device("cuda", device_index)
    major, _ = torch.cuda.get_device_capability(dev)
    if major != 9:
        return f"cuBLAS blockwise FP8 is used on Hopper (sm90) only, this device is sm{major}x"
    if not hasattr(torch.nn.functional, "ScalingType") or \
            not hasattr(torch.ops.aten, "_scaled_mm_v2"):
        return f"torch {torch.__version__} has no F.scaled_mm blockwise scaling"
    try:
        fp8 = torch.float8_e4m3fn
        kb = K_BLOCKS if kind == "fwd" else 1
        a = torch.ones(ALIGN, kb * TILE, dtype=fp8, device=dev)
        s = col_major(torch.ones(ALIGN, kb, device=dev))
        if kind == "fwd":
            out = torch.empty(ALIGN, TILE, dtype=out_dtype, device=dev)
            dense_fwd(a, s, torch.ones(TILE, kb * TILE, dtype=fp8, device=dev),
                      torch.ones(1, kb, device=dev), out)
        else:
            out = torch.empty(ALIGN, ALIGN, dtype=out_dtype, device=dev)
            dense_wgrad(a, s, a, s, out)
        torch.cuda.synchronize(dev)
    except (RuntimeError, ValueError, TypeError) as e:  # what torch raises for unsupported
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def may_choose(device: torch.device, kind: str, dims: tuple[int, ...],
               group_work: float | None = None, group_tiles: float | None = None) -> bool:
    """The part of `choose` that shapes and the backend setting decide, without running
    anything on the device: the passes ask it at compile time whether a grouped GEMM may need
    its group ends on the host."""
    if _backend == "triton" or device.type != "cuda" or any(d % ALIGN for d in dims):
        return False
    if kind == "fwd" and dims[-1] % (K_BLOCKS * TILE):
        return False
    if _backend == "auto" and group_work is not None:
        if group_work < GROUP_WORK:
            return False
        if group_tiles is not None and group_tiles < WAVES * _sms(device):
            return False
    return True


def choose(a_q: torch.Tensor, kind: str, out_dtype: torch.dtype, dims: tuple[int, ...],
           group_work: float | None = None, group_tiles: float | None = None) -> bool:
    """True when this GEMM should run through cuBLAS. kind 'fwd' (fprop/dgrad) or 'wgrad';
    dims: the sizes cuBLAS needs in multiples of ALIGN (fwd: B's (N, K), K last and also a
    multiple of K_BLOCKS * 128; wgrad: both output dims, and a dense wgrad's tokens);
    group_work: mean multiply-adds per group for grouped GEMMs (None for dense);
    group_tiles: mean 128x128 output tiles per group of a grouped fprop/dgrad."""
    if not may_choose(a_q.device, kind, dims, group_work, group_tiles):
        return False
    if torch.cuda.is_current_stream_capturing():
        return False  # the grouped loop reads offs on the host; the probe synchronises
    why = _probe(a_q.device.index or 0, kind, out_dtype)
    if why is not None:
        _warn_once(kind, out_dtype, why)
        return False
    return True


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _warn_once(kind, out_dtype, why):
    log.warning("fp8flow: %s GEMMs (%s output) use the Triton kernels: %s", kind, out_dtype, why)
