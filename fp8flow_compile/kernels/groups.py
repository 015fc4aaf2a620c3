"""Expert groups and the 1x128 tiles laid over them.

Groups follow `torch._grouped_mm`: `offs` is an int32 tensor of cumulative group ends, so group g
spans rows [offs[g-1], offs[g]) (offs[-1] = 0); rows past offs[-1] belong to no group. Empty groups
are legal.

When 1x128 tiles run along a grouped axis (the token axis of a wgrad operand), they restart at every
group start, so a group of 200 rows has tiles of 128 and 72 rows. The number of such tiles depends
on the data, so scale tensors along a grouped axis get the static upper bound
`max_tiles(length, groups) = cdiv(length, 128) + groups` slots; `tile_bounds` says which rows each
slot covers (empty slots cover nothing and hold scale 1).

Aligned group layout
--------------------
cuBLAS wants each wgrad group to start on a 16-element boundary and span a multiple of 16 tokens.
The column-wise producers (`quantize_1x128_col`, `scaling_aware_transpose`) can therefore write
their token axis in an aligned layout (`align` > 1): group g starts at the running sum of the
earlier groups' sizes rounded up to `align`, the gap after each group and everything past the
last group is zero bytes, and the width is `aligned_width(length, groups, align)`. That is
exactly the plain layout of the input with zero rows inserted per group (`pad_groups`), whose
group ends are `pad_offsets(offs, align)`: the consumer reads it with the padded ends. Zero rows
change no scale (a tile's scale comes from its amax) and add nothing to a GEMM. offs is read as
its running max (a group end below an earlier one makes an empty group), so the padded starts
never go back and nothing lands past the width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import require, require_dtype
from ..recipe import TILE


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(length: int, num_groups: int | None, tile: int = TILE) -> int:
    if num_groups is None:
        return cdiv(length, tile)
    return cdiv(length, tile) + num_groups


def aligned_width(length: int, num_groups: int, align: int) -> int:
    """Static width of the aligned layout: each group wastes at most align - 1 slots, and the
    width is a multiple of align (16-byte rows for cuBLAS). `length` itself when align == 1."""
    if align == 1:
        return length
    return cdiv(length + num_groups * (align - 1), align) * align


def _running_ends(offs: torch.Tensor) -> torch.Tensor:
    """Group ends as the aligned layout reads them: made non-negative and non-decreasing (the
    running max), so sizes never go negative and the padded starts never go back."""
    return offs.to(torch.int64).clamp(min=0).cummax(0).values


def pad_offsets(offs: torch.Tensor, align: int) -> torch.Tensor:
    """Group ends of the aligned layout: the running sum of the group sizes (of the running-max
    ends, see _running_ends) rounded up to `align`. int32, no host sync. Groups that run past
    the width of the layout are cut there by its producers and consumers alike."""
    ends = _running_ends(offs)
    sizes = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
    return torch.cumsum((sizes + align - 1) // align * align, 0).to(torch.int32)


def pad_groups(x: torch.Tensor, offs: torch.Tensor, align: int, fill: float = 0.0
               ) -> torch.Tensor:
    """x [M, ...] laid out as the aligned layout along dim 0: group g's rows moved to its padded
    start, `fill` everywhere else (rows past M read as `fill`, rows past offs[-1] are dropped,
    everything past the width is cut). For references."""
    M = x.shape[0]
    width = aligned_width(M, offs.numel(), align)
    out = torch.full((width, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    ends = _running_ends(offs).tolist()
    pends = pad_offsets(offs, align).tolist()
    for start, end, pstart in zip([0] + ends[:-1], ends, [0] + pends[:-1]):
        n = max(min(end, M) - start, 0)
        n = min(n, width - pstart)
        if n > 0:
            out[pstart:pstart + n] = x[start:start + n]
    return out


def tile_bounds(offs: torch.Tensor | None, length: int, tile: int = TILE,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) row of each tile slot along an axis of `length` rows.

    Without groups the slots are the plain tiles [t*tile, min((t+1)*tile, length)). With groups,
    slot t belongs to the group g with tile_base[g] <= t < tile_base[g+1], where tile_base is the
    running sum of cdiv(group size, tile). Built from a few small torch ops, with no host sync.
    """
    if offs is None:
        starts = torch.arange(0, cdiv(length, tile), dtype=torch.int32, device=device) * tile
        ends = torch.clamp(starts + tile, max=length)
        return starts, ends
    device = offs.device
    num_groups = offs.numel()
    n_slots = max_tiles(length, num_groups, tile)
    # Bounds clamped to [0, length], as the kernels clamp them (offs must be non-decreasing,
    # as torch._grouped_mm requires).
    ends_g = offs.to(torch.int64).clamp(0, length)
    starts_g = torch.cat([ends_g.new_zeros(1), ends_g[:-1]])
    ntiles = ((ends_g - starts_g).clamp(min=0) + tile - 1) // tile
    cum = torch.cumsum(ntiles, 0)
    slot = torch.arange(n_slots, device=device, dtype=torch.int64)
    g = torch.searchsorted(cum, slot, right=True)
    valid = g < num_groups
    g = torch.clamp(g, max=num_groups - 1)
    base = cum[g] - ntiles[g]
    s = starts_g[g] + (slot - base) * tile
    e = torch.minimum(s + tile, ends_g[g])
    s = torch.where(valid, s, 0)
    e = torch.where(valid, e, 0)
    return s.to(torch.int32), e.to(torch.int32)


# ---------------------------------------------------------------- the same, inside a kernel

def group_block(num_groups: int) -> int:
    """The constexpr vector width the in-kernel helpers load offs with (groups + the tail)."""
    return triton.next_power_of_2(num_groups + 1)


@triton.jit
def _group_table(offs_ptr, G, length, TILE_: tl.constexpr, G_BLOCK: tl.constexpr,
                 TAIL: tl.constexpr):
    # Per group g < G (and g == G, the rows past offs[-1], when TAIL): first row, end row and
    # tile count, bounds clamped to [0, length]; lanes past the last group hold 0 tiles.
    gi, prev, ends = _group_bounds(offs_ptr, G, length, G_BLOCK)
    live = (gi < G) | ((gi == G) & TAIL)
    ntiles = tl.where(live, (tl.maximum(ends - prev, 0) + TILE_ - 1) // TILE_, 0)
    return gi, prev, ends, ntiles


@triton.jit
def _group_bounds(offs_ptr, G, length, G_BLOCK: tl.constexpr):
    gi = tl.arange(0, G_BLOCK)
    ends = tl.load(offs_ptr + gi, mask=gi < G, other=0)
    ends = tl.where(gi == G, length, ends)
    prev = tl.load(offs_ptr + gi - 1, mask=(gi >= 1) & (gi <= G), other=0)
    ends = tl.minimum(tl.maximum(ends, 0), length)
    prev = tl.minimum(tl.maximum(prev, 0), length)
    return gi, prev, ends


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _padded_table(offs_ptr, G, width, G_BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # Per group g < G: input start and end (running-max ends, not clamped to the input: rows
    # past it read as padding), padded output start and end (clamped to width); lane G: the
    # tail [end of the last group's padding, width); lanes past it: empty.
    gi = tl.arange(0, G_BLOCK)
    ends = tl.associative_scan(tl.maximum(tl.load(offs_ptr + gi, mask=gi < G, other=0), 0), 0,
                               _max2)
    # the previous group's end: the running max of offs shifted by one lane
    prev = tl.associative_scan(
        tl.maximum(tl.load(offs_ptr + gi - 1, mask=(gi >= 1) & (gi < G), other=0), 0), 0, _max2)
    size = tl.where(gi < G, ends - prev, 0)
    psize = (size + ALIGN - 1) // ALIGN * ALIGN
    pends = tl.cumsum(psize, 0)
    pprev = pends - psize
    pused = tl.max(tl.where(gi < G, pends, 0), 0)
    pprev = tl.where(gi == G, pused, pprev)
    pends = tl.where(gi == G, width, pends)
    pprev = tl.minimum(pprev, width)
    pends = tl.minimum(pends, width)
    return gi, prev, ends, pprev, pends


@triton.jit
def group_slot_aligned(offs_ptr, G, length, width, t, TILE_: tl.constexpr,
                       G_BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Tile slot t of the grouped column-wise layout -> (group, first and end row of the input,
    first and end slot of the output axis of `width`).

    ALIGN == 1: the plain layout, exactly `group_slot` (output range = input range, width =
    length). ALIGN > 1: the aligned layout (module docstring): output tiles restart at each
    group's padded start and cover its padded size, clamped to `width`; the input rows of a
    tile are the same offset into the group, up to the group's end and `length` (the rest of
    the tile is padding). The rows past the last group follow as pseudo-group G up to `width`,
    which reads nothing. Slots are numbered as `tile_bounds(pad_offsets(offs), width)` numbers
    them."""
    if ALIGN == 1:
        g, first, end = group_slot(offs_ptr, G, length, t, TILE_, G_BLOCK, True)
        ofirst = first
        oend = end
    else:
        gi, prev, ends, pprev, pends = _padded_table(offs_ptr, G, width, G_BLOCK, ALIGN)
        ntiles = tl.where(gi <= G, (tl.maximum(pends - pprev, 0) + TILE_ - 1) // TILE_, 0)
        cum = tl.cumsum(ntiles, 0)
        g = tl.sum((cum <= t).to(tl.int32), 0)
        sel = gi == g
        base = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
        pstart = tl.sum(tl.where(sel, pprev, 0), 0)
        ofirst = pstart + (t - base) * TILE_
        oend = tl.minimum(ofirst + TILE_, tl.sum(tl.where(sel, pends, 0), 0))
        first = tl.sum(tl.where(sel, prev, 0), 0) + (ofirst - pstart)
        end = tl.minimum(tl.minimum(tl.sum(tl.where(sel, ends, 0), 0), first + TILE_), length)
        valid = tl.sum(tl.where(sel, ntiles, 0), 0) > 0
        live = valid & (g < G)
        first = tl.where(live, first, 0)
        end = tl.where(live, end, 0)
        ofirst = tl.where(valid, ofirst, 0)
        oend = tl.where(valid, oend, 0)
    return g, first, end, ofirst, oend


@triton.jit
def group_slot(offs_ptr, G, length, t, TILE_: tl.constexpr, G_BLOCK: tl.constexpr,
               TAIL: tl.constexpr):
    """Tile slot t -> (group, first row, end row), computed from `offs` on the device.

    The slots are numbered as `tile_bounds` numbers them: the tiles of group 0, then group 1, ...
    With TAIL the rows past offs[-1] follow as a pseudo-group G (callers write zeros there);
    slots past the last tile get a group index > G and an empty range. offs must be
    non-decreasing (as torch._grouped_mm requires); bounds are clamped to [0, length].
    Replaces a host-built table: no torch ops per launch, which at MoE sizes cost more host time
    than the kernels take on the GPU.
    """
    gi, prev, ends, ntiles = _group_table(offs_ptr, G, length, TILE_, G_BLOCK, TAIL)
    cum = tl.cumsum(ntiles, 0)
    g = tl.sum((cum <= t).to(tl.int32), 0)
    sel = gi == g
    base = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
    first = tl.sum(tl.where(sel, prev, 0), 0) + (t - base) * TILE_
    end = tl.minimum(first + TILE_, tl.sum(tl.where(sel, ends, 0), 0))
    valid = tl.sum(tl.where(sel, ntiles, 0), 0) > 0
    return g, tl.where(valid, first, 0), tl.where(valid, end, 0)


@triton.jit
def group_span(offs_ptr, G, length, g, TILE_: tl.constexpr, G_BLOCK: tl.constexpr):
    """Group g -> (first row, end row, its first tile slot), computed on the device."""
    gi, prev, ends, ntiles = _group_table(offs_ptr, G, length, TILE_, G_BLOCK, False)
    sel = gi == g
    base = tl.sum(tl.where(gi < g, ntiles, 0), 0)
    return tl.sum(tl.where(sel, prev, 0), 0), tl.sum(tl.where(sel, ends, 0), 0), base


# ---------------------------------------------------------------- pad_offsets as an op

@triton.jit
def _pad_offsets_kernel(offs_ptr, out_ptr, G, ALIGN: tl.constexpr, G_BLOCK: tl.constexpr):
    # width = 2**31 - 1: nothing is clamped here (the producers and consumers clamp).
    gi, prev, ends, pprev, pends = _padded_table(offs_ptr, G, 2147483647, G_BLOCK, ALIGN)
    tl.store(out_ptr + gi, pends, mask=gi < G)


@torch.library.custom_op("fp8flow::pad_offsets", mutates_args=())
def pad_offsets_op(offs: torch.Tensor, align: int) -> torch.Tensor:
    """`pad_offsets` as an op for the compiled graph: the group ends of the aligned layout that
    `quantize_1x128_col(.., align)` and `scaling_aware_transpose(.., align)` write, for the
    GEMM that reads it. One small kernel on CUDA (the torch form is several launches)."""
    require(offs.dim() == 1 and offs.numel() >= 1, "pad_offsets",
            "offs must be a non-empty 1-D tensor")
    require_dtype(offs, (torch.int32,), "pad_offsets", "offs")
    require(align >= 1, "pad_offsets", f"align must be >= 1, got {align}")
    if not offs.is_cuda:
        return pad_offsets(offs, align)
    out = torch.empty_like(offs)
    _pad_offsets_kernel[(1,)](offs, out, offs.numel(), ALIGN=align,
                              G_BLOCK=group_block(offs.numel()))
    return out


@pad_offsets_op.register_fake
def _(offs, align):
    return torch.empty_like(offs)


# ---------------------------------------------------------------- row maps of the aligned layout

def align_maps(offs: torch.Tensor, rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two row maps between a grouped axis of `rows` rows and its aligned layout (width
    `aligned_width(rows, G, align)`, group ends `pad_offsets(offs, align)`):

    - pos [rows] int32: the row of the aligned layout that holds input row r; -1 for rows past
      the last group end (and for rows a group would place past the width);
    - src_row [width] int32: the input row that aligned row p holds; -1 for padding and tail.

    So `pad_groups(x, offs, align)` is x gathered by src_row (zero where -1), and x's rows in
    groups are that gathered back by pos. A few torch ops, no host sync."""
    G = offs.numel()
    width = aligned_width(rows, G, align)
    ends = _running_ends(offs)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    pends = pad_offsets(offs, align).to(torch.int64)
    pstarts = torch.cat([pends.new_zeros(1), pends[:-1]])
    r = torch.arange(rows, device=offs.device, dtype=torch.int64)
    g = torch.searchsorted(ends, r, right=True)
    gc = g.clamp(max=G - 1)
    p = pstarts[gc] + r - starts[gc]
    pos = torch.where((g < G) & (p < width), p, -1)
    q = torch.arange(width, device=offs.device, dtype=torch.int64)
    h = torch.searchsorted(pends, q, right=True)
    hc = h.clamp(max=G - 1)
    src = starts[hc] + q - pstarts[hc]
    src_row = torch.where((h < G) & (src < ends[hc]) & (src < rows), src, -1)
    return pos.to(torch.int32), src_row.to(torch.int32)


@triton.jit
def _align_maps_kernel(offs_ptr, pos_ptr, src_ptr, G, rows, width, BLOCK: tl.constexpr,
                       G_BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # Programs [0, cdiv(rows, BLOCK)) write pos, the rest src_row; each compares its BLOCK
    # rows with the table of group bounds (input and aligned), as align_maps defines them.
    gi, prev, ends, pprev, pends = _padded_table(offs_ptr, G, width, G_BLOCK, ALIGN)
    live_g = gi < G
    pid = tl.program_id(0)
    n_pos = tl.cdiv(rows, BLOCK)
    if pid < n_pos:
        r = pid * BLOCK + tl.arange(0, BLOCK)
        inside = (r[:, None] >= prev[None, :]) & (r[:, None] < ends[None, :]) & live_g[None, :]
        p = tl.sum(tl.where(inside, pprev[None, :] + r[:, None] - prev[None, :], 0), 1)
        hit = tl.sum(inside.to(tl.int32), 1) > 0
        pos = tl.where(hit & (p < width), p, -1)
        tl.store(pos_ptr + r, pos, mask=r < rows)
    else:
        q = (pid - n_pos) * BLOCK + tl.arange(0, BLOCK)
        inside = (q[:, None] >= pprev[None, :]) & (q[:, None] < pends[None, :]) & live_g[None, :]
        src = tl.sum(tl.where(inside, prev[None, :] + q[:, None] - pprev[None, :], 0), 1)
        end = tl.sum(tl.where(inside, ends[None, :], 0), 1)
        hit = tl.sum(inside.to(tl.int32), 1) > 0
        src = tl.where(hit & (src < end) & (src < rows), src, -1)
        tl.store(src_ptr + q, src, mask=q < width)


def align_maps_triton(offs: torch.Tensor, rows: int, align: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """align_maps in one launch (the torch form is a dozen small kernels, about 1 ms on the H100
    at 69632 rows, most of it searchsorted)."""
    G = offs.numel()
    width = aligned_width(rows, G, align)
    pos = torch.empty(rows, dtype=torch.int32, device=offs.device)
    src_row = torch.empty(width, dtype=torch.int32, device=offs.device)
    G_BLOCK = group_block(G)
    BLOCK = max(16, min(256, 8192 // G_BLOCK))
    grid = (cdiv(rows, BLOCK) + cdiv(width, BLOCK),)
    if grid[0]:
        _align_maps_kernel[grid](offs, pos, src_row, G, rows, width, BLOCK=BLOCK,
                                 G_BLOCK=G_BLOCK, ALIGN=align)
    return pos, src_row


@torch.library.custom_op("fp8flow::align_maps", mutates_args=())
def align_maps_op(offs: torch.Tensor, rows: int, align: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`align_maps` as an op for the compiled graph (passes/align_groups.py): (pos [rows],
    src_row [aligned_width(rows, G, align)]), both int32."""
    require(offs.dim() == 1 and offs.numel() >= 1, "align_maps",
            "offs must be a non-empty 1-D tensor")
    require_dtype(offs, (torch.int32,), "align_maps", "offs")
    require(align >= 1 and rows >= 0, "align_maps",
            f"align must be >= 1 and rows >= 0, got {align}, {rows}")
    if offs.is_cuda:
        return align_maps_triton(offs.contiguous(), rows, align)
    return align_maps(offs, rows, align)


@align_maps_op.register_fake
def _(offs, rows, align):
    width = aligned_width(rows, offs.shape[0], align)
    return (offs.new_empty(rows, dtype=torch.int32), offs.new_empty(width, dtype=torch.int32))
