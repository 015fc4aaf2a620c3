"""Expert groups and the 1x128 tiles laid over them.

Groups follow `torch._grouped_mm`: `offs` is an int32 tensor of cumulative group ends, so group g
spans rows [offs[g-1], offs[g]) (offs[-1] = 0); rows past offs[-1] belong to no group. Empty groups
are legal.

When 1x128 tiles run along a grouped axis (the token axis of a wgrad operand), they restart at every
group start, so a group of 200 rows has tiles of 128 and 72 rows. The number of such tiles depends
on the data, so scale tensors along a grouped axis get the static upper bound
`max_tiles(length, groups) = cdiv(length, 128) + groups` slots; `tile_bounds` says which rows each
slot covers (empty slots cover nothing and hold scale 1).
"""

from __future__ import annotations

import torch

from ..recipe import TILE


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(length: int, num_groups: int | None, tile: int = TILE) -> int:
    if num_groups is None:
        return cdiv(length, tile)
    return cdiv(length, tile) + num_groups


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
    ends_g = offs.to(torch.int64)
    starts_g = torch.cat([ends_g.new_zeros(1), ends_g[:-1]])
    ntiles = (ends_g - starts_g + tile - 1) // tile
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
