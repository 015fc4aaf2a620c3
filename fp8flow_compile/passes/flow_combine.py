"""Flow rewrite "combine": row scatter-adds become a sorted gather-sum, row weights fused.

Expects: any joint graph. Guarantees: every

- `index_add(base, 0, index, src)` (alpha 1), and
- `index_put(base, [index], src, accumulate=True)` with one index tensor on dim 0,

where base is [T, H] (contiguous), src [N, H] (no broadcasting) and index [N] (on the device of
the rows), in bf16 or fp32, becomes
`fp8flow::index_add_rows(base | None, index, src', weight | None, T)` (see kernels/scatter.py):
no atomics, fp32 accumulation, one rounding, deterministic. A base that is a zero fill is not
read. Where src = y * w with w a per-row weight [N, 1] of the same dtype and the product used
nowhere else, y and w go to the op and the product is never written: the MoE combine
`zeros.index_add_(0, token, y * probs)` reads y once. Where src = a + b (two [N, H] terms of
src's dtype, the sum read only by the scatter), a and b go to the op (`src2=b`) and the sum is
never written: the backward of a token gather read by two GEMMs (gate and up projections of
their own) adds their two dgrads on the way.

These are the MoE layer's combine step (forward) and the backward of its token gather
`x[token]`; on the H100 they ran as BF16 atomics at several times the cost of reading the rows
(numbers in kernels/scatter.py). The rewrite changes rounding only, towards the exact sum.

Two or more calls on the same index and row count share one sort: an
`index_add_plan(index, T, wrap)` node before the first of them feeds (order, bounds) to each
(the combine and the gather's backward read the same token index: one sort per step instead of
two; H100, Mixtral-like shape, 16384 rows: about 0.14 ms of small kernels each). The plan's
wrap is False if any of them has wrap=False (an `index_add` there makes a negative index an
error anyway, and for non-negative indices both plans are the same), else True.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..kernels.scatter import DTYPES
from .graph import Ctx, call, call_multi, finish, size_hint, val

aten = torch.ops.aten
ops = torch.ops.fp8flow


def _is_zero_fill(n) -> bool:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return False
    if n.target is aten.full.default:
        v = n.args[1]  # +0 only: a -0.0 base keeps rows that receive nothing (or -0) at -0.0
        return isinstance(v, (int, float)) and v == 0 and math.copysign(1.0, v) > 0
    return n.target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)


def _row_weight(src: fx.Node, n_rows: int):
    """(y, w) if src = y * w with w one weight per row ([N, 1], src's dtype) and src read only
    by the scatter; else None."""
    if src.op != "call_function" or src.target is not aten.mul.Tensor or len(src.users) != 1:
        return None
    a, b = src.args[:2]
    for y, w in ((a, b), (b, a)):
        yv, wv = val(y), val(w)
        if not (isinstance(yv, torch.Tensor) and isinstance(wv, torch.Tensor)):
            continue
        if (tuple(yv.shape) == tuple(val(src).shape) and wv.dim() == 2
                and wv.shape[0] == n_rows and wv.shape[1] == 1
                and yv.dtype == wv.dtype == val(src).dtype):
            return y, w
    return None


def _two_terms(src: fx.Node):
    """(a, b) if src = a + b of two tensors of src's shape and dtype (alpha 1), read only by
    the scatter; else None."""
    if (src.op != "call_function" or src.target is not aten.add.Tensor or len(src.users) != 1
            or len(src.args) != 2 or src.kwargs.get("alpha", 1) != 1):
        return None
    a, b = src.args
    sv = val(src)
    if all(isinstance(t, fx.Node) and isinstance(val(t), torch.Tensor)
           and tuple(val(t).shape) == tuple(sv.shape) and val(t).dtype == sv.dtype
           for t in (a, b)):
        return a, b
    return None


def _rows_arg(gm: fx.GraphModule, base: fx.Node, zero: bool):
    """base's row count as an op argument: an int, or under dynamic shapes the graph node that
    holds the symbol (the zero fill's own size argument, else a sym_size of base)."""
    rows = val(base).shape[0]
    if isinstance(rows, int):
        return rows
    if zero and base.target is aten.full.default and isinstance(base.args[0][0], fx.Node):
        return base.args[0][0]
    return call(gm, aten.sym_size.int, (base, 0))


def _match(n: fx.Node):
    """(base, index, src, wrap) of a row scatter-add this pass takes, else None."""
    if n.op != "call_function":
        return None
    if n.target is aten.index_add.default:
        base, dim, index, src = n.args[:4]
        alpha = n.args[4] if len(n.args) > 4 else n.kwargs.get("alpha", 1)
        if dim not in (0, -2) or alpha != 1:
            return None
        wrap = False
    elif n.target is aten.index_put.default:
        base, indices, src = n.args[:3]
        acc = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
        if not acc or len(indices) != 1 or not isinstance(indices[0], fx.Node):
            return None
        index, wrap = indices[0], True
    else:
        return None
    bv, iv, sv = val(base), val(index), val(src)
    if not all(isinstance(v, torch.Tensor) for v in (bv, iv, sv)):
        return None
    if (bv.dim() != 2 or sv.dim() != 2 or iv.dim() != 1 or sv.shape[0] != iv.shape[0]
            or sv.shape[1] != bv.shape[1] or bv.dtype != sv.dtype or bv.dtype not in DTYPES
            or iv.dtype not in (torch.int32, torch.int64) or bv.device != sv.device
            or iv.device != sv.device  # torch also takes a CPU index for CUDA rows; not here
            or not bv.is_contiguous()):  # the op returns contiguous rows, index_add base's strides
        return None
    return base, index, src, wrap


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    done = 0
    for n in list(gm.graph.nodes):
        m = _match(n)
        if m is None:
            continue
        base, index, src, wrap = m
        rows = size_hint(val(base).shape[0])
        yw = _row_weight(src, val(src).shape[0])
        y, w = yw if yw is not None else (src, None)
        terms = _two_terms(src) if yw is None else None
        kwargs = {}
        if terms is not None:
            y, kwargs["src2"] = terms
        zero = _is_zero_fill(base)
        with gm.graph.inserting_before(n):
            new = call(gm, ops.index_add_rows.default,
                       (None if zero else base, index, y, w, _rows_arg(gm, base, zero), wrap),
                       kwargs, name="index_add_rows")
        new.meta["fp8flow"] = {"role": "combine", "replaces": n.name}
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        for dead in (src, base):  # the product or sum and the zero fill, if nothing reads them
            if dead is not y and dead.op == "call_function" and not dead.users and (
                    dead is src or _is_zero_fill(dead)):
                gm.graph.erase_node(dead)
        done += 1
        ctx.log.append(f"combine: {n.name} ({n.target.__name__}, {rows} rows) -> index_add_rows"
                       + (" with the row weight fused" if yw is not None else "")
                       + (f" reading {src.name}'s two terms" if terms is not None else ""))
    shared = _share_plans(gm, ctx)
    if done or shared:
        finish(gm)
    return gm


def _share_plans(gm: fx.GraphModule, ctx: Ctx) -> int:
    """One index_add_plan per (index, row count) read by two or more index_add_rows calls
    without one; returns the number of plans made."""
    groups: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is ops.index_add_rows.default and \
                len(n.args) <= 6 and "order" not in n.kwargs:
            groups.setdefault((n.args[1], n.args[4]), []).append(n)
    groups = {k: v for k, v in groups.items() if len(v) > 1}  # one call sorts for itself
    for (index, rows), users in groups.items():
        wrap = all(_wrap(u) for u in users)
        with gm.graph.inserting_before(users[0]):
            order, bounds = call_multi(gm, ops.index_add_plan.default, (index, rows, wrap), 2,
                                       name="combine_plan")
        for u in users:
            u.args = (*u.args[:5], _wrap(u), order, bounds)
            u.kwargs = {k: v for k, v in u.kwargs.items() if k != "wrap"}
        ctx.log.append(f"combine: one sort of {index.name} shared by "
                       f"{', '.join(u.name for u in users)}")
    return len(groups)


def _wrap(n: fx.Node) -> bool:
    """The wrap argument of an index_add_rows node, positional or keyword."""
    return bool(n.args[5]) if len(n.args) > 5 else bool(n.kwargs.get("wrap", False))
