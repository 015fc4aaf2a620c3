"""Optional: DeepGEMM's m-grouped blockwise FP8 GEMM for the grouped fprop and dgrad on Hopper.

DeepGEMM (github.com/deepseek-ai/DeepGEMM, built from source; not a dependency of this package)
has a grouped GEMM with the recipe's scaling pair, rows 1x128 times weights 128x128, that runs
all groups in one persistent kernel. Where it is installed, `cublas.grouped_fwd` hands it the
grouped fprop and dgrad whose group layout it can read, instead of looping over cuBLAS once per
group. Measured on the H100 at the DeepSeek-V3 shard's four fprop/dgrad shapes (docs/benchmarks.md,
round v): the same output bits as the cuBLAS loop, and 10-14% less time per call at the board's
power limit.

What it can read: every group but the last starts on a multiple of `alignment()` rows (128 on
Hopper), i.e. offs[:-1] are multiples of it, non-decreasing and within the rows; K and N
multiples of 128; b [E, N, K] contiguous, a [M, K] with unit stride along K, bf16 output.
Expert loads that are multiples of 128 give this layout: torchtitan pads each expert's tokens
to a multiple of its token-group alignment (`set_token_group_alignment_size_m(128)`). Any other
layout, a DeepGEMM without the call, a device that is not sm90, or `FP8FLOW_DEEPGEMM=0` keeps the
cuBLAS loop; so does an error from DeepGEMM (logged once, then the cuBLAS loop).

Before first use a small grouped GEMM through DeepGEMM is compared with the reference
(`gemm.grouped_gemm_fp8_ref`); a DeepGEMM that computes something else is not used. DeepGEMM
compiles each new shape on its first call (seconds, cached on disk by DeepGEMM).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from ..recipe import TILE

log = logging.getLogger("fp8flow_compile")

_enabled = os.environ.get("FP8FLOW_DEEPGEMM", "1") != "0"


def set_enabled(on: bool) -> None:
    """Use DeepGEMM where it is installed and fits (default), or never."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


@functools.cache
def _module():
    """The deep_gemm module with the call this path makes, or None."""
    try:
        dg = importlib.import_module("deep_gemm")
    except Exception as e:  # not installed, or built for another torch / CUDA
        log.debug("fp8flow: DeepGEMM not used: %s: %s", type(e).__name__, e)
        return None
    if not hasattr(dg, "m_grouped_fp8_gemm_nt_contiguous"):
        log.info("fp8flow: DeepGEMM %s has no m_grouped_fp8_gemm_nt_contiguous: not used",
                 getattr(dg, "__version__", "?"))
        return None
    return dg


def installed() -> str | None:
    """The installed DeepGEMM's version if this path can call it, else None."""
    dg = _module()
    return None if dg is None else str(getattr(dg, "__version__", "?"))


def alignment() -> int:
    """Rows per group start that DeepGEMM's contiguous layout needs (128 on Hopper)."""
    dg = _module()
    get = getattr(dg, "get_mk_alignment_for_contiguous_layout", None)
    return int(get()) if get is not None else TILE


def _call(dg, a_q, a_s, b_q, b_s, group_of_row, out) -> None:
    dg.m_grouped_fp8_gemm_nt_contiguous((a_q, a_s), (b_q, b_s), out, group_of_row,
                                        recipe=(1, TILE, TILE))


def group_of_row(offs: torch.Tensor, M: int) -> torch.Tensor:
    """int32 [M]: the group of each row (offs: cumulative group ends), -1 past offs[-1]."""
    rows = torch.arange(M, device=offs.device, dtype=offs.dtype)
    g = torch.searchsorted(offs, rows, right=True, out_int32=True)
    return torch.where(g < offs.numel(), g, -1)


@functools.cache
def _probe(device_index: int) -> str | None:
    """None if DeepGEMM computes a small grouped GEMM as the reference does, else why not."""
    dg = _module()
    if dg is None:
        return "DeepGEMM is not installed"
    dev = torch.device("cuda", device_index)
    major, _ = torch.cuda.get_device_capability(dev)
    if major != 9:
        return f"used on Hopper (sm90) only, this device is sm{major}x"
    from .gemm import grouped_gemm_fp8_ref  # gemm imports cublas, which imports this module
    from .quantize import quantize_1x128_ref, quantize_128x128_ref
    try:
        al = alignment()
        g = torch.Generator(device=dev).manual_seed(0)
        E, N, K = 2, 2 * TILE, 4 * TILE
        M = 2 * al + 40  # a full group, and a last group that ends inside a tile
        a = torch.randn(M, K, device=dev, generator=g).bfloat16()
        w = (torch.randn(E, N, K, device=dev, generator=g) * 0.05).bfloat16()
        a_q, a_s = quantize_1x128_ref(a)
        b_q, b_s = quantize_128x128_ref(w)
        offs = torch.tensor([al, M - 8], dtype=torch.int32, device=dev)
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=dev)
        _call(dg, a_q, a_s, b_q, b_s, group_of_row(offs, M), out)
        out[M - 8:].zero_()
        want = grouped_gemm_fp8_ref(a_q, a_s, b_q, b_s, offs, True, torch.bfloat16)
        torch.cuda.synchronize(dev)
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    except Exception as e:  # what a broken or other build raises
        return f"its probe raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    # both accumulate the same products in fp32 and round once to bf16: a wrong layout or
    # scale reading gives O(1) errors, a different summation order ~1e-3 at most
    if not err < 1e-2:
        return f"its probe differs from the reference (relative error {err:.3g})"
    return None


def fits(a_q: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype,
         ends: list[int], M: int) -> bool:
    """Whether this grouped fprop/dgrad (b [E, N, K], group ends on the host) may go to
    DeepGEMM: shapes, strides, dtype and the group layout; no device work."""
    if not _enabled or _module() is None:
        return False
    N, K = b_q.shape[1], b_q.shape[2]
    if out_dtype != torch.bfloat16 or N % TILE or K % TILE or a_q.stride(1) != 1 or \
            a_q.stride(0) != K or not (b_q.is_contiguous() and b_s.is_contiguous()):
        return False
    al = alignment()
    prev = 0
    for e in ends:
        if e < prev or e > M:
            return False
        prev = e
    return all(e % al == 0 for e in ends[:-1])


def grouped_fwd(a_q, a_s, b_q, b_s, offs, out, rows: int | None = None) -> bool:
    """out[:offs[-1]] = the grouped product through DeepGEMM; False (out untouched) if its
    probe or the call failed, and the caller runs its own path. `fits` must hold.

    rows: offs[-1] where the caller has it on the host. DeepGEMM is then handed only those
    rows: it skips the MMAs of a 128-row block past the last group but still loads its
    operands (its producer does not look at the group), and a layout padded to a static
    height (`align_groups`) has up to 127 rows per group of such blocks at its end."""
    why = _probe(a_q.device.index or 0)
    if why is not None:
        _warn_once(why)
        return False
    M = a_q.shape[0] if rows is None else rows
    try:
        _call(_module(), a_q[:M], a_s[:M].contiguous(), b_q, b_s, group_of_row(offs, M),
              out[:M])
    except RuntimeError as e:
        _warn_once(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False
    return True


@functools.cache
def _warn_once(why: str) -> None:
    log.warning("fp8flow: grouped FP8 GEMMs use the cuBLAS loop, not DeepGEMM: %s", why)
