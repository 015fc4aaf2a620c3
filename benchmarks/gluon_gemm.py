"""Probe: a blockwise FP8 GEMM written in Gluon (Triton's tile-level dialect) with asynchronous
wgmma, against cuBLAS and the project's Triton kernel. An experiment, not used by the backend.

Why: the layer's GEMMs run as one cuBLAS call per expert group (kernels/cublas.py). cuBLAS's
blockwise kernels reach 1100-1200 TFLOP/s on the H100; the project's Triton kernel (kernels/gemm.py)
about 750, because Triton's Hopper pipeliner keeps a wgmma in flight only when its result feeds
the next dot unchanged, and a blockwise GEMM scales every K block's product before adding it
(`acc += dot(a, b) * sa[:, None] * sb`). A device-side grouped GEMM at cuBLAS's rate would drop
the per-group host loop and its host copy of the group ends; one faster than cuBLAS is what the
1.6x target at the DeepSeek-V3 shape needs. Gluon exposes the wgmma's asynchrony directly
(`warpgroup_mma(is_async=True)`, `warpgroup_mma_wait(num_outstanding)`), so the product of K
block k can be promoted with its scales while the MMA of block k + 1 runs.

The kernel: fprop form, out [M, N] bf16 = a [M, K] (1x128 scales) @ b [N, K]^T (128x128 blocks),
one 128 x 128 output tile per program, 8 warps (two warpgroups of 64 rows), K blocks of 128
streamed by TMA through a ring of STAGES shared-memory buffers, each block's MMA into a fresh
accumulator (`use_acc=False`), promoted into the fp32 sum with the block's power-of-two scales.
Forms (MODE):

- 0 "pair": two accumulators in turn, the loop unrolled by two; block k's MMA is issued before
  block k - 1 is waited for (`num_outstanding=1`) and promoted.
- 1 "wait": each block's MMAs issued back to back, waited for, then promoted (inside a program
  the promotion overlaps no MMA; with 64-row tiles, 4 warps and 3 stages, up to three programs
  fit on a multiprocessor by their registers and shared memory, and can overlap each other).
- 2 "rolled": as 0 without the unrolling (the in-flight accumulator carried through the loop).
  ptxas then serializes every wgmma (its note C7514: non-wgmma instructions read accumulator
  registers of a wgmma in flight), which `--compile-only` shows without a GPU.

Measured (H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, 2026-11-24; median of
`triton.testing.do_bench`, TFLOP/s, two runs on one machine as "first / second"; relative error
against a float32 product of the dequantized operands 1.66e-3 for every kernel and shape, the
bf16 output's rounding; ptxas: 214 registers for "pair", 148 for "wait", no spills):

| M x N x K | cuBLAS | Triton | pair | wait | wait, 64 rows | rolled |
|---|---|---|---|---|---|---|
| 2048x4096x7168 (1) | 1204 / 1188 | 756 / 754 | **796 / 786** | 635 / 637 | 729 / 729 | 554 / 550 |
| 2048x7168x2048 (2) | 1065 / 1071 | 626 / 628 | 701 / 617 | 500 / 594 | **701 / 695** | 528 / 530 |
| 8192x8192x8192 | 1112 / 1124 | 750 / 752 | **781 / 779** | 656 / 659 | 708 / 704 | 581 / 584 |

(1) DeepSeek-V3's FC1 for one expert group, (2) its FC2; "wait, 64 rows": 4 warps, 3 stages.
A third run, on another machine, read the 8192-cube row within 2% of these and the FC2 row's
64-row form at 489: the FC2 shape's short K loop (16 blocks) makes its readings move most.

So the asynchronous MMA makes the blockwise kernel 4-12% faster than the Triton kernel; the best
form per shape reaches 65-70% of cuBLAS. What it lacks against the structure of CUTLASS's Hopper
kernels (not tried here): a warp-specialized TMA producer, a persistent tile scheduler that
overlaps one tile's epilogue with the next tile's main loop, and larger or clustered tiles. And
Gluon kernels cannot run under TRITON_INTERPRET, so the CPU test suite could not check them.
The backend keeps cuBLAS.

    python benchmarks/gluon_gemm.py                 # check and time (Hopper GPU)
    python benchmarks/gluon_gemm.py --compile-only  # build for sm_90a here, print ptxas's notes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"pair": 0, "wait": 1, "rolled": 2}
BLOCK_K = 128  # the scale tile


@gluon.jit
def _load(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb, s):
    """TMA loads of K block kb of the A and B tiles into ring slot s."""
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, kb * 128], bar, a_bufs.index(s))
    tma.async_copy_global_to_shared(b_desc, [off_n, kb * 128], bar, b_bufs.index(s))


@gluon.jit
def _mma(bars, a_bufs, b_bufs, zero, kb, STAGES: gl.constexpr):
    """Wait for K block kb's tiles and start its MMA into a fresh accumulator."""
    s = kb % STAGES
    mbarrier.wait(bars.index(s), phase=(kb // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                         is_async=True)


@gluon.jit
def _scale(as_ptr, bs_ptr, kb, M, rows, rmask, b_row):
    """The power-of-two scale of each tile row for K block kb: sa[row] * sb."""
    sa = gl.load(as_ptr + kb * M + rows, mask=rmask, other=1.0)
    return sa * gl.load(bs_ptr + b_row + kb)


@gluon.jit
def _refill(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb, KB, STAGES: gl.constexpr):
    """K block kb's MMA is done: load block kb + STAGES into its slot."""
    if kb + STAGES < KB:
        _load(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb + STAGES, kb % STAGES)


@gluon.jit
def gemm_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, KB, stride_bs,
                STAGES: gl.constexpr, GROUP_M: gl.constexpr, MODE: gl.constexpr,
                num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    N = c_desc.shape[1]
    # grouped tile order: GROUP_M row tiles share their B columns in L2
    pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    width = GROUP_M * gl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    rows_here = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    b_row = pid_n * stride_bs  # BLOCK_N == 128: one 128x128 scale per K block

    layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32])
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape,
                                       a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape,
                                       b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        if i < KB:
            _load(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, i, i)

    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    rmask = rows < M
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
    zero = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
    if MODE == 1:
        for kb in range(KB):
            sc = _scale(as_ptr, bs_ptr, kb, M, rows, rmask, b_row)
            t = warpgroup_mma_wait(num_outstanding=0,
                                   deps=(_mma(bars, a_bufs, b_bufs, zero, kb, STAGES), ))
            acc += t * sc[:, None]
            _refill(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb, KB, STAGES)
    elif MODE == 2:
        prev = _mma(bars, a_bufs, b_bufs, zero, 0, STAGES)
        for kb in range(1, KB):
            sc = _scale(as_ptr, bs_ptr, kb - 1, M, rows, rmask, b_row)
            cur = _mma(bars, a_bufs, b_bufs, zero, kb, STAGES)
            acc += warpgroup_mma_wait(num_outstanding=1, deps=(prev, )) * sc[:, None]
            _refill(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb - 1, KB, STAGES)
            prev = cur
        sc = _scale(as_ptr, bs_ptr, KB - 1, M, rows, rmask, b_row)
        acc += warpgroup_mma_wait(num_outstanding=0, deps=(prev, )) * sc[:, None]
    else:
        # x holds the MMA in flight of an even K block, y that of an odd one
        x = _mma(bars, a_bufs, b_bufs, zero, 0, STAGES)
        for kb in range(1, KB - 1, 2):
            sc = _scale(as_ptr, bs_ptr, kb - 1, M, rows, rmask, b_row)
            y = _mma(bars, a_bufs, b_bufs, zero, kb, STAGES)
            acc += warpgroup_mma_wait(num_outstanding=1, deps=(x, )) * sc[:, None]
            _refill(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb - 1, KB, STAGES)
            sc = _scale(as_ptr, bs_ptr, kb, M, rows, rmask, b_row)
            x = _mma(bars, a_bufs, b_bufs, zero, kb + 1, STAGES)
            acc += warpgroup_mma_wait(num_outstanding=1, deps=(y, )) * sc[:, None]
            _refill(a_desc, b_desc, bars, a_bufs, b_bufs, off_m, off_n, kb, KB, STAGES)
        if KB % 2 == 0:  # block KB - 2 in flight in x, block KB - 1 still to go
            sc = _scale(as_ptr, bs_ptr, KB - 2, M, rows, rmask, b_row)
            y = _mma(bars, a_bufs, b_bufs, zero, KB - 1, STAGES)
            acc += warpgroup_mma_wait(num_outstanding=1, deps=(x, )) * sc[:, None]
            sc = _scale(as_ptr, bs_ptr, KB - 1, M, rows, rmask, b_row)
            acc += warpgroup_mma_wait(num_outstanding=0, deps=(y, )) * sc[:, None]
        else:  # block KB - 1 in flight in x
            sc = _scale(as_ptr, bs_ptr, KB - 1, M, rows, rmask, b_row)
            acc += warpgroup_mma_wait(num_outstanding=0, deps=(x, )) * sc[:, None]
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c_smem.store(acc.to(c_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)


def _descriptors(a, b, out, block_m: int):
    f8 = gl.float8e4nv
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, BLOCK_K],
                              gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K], f8))
    b_desc = TensorDescriptor(b, list(b.shape), list(b.stride()), [128, BLOCK_K],
                              gl.NVMMASharedLayout.get_default_for([128, BLOCK_K], f8))
    c_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [block_m, 128],
                              gl.NVMMASharedLayout.get_default_for([block_m, 128], gl.bfloat16))
    return a_desc, b_desc, c_desc


def gemm(a, a_s_km, b, b_s, out, mode: str = "pair", block_m: int = 128, stages: int = 4,
         group_m: int = 8):
    """out [M, N] bf16 = a [M, K] e4m3 with 1x128 scales @ (b [N, K] e4m3 with 128x128 scales
    b_s [N/128, K/128])^T. a's scales K-block-major, a_s_km [K/128, M] contiguous (one block's
    row scales contiguous: `a_s.t().contiguous()` of the usual [M, K/128]). K and N multiples
    of 128, M any."""
    M, K = a.shape
    N = b.shape[0]
    if K % BLOCK_K or N % 128 or K == 0:
        raise ValueError(f"K={K} and N={N} must be positive multiples of 128")
    if tuple(a_s_km.shape) != (K // BLOCK_K, M) or not a_s_km.is_contiguous():
        raise ValueError(f"a_s_km must be a contiguous [{K // BLOCK_K}, {M}] tensor")
    grid = (triton.cdiv(M, block_m) * (N // 128),)
    gemm_kernel[grid](*_descriptors(a, b, out, block_m), a_s_km, b_s, M, K // BLOCK_K,
                      b_s.stride(0), stages, group_m, MODES[mode], num_warps=block_m // 16)
    return out


def compile_only(mode: str, block_m: int = 128, stages: int = 4) -> str:
    """Build the kernel for sm_90a on a machine without a GPU; returns ptxas's notes (registers,
    spills, and C7514 where it serializes the wgmmas)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    class _Meta:  # what TensorDescriptor reads of a tensor
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, dtype

        def data_ptr(self):
            return 1 << 20

        def stride(self):
            return (self.shape[1], 1)

    M, N, K = 2048, 4096, 7168
    descs = _descriptors(_Meta([M, K], torch.float8_e4m3fn), _Meta([N, K], torch.float8_e4m3fn),
                         _Meta([M, N], torch.bfloat16), block_m)
    sig = {name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
           for name, d in zip(("a_desc", "b_desc", "c_desc"), descs)}
    sig.update(as_ptr="*fp32", bs_ptr="*fp32", M="i32", KB="i32", stride_bs="i32",
               STAGES="constexpr", GROUP_M="constexpr", MODE="constexpr", num_warps="constexpr")
    names = gemm_kernel.arg_names
    consts = {(names.index("STAGES"),): stages, (names.index("GROUP_M"),): 8,
              (names.index("MODE"),): MODES[mode], (names.index("num_warps"),): block_m // 16}
    kernel = triton.compile(GluonASTSource(gemm_kernel, sig, consts),
                            target=GPUTarget("cuda", 90, 64),
                            options={"num_warps": block_m // 16})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    return res.stdout + res.stderr


SHAPES = [(2048, 4096, 7168), (2048, 7168, 2048), (8192, 8192, 8192)]
VARIANTS = [("pair", 128, 4), ("wait", 128, 4), ("wait", 64, 3), ("rolled", 128, 4)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-only", action="store_true")
    args = p.parse_args()
    if args.compile_only:
        for mode in MODES:
            notes = [ln for ln in compile_only(mode).splitlines()
                     if "registers" in ln or "C7514" in ln or "spill" in ln]
            print(f"{mode}:", *notes, sep="\n  ")
        return
    from benchmarks.common import bench_ms, env_line, rel_err
    from fp8flow_compile.kernels import cublas as CB
    from fp8flow_compile.kernels import gemm as G
    dev = torch.device("cuda")
    print(env_line())
    rows = []
    for M, N, K in SHAPES:
        g = torch.Generator(device=dev).manual_seed(M + N + K)
        a = (torch.randn(M, K, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
        b = (torch.randn(N, K, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
        a_s = torch.exp2(torch.randint(-4, 4, (M, K // 128), device=dev, generator=g).float())
        b_s = torch.exp2(torch.randint(-4, 4, (N // 128, K // 128), device=dev,
                                       generator=g).float())
        ref = (a.float() * a_s.repeat_interleave(128, 1)) @ (
            b.float() * b_s.repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
        a_s_cm, a_s_km = CB.col_major(a_s), a_s.t().contiguous()  # made once, not timed
        # each run writes out (poisoned with NaN first) or returns its own output; the Triton
        # kernel allocates its output, as the backend calls it
        runs = {"cublas": lambda out: CB.dense_fwd(a, a_s_cm, b, b_s, out),
                "triton": lambda out: G.gemm_fp8_triton(a, a_s, b, b_s)}
        for mode, bm, st in VARIANTS:
            runs[f"gluon {mode} {bm}x128 s{st}"] = (
                lambda out, mode=mode, bm=bm, st=st: gemm(a, a_s_km, b, b_s, out, mode, bm, st))
        for name, fn in runs.items():
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
            res = fn(out)
            res = out if res is None else res
            torch.cuda.synchronize()
            err = rel_err(res, ref)  # NaN if a tile was missed
            ms = bench_ms(lambda: fn(out))
            rows.append((f"{M}x{N}x{K}", name, ms, 2 * M * N * K / ms / 1e9, err))
            print(*rows[-1], flush=True)
    print(f"\n{'M x N x K':18} {'kernel':24} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for shape, name, ms, tf, err in rows:
        print(f"{shape:18} {name:24} {ms:8.4f} {tf:8.0f} {err:9.2e}")


if __name__ == "__main__":
    main()
