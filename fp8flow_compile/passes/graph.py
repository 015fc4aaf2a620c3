"""FX helpers shared by the passes: node creation with fake values, view stripping, phases."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

aten = torch.ops.aten

TRANSPOSE_OPS = {aten.permute.default, aten.t.default, aten.transpose.int}


@dataclasses.dataclass
class Ctx:
    """What the passes share about one compile: the recipe, options, inputs and decisions."""

    recipe: Any
    options: dict
    # Placeholder name -> (is_parameter, user-facing path) for the joint graph's primals.
    params: dict[str, tuple[bool, str]]
    gemms: list = dataclasses.field(default_factory=list)
    log: list[str] = dataclasses.field(default_factory=list)


def fake_mode_of(gm: fx.GraphModule):
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def call(gm: fx.GraphModule, target, args: tuple, kwargs: dict | None = None,
         name: str | None = None) -> fx.Node:
    """Insert a call at the current insertion point and fill in its fake value."""
    node = gm.graph.call_function(target, args, kwargs or {})
    node.meta["val"] = fake_value(node, fake_mode_of(gm))
    if name:
        node.name = gm.graph._graph_namespace.create_name(name, None)
    return node


def after_made(gm: fx.GraphModule, n: fx.Node):
    """The insertion point right after n is made: after n, or before the first op if n is a
    graph input."""
    if n.op == "placeholder":
        return gm.graph.inserting_before(next(m for m in gm.graph.nodes
                                              if m.op != "placeholder"))
    return gm.graph.inserting_after(n)


def fake_value(n: fx.Node, mode) -> Any:
    """The value of the call n from its inputs' fake values (under `mode`, `fake_mode_of`)."""
    args = torch.fx.node.map_arg(n.args, val)
    kwargs = torch.fx.node.map_arg(n.kwargs, val)
    if n.target is operator.getitem:
        return args[0][args[1]]
    with mode:
        return n.target(*args, **kwargs)


def given_args(n: fx.Node) -> dict:
    """The arguments of the op call n as given, positional or keyword, by their schema names."""
    names = [a.name for a in n.target._schema.arguments]
    return {**dict(zip(names, n.args)), **n.kwargs}


def set_arg(n: fx.Node, name: str, value: Any) -> None:
    """Replace the argument `name` of the op call n, where it was given (keyword or position);
    one left at its default is given as a keyword."""
    i = [a.name for a in n.target._schema.arguments].index(name)
    if name in n.kwargs or i >= len(n.args):  # a keyword, or left at its default: give it
        n.update_kwarg(name, value)
    else:
        n.update_arg(i, value)


def finish(gm: fx.GraphModule, dead_code: bool = False) -> None:
    """The end of a pass that changed the graph: optionally drop nodes nothing reads any more,
    check the graph, regenerate the module's code."""
    if dead_code:
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def replace_outputs(gm: fx.GraphModule, old: fx.Node, new: list[fx.Node]) -> None:
    """Point the users of output i of the multi-output node `old` (its getitem nodes) at
    new[i], then erase `old` and those getitems."""
    for u in list(old.users):
        if u.target is operator.getitem:
            u.replace_all_uses_with(new[u.args[1]])
            gm.graph.erase_node(u)
    gm.graph.erase_node(old)


def contiguous(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """n itself if its value is contiguous, else a contiguous clone inserted here."""
    if val(n).is_contiguous():
        return n
    return call(gm, aten.clone.default, (n,), {"memory_format": torch.contiguous_format})


def call_multi(gm: fx.GraphModule, target, args: tuple, n_out: int, name: str | None = None
               ) -> list[fx.Node]:
    node = call(gm, target, args, name=name)
    outs = []
    for i in range(n_out):
        g = gm.graph.call_function(operator.getitem, (node, i))
        g.meta["val"] = node.meta["val"][i]
        outs.append(g)
    return outs


def strip(n: fx.Node) -> tuple[fx.Node, bool]:
    """Follow views and transposes of 2-D/3-D tensors back to their source.

    Returns (source, transposed): whether the last two dims of `n` are swapped relative to the
    source. Views that change the element order of the last two dims end the walk.
    """
    transposed = False
    while isinstance(n, fx.Node) and n.op == "call_function":
        if n.target in TRANSPOSE_OPS:
            src = n.args[0]
            nd = val(src).dim()
            if n.target is aten.permute.default:
                perm = [p % nd for p in n.args[1]]
                if perm[:-2] != list(range(nd - 2)) or perm[-2:] != [nd - 1, nd - 2]:
                    break
            elif n.target is aten.transpose.int:
                dims = sorted(d % nd for d in n.args[1:3])
                if dims != [nd - 2, nd - 1]:
                    break
            transposed = not transposed
            n = src
        elif n.target in (aten.alias.default,):
            n = n.args[0]
        elif n.target in (aten.view.default, aten._unsafe_view.default) and (
                tuple(val(n).shape) == tuple(val(n.args[0]).shape)):
            n = n.args[0]
        else:
            break
    return n, transposed


def size_hint(n) -> int:
    """A size as an int: dynamic shapes give a SymInt, taken at the size it was traced with."""
    if isinstance(n, int):
        return n
    import torch.fx.experimental.symbolic_shapes as sym
    for name in ("hint_int", "optimization_hint"):  # the name differs across torch versions
        fn = getattr(sym, name, None)
        if fn is not None:
            try:
                return int(fn(n))
            except Exception:
                pass
    return int(n.node.hint)


def forward_required(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes of the joint graph that the forward outputs depend on (what the forward graph must
    compute; the joint graph returns the forward outputs, then one gradient per primal)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    n_primals = sum(1 for n in gm.graph.nodes
                    if n.op == "placeholder" and "tangents" not in n.name)
    todo = [a for a in out[:len(out) - n_primals] if isinstance(a, fx.Node)]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def backward_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes of the joint graph that depend on a tangent (the backward part)."""
    tangents = {n for n in gm.graph.nodes if n.op == "placeholder" and "tangents" in n.name}
    out = set()
    for n in gm.graph.nodes:
        if n in tangents or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out
