"""Row scatter-add without atomics: what an MoE layer's combine step (`index_add_`) lowers to.

An MoE layer written in plain PyTorch sums its expert outputs back into token order with
`out.index_add_(0, token, y * w)` (and autograd's backward of the token gather `x[token]` is
the same operation, an `index_put_` with accumulate=True). On the GPU both run as atomic adds
into BF16 rows: at the DeepSeek-V3 shard (65536 rows of 7168 into 8192 tokens) ATen's
`index_add_` took 3.75 ms on the H100 and Inductor's atomic `index_put` 1.08 ms, where reading
the rows once costs about 0.35 ms.

`index_add_rows` computes the same sum as a gather: the row index is sorted once (stable, so
each output row sums its source rows in their original order), and one program per (output
row, column block) reads its source rows and writes the row once:

    out[t] = base[t] + sum over i with index[i] == t, in increasing i, of src[i] * weight[i]
                                                                          [+ src2[i]]

With `src_row`, row i of src (and src2) is read from src[src_row[i]] (nothing where
src_row[i] < 0): the rows reach the sum through an index instead of being gathered first
(passes/align_groups.py, whose expert rows sit in a layout with padding rows between groups).

accumulated in fp32 and rounded once to the output dtype (no atomics, deterministic). Against
the ops it replaces this differs only in rounding, and is at least as accurate: a BF16
`index_add_` rounds after every add (in whatever order the atomics land) and `y * w` rounds the
product to BF16 before the add; here the products and sums stay in fp32.

Index rules follow the op replaced: for `index_add_` an index must lie in [0, T); for
`index_put_` negative indices count from the end (`wrap=True`). Out-of-range indices raise on the
CPU; on CUDA a device-side assert fires (as ATen's own kernels do), since checking on the host
would cost a sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import require
from .common import use_triton
from .groups import cdiv
from .permute import _bits, _load_f32, _store_f32, check_index, permute_pad_ref

_OP = "index_add_rows"
DTYPES = (torch.bfloat16, torch.float32)
_BLOCK_H = 1024
_MAX_R = 8  # source rows an iteration loads together


def _check(base, index, src, weight, num_rows, src2=None, src_row=None):
    def need(cond, msg):
        require(cond, _OP, msg)
    n = index.shape[0] if index.dim() == 1 else -1
    if src_row is not None:
        need(src_row.dim() == 1 and src_row.shape[0] == n and src_row.dtype == torch.int32
             and src_row.device == src.device,
             f"src_row must be int32 [{n}] (one entry per index) on {src.device}, got "
             f"{src_row.dtype} {tuple(src_row.shape)} on {src_row.device}")
        check_index(src_row, _OP, "src_row", 1, src.shape[0], src.device)  # + contiguous, values
    if src2 is not None:
        need(src2.shape == src.shape and src2.dtype == src.dtype and src2.device == src.device,
             f"src2 must have src's shape, dtype and device {tuple(src.shape)} {src.dtype} "
             f"{src.device}, got {tuple(src2.shape)} {src2.dtype} {src2.device}")
    need(src.dim() == 2, f"src must be 2-D, got shape {tuple(src.shape)}")
    need(src.dtype in DTYPES, f"src must be one of {DTYPES}, got {src.dtype}")
    rows = src.shape[0] if src_row is None else n
    need(index.dim() == 1 and index.shape[0] == rows,
         f"index must be 1-D with one entry per src row ({rows}), got {tuple(index.shape)}")
    need(index.dtype in (torch.int32, torch.int64), f"index must be int32/int64, got "
         f"{index.dtype}")
    if base is not None:
        need(tuple(base.shape) == (num_rows, src.shape[1]) and base.dtype == src.dtype,
             f"base must be [{num_rows}, {src.shape[1]}] {src.dtype}, got "
             f"{tuple(base.shape)} {base.dtype}")
    if weight is not None:
        need(weight.numel() == index.shape[0] and weight.dtype in DTYPES,
             f"weight must hold one bf16/fp32 value per src row, got {tuple(weight.shape)} "
             f"{weight.dtype}")
    for t in (base, index, weight):
        need(t is None or t.device == src.device, "all tensors must be on one device")


def _check_plan(order, bounds, n, num_rows):
    def need(cond, msg):
        require(cond, _OP, msg)
    need((order is None) == (bounds is None), "order and bounds come together (index_add_plan)")
    if order is None:
        return
    need(order.dtype == torch.int64 and tuple(order.shape) == (n,),
         f"order must be int64 [{n}] (index_add_plan), got {order.dtype} {tuple(order.shape)}")
    need(bounds.dtype == torch.int64 and tuple(bounds.shape) == (num_rows + 1,),
         f"bounds must be int64 [{num_rows + 1}] (index_add_plan), got {bounds.dtype} "
         f"{tuple(bounds.shape)}")


def _wrapped(index: torch.Tensor, num_rows: int, wrap: bool) -> torch.Tensor:
    return torch.where(index < 0, index + num_rows, index) if wrap else index


# ---------------------------------------------------------------- torch reference (any device)

def _rows_of(x: torch.Tensor, src_row: torch.Tensor | None) -> torch.Tensor:
    """x[src_row] with zero rows where src_row < 0 (x itself without src_row)."""
    return x if src_row is None else permute_pad_ref(x.contiguous(), src_row)


def index_add_rows_ref(base, index, src, weight, num_rows, wrap=False, src2=None, src_row=None):
    src = _rows_of(src, src_row)
    src2 = None if src2 is None else _rows_of(src2, src_row)
    index = _wrapped(index, num_rows, wrap)
    if index.numel() and src.device.type == "cpu":
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_rows:
            raise IndexError(f"fp8flow.{_OP}: index {lo if lo < 0 else hi} is out of range for "
                             f"{num_rows} rows")
    acc = (torch.zeros(num_rows, src.shape[1], dtype=torch.float32, device=src.device)
           if base is None else base.to(torch.float32, copy=True))
    v = src.float()
    if weight is not None:
        v = v * weight.reshape(-1, 1).float()
    if src2 is not None:
        v = v + src2.float()
    # fp32 index_add_ on the CPU adds row by row in increasing i: the kernel's order
    acc.index_add_(0, index.long(), v)
    return acc.to(src.dtype)


# ---------------------------------------------------------------- Triton kernel

@triton.jit
def _index_add_rows_kernel(base_ptr, src_ptr, w_ptr, src2_ptr, order_ptr, bounds_ptr, row_ptr,
                           out_ptr, H, R: tl.constexpr, BLOCK_H: tl.constexpr,
                           HAS_BASE: tl.constexpr, HAS_W: tl.constexpr, HAS_SRC2: tl.constexpr,
                           HAS_ROW: tl.constexpr, BF16: tl.constexpr, W_BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    lo = tl.load(bounds_ptr + t)
    hi = tl.load(bounds_ptr + t + 1)
    if HAS_BASE:
        acc = _load_f32(base_ptr, t * H + cols, cmask, BF16)
    else:
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    i = lo
    while i < hi:  # a runtime bound: `while`, which the interpreter also runs
        # R rows per iteration, added one after another in sorted order; their loads are
        # independent, so they are in flight together.
        for j in tl.static_range(R):
            live = i + j < hi
            r = tl.load(order_ptr + i + j, mask=live, other=0).to(tl.int64)
            pr = r  # the row of src holding row r
            if HAS_ROW:
                pr = tl.load(row_ptr + r, mask=live, other=-1).to(tl.int64)
                live = live & (pr >= 0)
            v = _load_f32(src_ptr, pr * H + cols, cmask & live, BF16)
            if HAS_W:
                v = v * _load_f32(w_ptr, r, live, W_BF16)
            if HAS_SRC2:  # a second term per row, added in fp32 (no rounded sum in between)
                v = v + _load_f32(src2_ptr, pr * H + cols, cmask & live, BF16)
            acc = tl.where(live, acc + v, acc)  # not acc + 0.0: that would turn -0.0 into +0.0
        i += R
    _store_f32(out_ptr, t * H + cols, acc, cmask, BF16)


def index_add_plan_impl(index: torch.Tensor, num_rows: int, wrap: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, bounds): the source rows sorted by output row (stable, so each output row keeps
    its rows in increasing i) and, per output row t, its range order[bounds[t]:bounds[t + 1]].
    Out-of-range indices raise on the CPU and fire a device-side assert on CUDA."""
    keys = _wrapped(index, num_rows, wrap)
    if keys.numel():
        lo, hi = torch.aminmax(keys)
        if keys.is_cuda:  # ATen's index kernels assert on the device too; a host check would sync
            torch._assert_async((lo >= 0) & (hi < num_rows), f"fp8flow.{_OP}: index out of range")
        else:
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= num_rows:
                raise IndexError(f"fp8flow.{_OP}: index {lo if lo < 0 else hi} is out of range "
                                 f"for {num_rows} rows")
    # Checked in range, the keys fit 32 bits: a radix sort of half the passes of int64 keys
    # (H100, 16384 keys: 4 passes instead of 8, each a few microseconds plus a launch).
    if num_rows <= 2**31 - 1:
        keys = keys.to(torch.int32)
    keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(keys, torch.arange(num_rows + 1, device=keys.device,
                                                   dtype=keys.dtype))
    return order, bounds


def index_add_rows_triton(base, index, src, weight, num_rows, wrap=False, order=None,
                          bounds=None, src2=None, src_row=None):
    N, H = index.shape[0], src.shape[1]
    if N and num_rows == 0:  # every index is out of range, known from the shapes alone
        raise IndexError(f"fp8flow.{_OP}: {N} source rows but no output rows")
    out = torch.empty(num_rows, H, dtype=src.dtype, device=src.device)
    if num_rows == 0 or H == 0:
        return out
    if order is None:
        order, bounds = index_add_plan_impl(index, num_rows, wrap)
    # Source rows per output row, as the shapes give it: an MoE's top-k.
    R = min(_MAX_R, triton.next_power_of_2(max(1, cdiv(N, num_rows))))
    w = weight.reshape(-1).contiguous() if weight is not None else src
    _index_add_rows_kernel[(num_rows, cdiv(H, _BLOCK_H))](
        _bits(base.contiguous()) if base is not None else _bits(src), _bits(src.contiguous()),
        _bits(w), _bits(src2.contiguous()) if src2 is not None else _bits(src), order, bounds,
        src_row if src_row is not None else order, _bits(out), H, R=R, BLOCK_H=_BLOCK_H,
        HAS_BASE=base is not None, HAS_W=weight is not None, HAS_SRC2=src2 is not None,
        HAS_ROW=src_row is not None, BF16=src.dtype == torch.bfloat16,
        W_BF16=w.dtype == torch.bfloat16, num_warps=4, enable_fp_fusion=False)
    return out


# ---------------------------------------------------------------- custom op

@torch.library.custom_op("fp8flow::index_add_plan", mutates_args=())
def index_add_plan(index: torch.Tensor, num_rows: int, wrap: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort `index_add_rows` does first, as an op of its own so that calls on the same index
    share it (the flow makes one per step for the MoE combine and the backward of the token
    gather): (order int64 [N], bounds int64 [num_rows + 1]), see index_add_plan_impl. wrap as in
    index_add_rows; index out of range raises (CPU) or asserts on the device (CUDA)."""
    require(index.dim() == 1 and index.dtype in (torch.int32, torch.int64), "index_add_plan",
            f"index must be 1-D int32/int64, got {index.dtype} {tuple(index.shape)}")
    require(num_rows >= 0, "index_add_plan", f"num_rows must be >= 0, got {num_rows}")
    return index_add_plan_impl(index, num_rows, wrap)


@index_add_plan.register_fake
def _(index, num_rows, wrap=False):
    return (index.new_empty(index.shape[0], dtype=torch.int64),
            index.new_empty(num_rows + 1, dtype=torch.int64))


@torch.library.custom_op("fp8flow::index_add_rows", mutates_args=())
def index_add_rows(base: torch.Tensor | None, index: torch.Tensor, src: torch.Tensor,
                   weight: torch.Tensor | None, num_rows: int, wrap: bool = False,
                   order: torch.Tensor | None = None, bounds: torch.Tensor | None = None,
                   src2: torch.Tensor | None = None, src_row: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """[num_rows, H]: base (zeros when None) plus, for each i in increasing order,
    src[i] * weight[i] (weight None: 1) [+ src2[i]] added to row index[i]; fp32 accumulation,
    one rounding. wrap=True reads negative indices from the end (index_put semantics). src2
    (src's shape and dtype): a second term per row, e.g. the two GEMM gradients that reach one
    gathered row, summed here instead of in a [N, H] add first.

    order, bounds: optionally `index_add_plan(index, num_rows, w)` made once for several calls
    on the same index, which then skip their own sort; it must come from this index and
    num_rows, and `w` must be this call's wrap unless every index is non-negative (a plan with
    w=False asserts that, which an index_add_ on the same index requires anyway).

    src_row (int32 [N], values in [-1, src rows)): row i of src and src2 is src[src_row[i]], a
    zero row where src_row[i] < 0; src then has any number of rows, and index, weight and the
    plan count the N rows read. Without it N is src's row count."""
    _check(base, index, src, weight, num_rows, src2, src_row)
    _check_plan(order, bounds, index.shape[0], num_rows)
    if use_triton(src):
        return index_add_rows_triton(base, index, src, weight, num_rows, wrap, order, bounds,
                                     src2, src_row)
    return index_add_rows_ref(base, index, src, weight, num_rows, wrap, src2, src_row)


@index_add_rows.register_fake
def _(base, index, src, weight, num_rows, wrap=False, order=None, bounds=None, src2=None,
      src_row=None):
    return src.new_empty(num_rows, src.shape[1])
