"""Flow rewrite "align_groups": the expert rows re-laid so that every group starts on 128 rows.

Expects: a graph after the flow passes (merge_gate_up last): the grouped fprop/dgrad GEMMs read
rows that `permute_pad_fp8` gathers and the SwiGLU ops make. Guarantees: for each group-ends
tensor `offs` whose rows form a closed region (below), the region's ops run on the rows laid out
in the aligned group layout of kernels/groups.py with `align` rows: group g starts at the sum of
the earlier groups' sizes rounded up to `align`, with zero rows after each group and after the
last (static width `aligned_width(P, G, align)`), and the GEMMs read `pad_offsets(offs, align)`
as their group ends. With align 128 every group starts on the grid of DeepGEMM's grouped GEMM
(kernels/deepgemm.py), whatever loads the router gives the experts; without this only routers
that pad each expert's tokens to 128 themselves get it.

The region of offs, grown from its grouped fprop/dgrad GEMMs through the row operands and row
results of the ops that keep rows apart (`grouped_gemm_fp8` on offs, the SwiGLU ops):

- where rows enter: `permute_pad_fp8(q, s, idx)` gathers through `idx[src_row]` instead (-1,
  a zero row, in the padding; src_row from `align_maps`); a per-row vector (the routing weight
  the SwiGLU takes) is gathered the same way, 0 in the padding;
- the ops of the region read and write the new layout; zero rows stay zero rows (the GEMMs have
  no bias, SwiGLU(0) = 0, its gradient at 0 times a zero gradient is 0) and the GEMMs zero the
  rows past the last group;
- what reads the group layout: a `scaling_aware_transpose` on offs reads its rows in the new
  layout (region rows as they are; token rows through the padded index), so the weight
  gradients, which contract the token axis, read the new group ends too; the padding adds zero
  tokens to them, which change no scale and add nothing;
- where rows leave: `index_add_rows` (the combine, and the backward of the token gather) reads
  its rows through `pos`, the new row of each old row; a per-row vector result (the routing
  weight's gradient) is gathered back by pos.

Anything else that reads the region's rows or its group layout leaves the graph as it was, with
the reason in the log. The result is the same, bit for bit, as without the pass.

Option `align_groups`: "auto" (default) aligns to DeepGEMM's 128 where DeepGEMM is installed
and would run every GEMM of the region (sm90, K and N multiples of 128, bf16 output), and
nowhere else, since the cuBLAS loop reads any layout and would only compute the padding; an int
aligns to it everywhere (tests); 0 / False never.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..kernels import deepgemm
from ..kernels.groups import aligned_width
from .graph import (
    Ctx,
    after_made,
    call,
    call_multi,
    fake_mode_of,
    fake_value,
    finish,
    given_args,
    set_arg,
    val,
)

aten = torch.ops.aten
ops = torch.ops.fp8flow

# Ops whose rows stay apart, with the arguments that hold rows (their results all do).
_ROW_ARGS = {
    ops.grouped_gemm_fp8.default: ("a_q", "a_s"),
    ops.swiglu_quant.default: ("h", "probs", "up"),
    ops.swiglu_quant_save.default: ("h", "probs", "up"),
    ops.swiglu_quant_backward.default: ("dy", "h", "probs", "h_scales", "up"),
    ops.swiglu.default: ("h", "probs"),
    ops.swiglu_backward.default: ("dy", "h", "probs"),
}


class _Skip(Exception):
    """This offs stays as it is; the message says why."""


def _ops(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _is_op(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def _results(n: fx.Node) -> list[fx.Node]:
    """The nodes that hold n's results: n itself, or its getitems for a multi-output op."""
    if isinstance(val(n), (tuple, list)):
        return [u for u in n.users if u.target is operator.getitem]
    return [n]


def _ours(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fp8flow"


def _maker(x: fx.Node) -> fx.Node:
    return x.args[0] if x.target is operator.getitem else x


class _Region:
    def __init__(self, gm: fx.GraphModule, offs: fx.Node, gemms: list[fx.Node]):
        self.gm, self.offs = gm, offs
        self.P = val(gemms[0]).shape[0]
        self.ops: set[fx.Node] = set()  # ops whose results are rows of the region
        self.vec_in: list[tuple[fx.Node, str]] = []  # (op, argument): a per-row vector
        self._grow(gemms)

    def _member(self, n: fx.Node) -> bool:
        if n.target is ops.grouped_gemm_fp8.default:
            return given_args(n)["offs"] is self.offs
        return n.target in _ROW_ARGS

    def _rows(self, v) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.P

    def _grow(self, seeds: list[fx.Node]) -> None:
        stack = list(seeds)
        while stack:
            n = stack.pop()
            if n in self.ops:
                continue
            self.ops.add(n)
            if n.target is not ops.permute_pad_fp8.default:
                args = given_args(n)
                for name in _ROW_ARGS[n.target]:
                    x = args.get(name)
                    if x is None:
                        continue
                    m = _maker(x)
                    if m.op == "call_function" and (self._member(m) or
                                                     m.target is ops.permute_pad_fp8.default):
                        stack.append(m)
                    elif val(x).dim() == 1 and val(x).shape[0] == self.P:
                        self.vec_in.append((n, name))
                    else:
                        raise _Skip(f"{x.name} ({getattr(m.target, '__name__', m.op)}) gives "
                                    f"{n.name} rows that come from no gather")
            for r in _results(n):
                for u in r.users:
                    if u.op == "call_function" and self._member(u):
                        stack.append(u)
                    elif u.op == "call_function" and u.target in _ROW_ARGS:
                        raise _Skip(f"{u.name} reads rows of {n.name} with other group ends")

    def values(self) -> list[fx.Node]:
        return [r for n in self.ops for r in _results(n) if self._rows(val(r))]


def _plan(gm: fx.GraphModule, offs: fx.Node, gemms: list[fx.Node], align: int) -> dict:
    """What the rewrite of offs changes, or _Skip."""
    reg = _Region(gm, offs, gemms)
    vals = set(reg.values())
    exits_ia, exits_vec = [], []
    for v in vals:
        for u in v.users:
            if u in reg.ops or u.target is operator.getitem:
                continue
            a = given_args(u) if u.op == "call_function" and hasattr(u.target, "_schema") \
                else {}
            if _is_op(u, ops.scaling_aware_transpose.default) and a.get("offs") is offs:
                continue  # a reader of the group layout, below
            if _is_op(u, ops.index_add_rows.default) and a.get("src_row") is None and \
                    (a.get("src") in vals) and (a.get("src2") is None or a.get("src2") in vals):
                if u not in exits_ia:
                    exits_ia.append(u)
                continue
            if val(v).dim() == 1:
                exits_vec.append((v, u))
                continue
            raise _Skip(f"{u.name} ({getattr(u.target, '__name__', u.op)}) reads the rows of "
                        f"{v.name}")
    # the readers of the group layout: every fp8flow op reading offs or its padded ends
    transposes, wgrads, hosts, pads, maps = [], [], [], [], []
    sinks = {ops.grouped_gemm_fp8_wgrad.default: wgrads, ops.offsets_to_host.default: hosts,
             ops.pad_offsets.default: pads, ops.align_maps.default: maps}
    for u in offs.users:
        if u in reg.ops or u.op != "call_function":
            continue
        t = u.target
        if t is ops.scaling_aware_transpose.default:
            q = given_args(u)["q"]
            if q in vals or given_args(u).get("src_row") is not None or \
                    val(q).shape[0] == reg.P:
                transposes.append(u)
                continue
        elif t in sinks:
            sinks[t].append(u)
            continue
        if _ours(t):
            raise _Skip(f"{u.name} ({t.__name__}) reads the group layout of {offs.name}")
    for p in pads:
        if align % p.args[1]:
            raise _Skip(f"{p.name} pads the groups to {p.args[1]}, not a divisor of {align}")
        for u in p.users:
            if _is_op(u, ops.grouped_gemm_fp8_wgrad.default):
                wgrads.append(u)
            elif _is_op(u, ops.offsets_to_host.default):
                hosts.append(u)
            elif u.op == "call_function" and _ours(u.target):
                raise _Skip(f"{u.name} ({u.target.__name__}) reads the padded group ends "
                            f"{p.name}")
    for h in hosts:
        for u in h.users:
            if not (u in reg.ops or u in wgrads):
                raise _Skip(f"{u.name} reads the host copy {h.name} of the group ends")
    return {"region": reg, "rows": vals, "exits_ia": exits_ia, "exits_vec": exits_vec,
            "transposes": transposes, "wgrads": wgrads}


def _gather_vec(gm, x: fx.Node, rows: fx.Node, fill) -> fx.Node:
    """x[rows] with `fill` where rows < 0 (aten ops; Inductor fuses them)."""
    idx = call(gm, aten.clamp_min.default, (rows, 0))
    got = call(gm, aten.index.Tensor, (x, [idx]))
    keep = call(gm, aten.ge.Scalar, (rows, 0))
    v = val(got)
    other = call(gm, aten.full.default, ([], fill), {"dtype": v.dtype, "device": v.device})
    return call(gm, aten.where.self, (keep, got, other))


def _auto(gemms: list[fx.Node]) -> tuple[int, str | None]:
    """The alignment DeepGEMM needs where it would run all these GEMMs, else 0 and why."""
    v = val(gemms[0])
    if v.device.type != "cuda":
        return 0, None
    if not deepgemm.enabled() or deepgemm.installed() is None:
        return 0, "DeepGEMM is not installed" if deepgemm.enabled() else \
            "DeepGEMM is turned off (FP8FLOW_DEEPGEMM=0)"
    if torch.cuda.get_device_capability(v.device)[0] != 9:
        return 0, "DeepGEMM's grouped GEMM runs on sm90 only"
    for g in gemms:
        K, N = val(given_args(g)["a_q"]).shape[1], val(g).shape[1]
        if K % 128 or N % 128 or val(g).dtype != torch.bfloat16:
            return 0, (f"{g.name} ({N} x {K}, {val(g).dtype}) is not a shape DeepGEMM takes "
                       f"(multiples of 128, bf16 out)")
    return deepgemm.alignment(), None


def _rewrite(gm: fx.GraphModule, offs: fx.Node, gemms: list[fx.Node], plan: dict,
             align: int) -> list[str]:
    reg = plan["region"]
    P, G = reg.P, val(offs).shape[0]
    with after_made(gm, offs):
        offs_al = call(gm, ops.pad_offsets.default, (offs, align), name="offs_align")
    with gm.graph.inserting_after(offs_al):
        pos, src_row = call_multi(gm, ops.align_maps.default, (offs, P, align), 2,
                                  name="align_maps")
    host = None
    if any(given_args(n).get("offs_host") is not None for n in gemms + plan["wgrads"]):
        with gm.graph.inserting_after(pos.args[0]):
            host = call(gm, ops.offsets_to_host.default, (offs_al,), name="offs_align_host")
    padded_idx: dict = {}

    def pad_index(idx: fx.Node, before: fx.Node) -> fx.Node:
        if idx not in padded_idx:
            with gm.graph.inserting_before(before):
                padded_idx[idx] = _gather_vec(gm, idx, src_row, -1)
        return padded_idx[idx]

    changed: set[fx.Node] = set()
    for n in reg.ops:
        if n.target is ops.permute_pad_fp8.default:
            set_arg(n, "src_row", pad_index(given_args(n)["src_row"], n))
        elif n.target is ops.grouped_gemm_fp8.default:
            set_arg(n, "offs", offs_al)
            if given_args(n).get("offs_host") is not None:
                set_arg(n, "offs_host", host)
        changed.add(n)
    for n, name in reg.vec_in:
        with gm.graph.inserting_before(n):
            set_arg(n, name, _gather_vec(gm, given_args(n)[name], src_row, 0))
    for t in plan["transposes"]:
        a = given_args(t)
        if a["q"] in plan["rows"]:
            pass  # rows of the region: already in the new layout
        elif a.get("src_row") is not None:
            set_arg(t, "src_row", pad_index(a["src_row"], t))
        else:  # rows in the old layout: gathered into the new one on the way in
            set_arg(t, "src_row", src_row)
        set_arg(t, "offs", offs_al)
        changed.add(t)
    for w in plan["wgrads"]:
        set_arg(w, "offs", offs_al)
        if given_args(w).get("offs_host") is not None:
            set_arg(w, "offs_host", host)
        changed.add(w)
    for u in plan["exits_ia"]:
        set_arg(u, "src_row", pos)
        changed.add(u)
    for v, u in plan["exits_vec"]:
        with gm.graph.inserting_before(u):
            u.replace_input_with(v, _gather_vec(gm, v, pos, 0))
        changed.add(u)
    _toposort(gm)
    _refresh(gm, changed)
    width = aligned_width(P, G, align)
    return [f"align_groups: the rows of {offs.name} ({P} rows, {G} groups) laid out with every "
            f"group on a multiple of {align} rows (up to {width} rows): "
            f"{sum(n.target is ops.grouped_gemm_fp8.default for n in reg.ops)} grouped GEMMs "
            f"read offs_align; {len(plan['transposes'])} transposes and "
            f"{len(plan['wgrads'])} wgrads read the same groups; the rows leave through "
            f"{len(plan['exits_ia'])} index_add_rows and {len(plan['exits_vec'])} per-row "
            f"vectors"]


def _toposort(gm: fx.GraphModule) -> None:
    """Order the nodes so that each comes after its inputs, moving as few as the inserted nodes
    require: a stable topological sort on the current order."""
    import heapq

    nodes = list(gm.graph.nodes)
    rank = {n: i for i, n in enumerate(nodes)}
    missing = {n: len(n.all_input_nodes) for n in nodes}
    ready = [(rank[n], n.name, n) for n in nodes if missing[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in n.users:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, (rank[u], u.name, u))
    assert len(order) == len(nodes), "align_groups: the graph has a cycle"
    if order == nodes:
        return
    anchor = order[0]
    for n in order[1:]:
        anchor.append(n)
        anchor = n


def _refresh(gm: fx.GraphModule, changed: set[fx.Node]) -> None:
    """Fake values again for the changed nodes and everything whose inputs changed shape."""
    mode = fake_mode_of(gm)
    moved: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not (n in changed or any(a in moved
                                                               for a in n.all_input_nodes)):
            continue
        old = n.meta.get("val")
        new = n.meta["val"] = fake_value(n, mode)
        if _shapes(new) != _shapes(old):
            moved.add(n)


def _shapes(v):
    if isinstance(v, (tuple, list)):
        return tuple(_shapes(x) for x in v)
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.dtype)
    return v


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    opt = ctx.options.get("align_groups", "auto")
    by_offs: dict[fx.Node, list[fx.Node]] = {}
    for n in _ops(gm, ops.grouped_gemm_fp8.default):
        by_offs.setdefault(given_args(n)["offs"], []).append(n)
    done = False
    for offs, gemms in by_offs.items():
        if opt == "auto":
            align, why = _auto(gemms)
        else:
            align, why = int(opt or 0), None
        if align <= 1:
            if why:
                ctx.log.append(f"align_groups: {offs.name} left as the router laid it out "
                               f"({why})")
            continue
        P = val(gemms[0]).shape[0]
        if not isinstance(P, int) or not isinstance(val(offs).shape[0], int):
            ctx.log.append(f"align_groups: {offs.name} left as it is (dynamic row count)")
            continue
        try:
            plan = _plan(gm, offs, gemms, align)
        except _Skip as e:
            ctx.log.append(f"align_groups: {offs.name} left as it is: {e}")
            continue
        ctx.log.extend(_rewrite(gm, offs, gemms, plan, align))
        done = True
    if done:
        finish(gm, dead_code=True)
    return gm
