"""Blockwise FP8 GEMMs called straight into cuBLASLt (through ctypes), for the per-group loop.

cublas.py runs a grouped GEMM as one dense cuBLAS call per expert group, so the host cost of one
call is paid 32 times per grouped GEMM (DeepSeek-V3 shard), 192 times per MoE layer step. Through
torch (`aten._scaled_mm_v2`) a dense call cost 42 us of host time on the H100 machine (torch
2.11, cuBLAS 13.1), 19 us of it the algorithm search (`cublasLtMatmulAlgoGetHeuristic`) that
torch repeats on every call. Made here with the algorithm, layouts and descriptor kept between
calls the same cuBLASLt call cost 25 us, and the output is the same bits (tests/test_gemm.py
checks that on the GPU). A grouped fprop of 32 groups at the DeepSeek-V3 shard took 1.2 ms of
host time against 2.6 ms through torch, a grouped wgrad 1.3 against 1.9 ms (`Caller.many`: raw
offsets, no tensor views per group).

cuBLASLt also has a grouped mode (CUBLASLT_BATCH_MODE_GROUPED: shapes and pointers on the device,
one launch) that takes these scalings on Hopper, but not in the cuBLAS 13.1 that torch 2.11 ships
with (no `cublasLtGroupedMatrixLayoutCreate`, the layout attributes refused).

What is kept
------------
- One cuBLASLt handle and matmul descriptor per (thread, device, scaling pair, output dtype);
  the descriptor's scale pointers are set per call. Per thread because the forward and the
  backward of a compiled graph run on different threads.
- Matrix layouts per (dtype, rows, cols, ld).
- The algorithm per problem and pointer alignment; in fprop/dgrad per power-of-two class of the
  group's rows, so a new routing does not search again for every new group size (wgrad searches
  per token count). Should cuBLAS refuse a cached algorithm for an actual size, the algorithm is
  searched for that exact size and kept for it; should that fail too, cublas.py runs the whole
  grouped GEMM again through torch.
- A 32 MiB workspace per (device, stream).

The library is the libcublasLt that torch loaded (found in the process's maps), so versions
cannot mix. Used on CUDA only, where `probe()` (a small GEMM of the same kind, compared with the
torch call) passes; `FP8FLOW_CUBLASLT=0` turns it off, and then cublas.py calls torch.

The problem, as cuBLAS sees it
------------------------------
Every use here is out[m, n] = sum_k a[m, k] * b[n, k] with a, b and out row-major (their rows
may be strided, the elements contiguous). cuBLAS is column-major, so it computes out^T [n, m] =
op(B) @ A^T with its A = our b (rows k, cols n, transposed: "T") and its B = our a (rows k,
cols m: "N"), the TN form Hopper FP8 needs. Scales: 1x128 tiles along k given as a packed
[rows, k / 128] column-major tensor (VEC128_32F), or 128x128 blocks given as the row-major
[n / 128, k / 128] grid with a row stride that is a multiple of 4 (BLK128x128_32F).
"""

from __future__ import annotations

import contextlib
import ctypes as C
import functools
import os
import threading

import torch

# cuBLAS / CUDA enum values (cublasLt.h, library_types.h, cublas_api.h)
_COMPUTE_32F = 68
_R_32F, _R_16BF, _R_16F, _R_8F_E4M3, _R_8F_E5M2 = 0, 14, 2, 28, 29
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER = 17, 18
_DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 31, 32
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT_BYTES = (5, 6, 7, 8)  # of cuBLAS's A, B, C, D
_STATUS_INVALID_VALUE, _STATUS_NOT_SUPPORTED = 7, 15
#: Scaling modes by the fp8flow name of the layout.
VEC128, BLK128 = 4, 5
#: Scaling pair (ours a, ours b) per kind of call. fprop/dgrad: 1x128 activations times 128x128
#: weight blocks. wgrad: both operands 1x128 along the tokens, or one of them (wgrad_a: a,
#: wgrad_b: b) in 128x128 blocks, as the scaling-aware transpose's scales are. H100, cuBLAS 13.1,
#: one DeepSeek-V3 FC1 wgrad group ([4096, 2048] x [7168, 2048]^T): 888 TFLOP/s with 1x128 x
#: 1x128, 1073 with b in blocks, 1089 with a in blocks; the same bits (benchmarks/kernels.py
#: `wgrad_blocks`).
MODES = {"fwd": (VEC128, BLK128), "wgrad": (VEC128, VEC128), "wgrad_a": (BLK128, VEC128),
         "wgrad_b": (VEC128, BLK128)}
#: A call's 128x128 scale grid is [cdiv(rows, 128), cdiv(k, 128)] row-major with the row stride
#: rounded up to a multiple of this (cuBLAS reads it so; found on the H100).
GRID_LD = 4

#: First cuBLASLt with the 1x128 / 128x128 scaling modes (CUDA 12.9).
MIN_VERSION = 120900
WORKSPACE = 32 << 20
#: Streams one grouped GEMM's calls are spread over: the current stream and STREAMS - 1 side
#: streams that fork from it and join it again before `many` returns. One group's GEMM ends in
#: a partial wave of output tiles; on a second stream the next group's GEMM fills it. H100,
#: DeepSeek-V3 shard, balanced routing: 84 -> 89% of the dense cuBLAS rate for the FC1 fprop,
#: 91 -> 99% for the FC2 dgrad, 85 -> 90% for the FC1 wgrad with 2 streams; 3 and 4 streams
#: were no better. `FP8FLOW_GEMM_STREAMS=1` keeps every call on the current stream.
STREAMS = int(os.environ.get("FP8FLOW_GEMM_STREAMS", "2"))

_DTYPES = {torch.float8_e4m3fn: _R_8F_E4M3, torch.float8_e5m2: _R_8F_E5M2,
           torch.bfloat16: _R_16BF, torch.float16: _R_16F, torch.float32: _R_32F}

_enabled = os.environ.get("FP8FLOW_CUBLASLT", "1")
if _enabled not in ("0", "1"):
    raise ValueError(f"FP8FLOW_CUBLASLT={_enabled!r}: must be 0 or 1")


class _Algo(C.Structure):
    _fields_ = [("data", C.c_uint64 * 8)]


class _Heuristic(C.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", C.c_size_t), ("state", C.c_int),
                ("wavesCount", C.c_float), ("reserved", C.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


def _find_library() -> str:
    """The path of the libcublasLt torch has loaded (torch's CUDA init loads it)."""
    with open("/proc/self/maps") as f:
        for line in f:
            for token in line.split():
                if "libcublasLt.so" in token:
                    return token
    return "libcublasLt.so"


@functools.cache
def _lib() -> C.CDLL:
    torch.cuda.init()
    if not any("libcublasLt.so" in line for line in open("/proc/self/maps")):
        # torch loads cuBLASLt lazily on some builds: a small matmul brings it in
        a = torch.ones(16, 16, device="cuda")
        a @ a
    lib = C.CDLL(_find_library())
    vp, i, sz = C.c_void_p, C.c_int, C.c_size_t
    sigs = {
        "cublasLtCreate": [vp],
        "cublasLtMatmulDescCreate": [vp, i, i],
        "cublasLtMatmulDescSetAttribute": [vp, i, vp, sz],
        "cublasLtMatrixLayoutCreate": [vp, i, C.c_uint64, C.c_uint64, C.c_int64],
        "cublasLtMatrixLayoutDestroy": [vp],
        "cublasLtMatmulPreferenceCreate": [vp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i, vp, sz],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i, vp, vp],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, C.c_int
    lib.cublasLtGetVersion.restype = C.c_size_t
    lib.cublasLtGetStatusName.restype = C.c_char_p
    lib.cublasLtGetStatusName.argtypes = [C.c_int]
    return lib


def _check(status: int, what: str) -> None:
    if status:
        name = _lib().cublasLtGetStatusName(status).decode()
        raise CublasLtError(f"cuBLASLt {what}: {name} ({status})")


def version() -> int:
    return int(_lib().cublasLtGetVersion())


def _alignment(ptr: int) -> int:
    """The largest power of two up to 256 that divides the address."""
    return min(ptr & -ptr, 256) if ptr else 256


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Runner:
    """out[m, n] = a[m, k] . b[n, k] for one (device, scaling pair, output dtype), on one
    thread."""

    def __init__(self, device: torch.device, mode_a: int, mode_b: int, out_dtype: torch.dtype,
                 vary_m: bool):
        lib = self.lib = _lib()
        self.device = device
        self.vary_m = vary_m  # the dim that varies between groups: m (fprop/dgrad) or k (wgrad)
        self.out_type = _DTYPES[out_dtype]
        with torch.cuda.device(device):
            self.handle = C.c_void_p()
            _check(lib.cublasLtCreate(C.byref(self.handle)), "create")
        self.desc = C.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(C.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        # cuBLAS's A is our b (scale mode_b), its B our a (mode_a)
        for attr, v in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N),
                        (_DESC_A_SCALE_MODE, mode_b), (_DESC_B_SCALE_MODE, mode_a)):
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, C.byref(C.c_int32(v)), 4),
                   f"descriptor attribute {attr}")
        self.pref = C.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(C.byref(self.pref)), "preference")
        _check(lib.cublasLtMatmulPreferenceSetAttribute(
            self.pref, _PREF_MAX_WORKSPACE_BYTES, C.byref(C.c_uint64(WORKSPACE)), 8), "workspace")
        self.layouts: dict[tuple, C.c_void_p] = {}
        self.algos: dict[tuple, _Algo] = {}
        self.alpha, self.beta = C.c_float(1.0), C.c_float(0.0)
        self.a_scale, self.b_scale = C.c_void_p(), C.c_void_p()
        self.a_scale_ref, self.b_scale_ref = C.byref(self.a_scale), C.byref(self.b_scale)

    def layout(self, dtype: int, rows: int, cols: int, ld: int) -> C.c_void_p:
        key = (dtype, rows, cols, ld)
        lay = self.layouts.get(key)
        if lay is None:
            lay = C.c_void_p()
            _check(self.lib.cublasLtMatrixLayoutCreate(C.byref(lay), dtype, rows, cols, ld),
                   "layout")
            self.layouts[key] = lay
        return lay

    def search(self, la, lb, ld, align: tuple[int, int, int]) -> _Algo:
        """The first algorithm of cuBLAS's search for these layouts and pointer alignments
        (cuA, cuB, D), in bytes: the search otherwise assumes 256-byte-aligned buffers."""
        for attr, v in zip(_PREF_MIN_ALIGNMENT_BYTES, (align[0], align[1], align[2], align[2])):
            _check(self.lib.cublasLtMatmulPreferenceSetAttribute(
                self.pref, attr, C.byref(C.c_uint32(v)), 4), "alignment preference")
        res = (_Heuristic * 1)()
        count = C.c_int(0)
        _check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, la, lb, ld, ld,
                                                       self.pref, 1, res, C.byref(count)),
               "algorithm search")
        if count.value == 0:
            raise CublasLtError("cuBLASLt algorithm search: no algorithm for this problem")
        return res[0].algo

    def __call__(self, a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out: torch.Tensor, stream: int, workspace: int) -> None:
        m, k = a.shape
        self.mm(_DTYPES[a.dtype], _DTYPES[b.dtype], a.data_ptr(), a.stride(0), b.data_ptr(),
                b.stride(0), out.data_ptr(), out.stride(0), m, b.shape[0], k, a_s.data_ptr(),
                b_s.data_ptr(), stream, workspace)

    def mm(self, ta: int, tb: int, pa: int, lda: int, pb: int, ldb: int, po: int, ldo: int,
           m: int, n: int, k: int, pas: int, pbs: int, stream: int, workspace: int) -> None:
        """The call on raw addresses: a at pa ([m, k], row stride lda elements), b at pb
        ([n, k], ldb), out at po ([m, n], ldo), scales of a at pas and of b at pbs."""
        if len(self.layouts) > 4096 or len(self.algos) > 4096:
            # routings come and go: keep the caches bounded (cleared here, before this call
            # takes any layout, so none it uses is destroyed under it)
            for old in self.layouts.values():
                self.lib.cublasLtMatrixLayoutDestroy(old)
            self.layouts.clear()
            self.algos.clear()
        la = self.layout(tb, k, n, ldb)
        lb = self.layout(ta, k, m, lda)
        ld = self.layout(self.out_type, n, m, ldo)
        self.a_scale.value = pbs
        self.b_scale.value = pas
        align = (_alignment(pb), _alignment(pa), _alignment(po))
        lib = self.lib
        if lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_A_SCALE_POINTER, self.a_scale_ref,
                                              8) or \
                lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_B_SCALE_POINTER,
                                                   self.b_scale_ref, 8):
            raise CublasLtError("cuBLASLt: setting the scale pointers failed")
        # fprop/dgrad: the algorithm of the power-of-two class of the group's rows (the tile
        # configuration does not depend on m; K is fixed). wgrad: searched per token count, as
        # a split of the contracted dim found for another k is not reused.
        mb, kb = (_pow2(m), k) if self.vary_m else (m, k)
        key = (ta, tb, mb, n, kb, lda, ldb, ldo, align)
        algo = self.algos.get(key)
        if algo is None:
            algo = self.algos[key] = self.search(
                self.layout(tb, kb, n, max(ldb, kb)), self.layout(ta, kb, mb, max(lda, kb)),
                self.layout(self.out_type, n, mb, max(ldo, n)), align)
        status = lib.cublasLtMatmul(self.handle, self.desc, C.byref(self.alpha), pb, la, pa, lb,
                                    C.byref(self.beta), po, ld, po, ld, C.byref(algo), workspace,
                                    WORKSPACE, stream)
        if status in (_STATUS_INVALID_VALUE, _STATUS_NOT_SUPPORTED):
            # the class's algorithm does not take this exact size: search for it and keep it
            exact = (ta, tb, m, n, k, lda, ldb, ldo, align, "exact")
            algo = self.algos.get(exact)
            if algo is None:
                algo = self.algos[exact] = self.search(la, lb, ld, align)
            status = lib.cublasLtMatmul(self.handle, self.desc, C.byref(self.alpha), pb, la, pa,
                                        lb, C.byref(self.beta), po, ld, po, ld, C.byref(algo),
                                        workspace, WORKSPACE, stream)
        _check(status, f"matmul [{m}, {k}] x [{n}, {k}]^T")


_local = threading.local()
_nullcontext = contextlib.nullcontext()
_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_ws_lock = threading.Lock()


def _workspace(device: torch.device, stream: torch.cuda.Stream) -> int:
    key = (device.index, stream.cuda_stream)
    ws = _workspaces.get(key)
    if ws is None:
        with _ws_lock:
            ws = _workspaces.setdefault(
                key, torch.empty(WORKSPACE, dtype=torch.uint8, device=device))
    return ws.data_ptr()


_sides: dict[tuple[int, int], list[torch.cuda.Stream]] = {}


def _side_streams(device: torch.device, main: torch.cuda.Stream, n: int
                  ) -> list[torch.cuda.Stream]:
    """n side streams kept for (device, main stream), made on first use."""
    key = (device.index, main.cuda_stream)
    sides = _sides.get(key)
    if sides is None or len(sides) < n:
        with _ws_lock:
            sides = _sides.get(key) or []
            sides = sides + [torch.cuda.Stream(device=device) for _ in range(n - len(sides))]
            _sides[key] = sides
    return sides[:n]


def split_calls(calls: list[tuple], streams: int) -> list[list[tuple]]:
    """The entries of `Caller.many` dealt to `streams` lists in call order, each to the list
    with the fewest multiply-adds (m * n * k) so far; empty lists dropped."""
    if streams <= 1 or len(calls) < 2:
        return [calls]
    parts: list[list[tuple]] = [[] for _ in range(streams)]
    work = [0] * streams
    for c in calls:
        j = work.index(min(work))
        parts[j].append(c)
        work[j] += c[1] * c[3] * c[4]
    return [p for p in parts if p]


class Caller:
    """A GEMM callable with the signature of cublas.dense_fwd / dense_wgrad, bound to the
    current stream of `device` when made: make one per grouped GEMM, call it per group."""

    def __init__(self, device: torch.device, kind: str, out_dtype: torch.dtype):
        runners = getattr(_local, "runners", None)
        if runners is None:
            runners = _local.runners = {}
        key = (device.index, kind, out_dtype)
        run = runners.get(key)
        if run is None:
            run = runners[key] = _Runner(device, *MODES[kind], out_dtype, vary_m=kind == "fwd")
        self.kind = kind
        self.run = run
        stream = self.main = torch.cuda.current_stream(device)
        self.stream = stream.cuda_stream
        self.workspace = _workspace(device, stream)
        # kernels launch on the current device: switch to the tensors' device if it is another
        self.device = device if device.index != torch.cuda.current_device() else None

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device is not None else _nullcontext

    def __call__(self, a_q, a_s_cm, b_q, b_s, out) -> None:
        with self._on_device():
            self.run(a_q, a_s_cm, b_q, b_s, out, self.stream, self.workspace)

    def many(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
             calls: list[tuple[int, int, int, int, int, int, int, int]],
             streams: int = 1) -> None:
        """One call per entry on raw offsets from the bases of a, b and out (tensors whose rows
        are contiguous): entries (a offset, m, b offset, n, k, out offset, address of a's scales,
        address of b's scales), offsets in elements, row strides those of the bases. The
        grouped loops use this to skip making tensor views per group: host time is what
        limits them.

        streams > 1 spreads the calls over that many streams (split_calls); the caller
        guarantees that no two entries write the same output. The side streams wait for the
        current stream before their first call and the current stream waits for them before
        this returns, also when a call fails, so the tensors are used in stream order."""
        parts = split_calls(calls, streams)
        with self._on_device():
            if len(parts) == 1:
                self._loop(a, b, out, parts[0], self.stream, self.workspace)
                return
            sides = _side_streams(self.main.device, self.main, len(parts) - 1)
            fork = torch.cuda.Event()
            fork.record(self.main)
            for side in sides:
                side.wait_event(fork)
            try:
                self._loop(a, b, out, parts[0], self.stream, self.workspace)
                for side, part in zip(sides, parts[1:]):
                    self._loop(a, b, out, part, side.cuda_stream,
                               _workspace(self.main.device, side))
            finally:
                for side in sides:
                    join = torch.cuda.Event()
                    join.record(side)
                    self.main.wait_event(join)

    def _loop(self, a, b, out, calls, stream: int, ws: int) -> None:
        ta, tb = _DTYPES[a.dtype], _DTYPES[b.dtype]
        pa0, pb0, po0 = a.data_ptr(), b.data_ptr(), out.data_ptr()
        ea, eb, eo = a.element_size(), b.element_size(), out.element_size()
        lda, ldb, ldo = a.stride(0), b.stride(0), out.stride(0)
        mm = self.run.mm
        for oa, m, ob, n, k, oo, pas, pbs in calls:
            mm(ta, tb, pa0 + oa * ea, lda, pb0 + ob * eb, ldb, po0 + oo * eo, ldo, m, n, k,
               pas, pbs, stream, ws)


def enabled() -> bool:
    return _enabled == "1"


def set_enabled(on: bool) -> None:
    """Call cuBLASLt directly (True, the default) or through torch (False)."""
    global _enabled
    _enabled = "1" if on else "0"


@functools.cache
def probe(device_index: int, kind: str, out_dtype: torch.dtype) -> str | None:
    """None if a small GEMM of this kind through the direct call gives what the torch call
    gives on this device, else the reason (the loop then calls torch)."""
    from ..recipe import TILE
    from .cublas import ALIGN, K_BLOCKS, col_major, dense_fwd, dense_wgrad, grid_ld
    from .groups import cdiv
    dev = torch.device("cuda", device_index)
    try:
        if version() < MIN_VERSION:
            return f"cuBLASLt {version()} predates blockwise FP8 scaling ({MIN_VERSION})"
        g = torch.Generator(device=dev).manual_seed(0)
        fp8 = torch.float8_e4m3fn
        m, n, kb = 2 * ALIGN, 2 * TILE, K_BLOCKS

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=dev)

        def scales(*shape):
            return torch.exp2(torch.randint(-3, 4, shape, generator=g, device=dev).float())

        if kind != "fwd":
            m = n  # wgrad: two 128-row blocks on either side
        a, b = rnd(m, kb * TILE).to(fp8), rnd(n, kb * TILE).to(fp8)
        a_s = col_major(scales(m, kb))
        ref = torch.empty(m, n, dtype=out_dtype, device=dev)
        if kind == "fwd":
            b_s = scales(n // TILE, kb)
            dense_fwd(a, a_s, b, b_s, ref)
            args = (a, a_s, b, b_s)
        elif kind == "wgrad":
            b_s = col_major(scales(n, kb))
            dense_wgrad(a, a_s, b, b_s, ref)
            args = (a, a_s, b, b_s)
        else:
            # One operand in 128x128 blocks against torch's call with its scales per row. The
            # block operand has a partial last block (272 rows) and 5 token tiles, so its grid
            # has padding slots (row stride GRID_LD * 2), filled with NaN: a call that read the
            # grid with another row stride, or read the padding, gives NaN or wrong values.
            kb, rows_blk, rows_other = K_BLOCKS + 1, 2 * TILE + ALIGN, 2 * TILE
            blk = rnd(rows_blk, kb * TILE).to(fp8)
            other = rnd(rows_other, kb * TILE).to(fp8)
            other_s = col_major(scales(rows_other, kb))
            grid = scales(cdiv(rows_blk, TILE), kb)
            ld = grid_ld(kb)
            padded = torch.full((grid.shape[0], ld), float("nan"), device=dev)
            padded[:, :kb] = grid
            per_row = col_major(grid.repeat_interleave(TILE, 0)[:rows_blk])
            if kind == "wgrad_a":
                a, b, m, n = blk, other, rows_blk, rows_other
                ref = torch.empty(m, n, dtype=out_dtype, device=dev)
                dense_wgrad(a, per_row, b, other_s, ref)
                args = (a, padded, b, other_s)
            else:
                a, b, m, n = other, blk, rows_other, rows_blk
                ref = torch.empty(m, n, dtype=out_dtype, device=dev)
                dense_wgrad(a, other_s, b, per_row, ref)
                args = (a, other_s, b, padded)
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=dev)
        Caller(dev, kind, out_dtype)(*args, out)
        torch.cuda.synchronize(dev)
        if out.isnan().any() or not torch.allclose(out.float(), ref.float(), rtol=1e-2,
                                                    atol=1e-2):
            err = (out.float() - ref.float()).abs().max().item()
            return f"the direct cuBLASLt call differs from torch's by up to {err:.3g}"
    except (OSError, AttributeError, KeyError, TypeError, ValueError, C.ArgumentError,
            CublasLtError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None
