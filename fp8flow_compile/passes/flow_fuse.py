"""Flow rewrite "fuse": SwiGLU and its quantization become one op, forward and backward.

Expects: a graph with fp8flow quantize nodes (after flow_reuse, so the wgrad operands already read
the row-wise forms this pass replaces). Guarantees:

- forward: `quantize_1x128(x)` where x = silu(gate) * up [* probs] with gate = h[:, :I] and up =
  h[:, I:] of one tensor h [P, 2I] becomes `swiglu_quant(h, probs)`: no BF16 round trip of the
  SwiGLU output, one rounding from fp32 straight to E4M3;
- backward: `quantize_1x128(cat([d_gate, d_up], -1))` where (d_gate, d_up) is the SwiGLU gradient
  of that h for an upstream gradient dA [P, I] becomes `swiglu_quant_backward(dA, h, probs)`;
- gate and up from two GEMMs (torchtitan's w1 and w3, a dense MLP's gate_proj and up_proj):
  `quantize_1x128(silu(gate) * up [* probs])` becomes `swiglu_quant(gate, probs, up)`, and the
  row-wise quantizations of d_gate and d_up, each [P, I] for its own GEMM's dgrad, become the two
  planes of one `swiglu_quant_backward(dA, gate, probs, None, up, split=True)`;
- a column-wise quantization of either (left where no GEMM needs the row-wise form, e.g. the FC1
  wgrad when the input needs no gradient) becomes the scaling-aware transpose of the fused op's
  row-wise output.

How a SwiGLU is recognised: the quantized tensor's expression is followed back through elementwise
ops (whatever the decomposition made of silu: `x / (1 + exp(-x))`, `x * sigmoid(x)`, dtype casts,
either operand order) to its leaves. The leaves must be the two halves of one h (split / chunk /
slicing of its last dim), or two tensors of the output's shape [P, I] (which is the gate is
found by evaluating both ways), plus, for the backward, one upstream gradient of shape [P, I], and
optionally one per-row weight of shape [P, 1] or [P] (the routing probability). A backward over
two tensors is matched against the gate and up of a forward SwiGLU this pass fused, so the
gate, the up projection and the upstream gradient are told apart. The expression is
then evaluated in float64 (its casts mapped to float64, so intermediate roundings drop out) on test
values (rows of ordinary, tiny and large magnitudes, |x| up to 40, so clamps, scaled sigmoids or
shifted gates show) and compared with the float64 SwiGLU; only an expression that agrees to 1e-9 is
replaced. So the rule is about what the graph computes, not how the model's source spells it;
anything else (a clamped SwiGLU, GELU gating, interleaved gate and up columns) keeps its explicit
quantization, and where the expression holds an activation the log says why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .graph import Ctx, call, call_multi, contiguous, finish, replace_outputs, val

aten = torch.ops.aten
prims = torch.ops.prims
ops = torch.ops.fp8flow

ELEMENTWISE = {
    aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar,
    aten.neg.default, aten.exp.default, aten.sigmoid.default, aten.silu.default,
    aten.reciprocal.default, aten.mul.Scalar, aten.add.Scalar, aten.div.Scalar,
    aten.sub.Scalar, prims.convert_element_type.default, aten._to_copy.default,
    aten.silu_backward.default, aten.sigmoid_backward.default, aten.unsqueeze.default,
    aten.alias.default,
}
MAX_NODES = 64  # a SwiGLU and its gradient decompose into ~20 nodes; stop well beyond
ROWS = 24  # rows of test values


def _widened(h: fx.Node) -> fx.Node:
    """The BF16/FP16 source of an exact widening cast to fp32 (the op reads the source)."""
    if (h.op == "call_function" and h.target is prims.convert_element_type.default
            and val(h).dtype == torch.float32
            and val(h.args[0]).dtype in (torch.bfloat16, torch.float16)):
        return h.args[0]
    return h


def _half(n: fx.Node):
    """(h, 0 | 1) if n is the first or second half of h's last dim, else None. h is seen
    through an exact widening cast."""
    r = _half_of(n)
    return None if r is None else (_widened(r[0]), r[1])


def _half_of(n: fx.Node):
    if n.op != "call_function":
        return None
    if n.target is operator.getitem and isinstance(n.args[0], fx.Node):
        sp = n.args[0]
        if sp.target in (aten.split.Tensor, aten.split_with_sizes.default):
            h, size = sp.args[0], sp.args[1]
            dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
            hv = val(h)
            if hv.dim() != 2 or dim % 2 != 1 or hv.shape[1] % 2:
                return None
            half = hv.shape[1] // 2
            sizes = [size, size] if isinstance(size, int) else list(size)
            if sizes[:2] != [half, half] or n.args[1] not in (0, 1):
                return None
            return h, n.args[1]
    if n.target is aten.slice.Tensor:
        h = n.args[0]
        hv = val(h)
        dim, start, end = (list(n.args[1:4]) + [0, None, None][len(n.args) - 1:])[:3]
        step = n.args[4] if len(n.args) > 4 else 1
        if hv.dim() != 2 or dim % 2 != 1 or hv.shape[1] % 2 or step != 1:
            return None
        half = hv.shape[1] // 2
        end = hv.shape[1] if end is None or end > hv.shape[1] else end
        if (start, end) == (0, half):
            return h, 0
        if (start, end) == (half, hv.shape[1]):
            return h, 1
    return None


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _reshaped(n: fx.Node) -> fx.Node | None:
    """n's input if n only regroups the leading dims of it (the last dim and the element count
    kept): [B, S, I] <-> [B*S, I] around a dense layer's 2-D GEMM. Else None."""
    if n.op != "call_function" or n.target not in _RESHAPES:
        return None
    src = n.args[0]
    v, sv = val(n), val(src) if isinstance(src, fx.Node) else None
    if (isinstance(v, torch.Tensor) and isinstance(sv, torch.Tensor) and v.dim() >= 2
            and sv.dim() >= 2 and v.shape[-1] == sv.shape[-1] and v.numel() == sv.numel()):
        return src
    return None


def _flat(n: fx.Node) -> fx.Node:
    """The 2-D tensor a leaf is a [B, S, I] view of (a dense GEMM's output), else the leaf."""
    src = _reshaped(n)
    return src if src is not None and val(src).dim() == 2 else n


def _root(x: fx.Node) -> fx.Node:
    """The [B, S, I] tensor a quantized [B*S, I] operand is a view of, else x."""
    src = _reshaped(x)
    return src if src is not None and val(src).dim() > 2 else x


def _expression(root: fx.Node):
    """Nodes of the elementwise expression ending in root (topological order) and its leaves,
    or None if it is too large."""
    nodes, leaves, stack, seen = [], [], [root], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in ELEMENTWISE and _half(n) is None:
            nodes.append(n)
            stack.extend(n.all_input_nodes)
        else:
            leaves.append(n)
        if len(nodes) > MAX_NODES:
            return None
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), leaves


def _evaluate(nodes: list[fx.Node], env: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """Run the expression in float64: every cast to a floating dtype becomes a cast to float64,
    so the graph's intermediate roundings drop out and what remains is its math."""
    env = dict(env)
    for n in nodes:
        args = list(torch.fx.node.map_arg(n.args, env.__getitem__))
        kwargs = dict(torch.fx.node.map_arg(n.kwargs, env.__getitem__))
        kwargs.pop("device", None)
        if n.target is prims.convert_element_type.default and args[1].is_floating_point:
            args[1] = torch.float64
        if kwargs.get("dtype") is not None and kwargs["dtype"].is_floating_point:
            kwargs["dtype"] = torch.float64
        env[n] = n.target(*args, **kwargs)
    return env[nodes[-1]]


def _swiglu64(h: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    half = h.shape[1] // 2
    g, u = h[:, :half], h[:, half:]
    y = g * torch.sigmoid(g) * u
    return y if p is None else y * p.view(-1, 1)


def _swiglu_grad64(d: torch.Tensor, h: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    half = h.shape[1] // 2
    g, u = h[:, :half], h[:, half:]
    sig = torch.sigmoid(g)
    dg, du = d * u * sig * (1 + g * (1 - sig)), d * g * sig
    if p is not None:
        dg, du = dg * p.view(-1, 1), du * p.view(-1, 1)
    return torch.cat([dg, du], 1)


def _test_h(half: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 2 * half, generator=g) * 3
    x[0::4] *= 1e-3  # tiny
    x[1::4] = x[1::4].sign() * (8 + 32 * torch.rand(half * 2, generator=g))  # large: clamps show
    return x.to(dtype).double()  # values the graph's dtype holds, evaluated in float64


def _test_vec(rows: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, 1, generator=g) + 0.1).to(dtype).double()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Both in float64 and exact math apart from float64 rounding: an expression that is
    # SwiGLU agrees to ~1e-15; one scaled or shifted by 1e-6 does not.
    tol = 1e-9 * b.abs() + 1e-12 * b.abs().max()
    return bool(torch.all((a - b).abs() <= tol) and torch.isfinite(a).all())


def _classify(leaves: list[fx.Node], rows: int, width: int):
    """Split leaves into (h, {leaf: half index}, per-row leaves, full-width leaves)."""
    h, halves, per_row, full = None, {}, [], []
    for leaf in leaves:
        hf = _half(leaf)
        if hf is not None:
            if h is not None and hf[0] is not h:
                return None
            h = hf[0]
            halves[leaf] = hf[1]
            continue
        v = val(leaf)
        if not isinstance(v, torch.Tensor):
            return None
        if tuple(v.shape) in ((rows, 1), (rows,)):
            per_row.append(leaf)
        elif tuple(v.shape) == (rows, width):
            full.append(leaf)
        else:
            return None
    if h is None or val(h).shape[1] != 2 * width:
        return None
    return h, halves, per_row, full


def _env(halves, h_test, per_row, probs_test):
    width = h_test.shape[1] // 2
    env = {leaf: h_test[:, i * width:(i + 1) * width] for leaf, i in halves.items()}
    for leaf in per_row:
        env[leaf] = probs_test.view(-1) if val(leaf).dim() == 1 else probs_test
    return env


NOT_HALVES = ("its inputs are neither the two halves of one [P, 2I] tensor nor two [P, I] "
              "tensors (interleaved columns, or an op the rule does not follow such as a "
              "clamp)")
NOT_SWIGLU = "it is not silu(gate) * up on test values (a clamped or scaled gate?)"


def _looks_gated(nodes: list[fx.Node]) -> bool:
    """An activation is in the expression: worth saying why it was not fused."""
    return any(n.target in (aten.exp.default, aten.sigmoid.default, aten.silu.default)
               for n in nodes)


def _full_and_rows(leaves: list[fx.Node], rows: int, width: int):
    """(the distinct [rows, width] tensors the leaves are, seen through _flat; per-row leaves),
    or None if another shape is among them."""
    full, per_row = [], []
    for leaf in leaves:
        v = val(_flat(leaf))
        if not isinstance(v, torch.Tensor):
            return None
        if tuple(v.shape) in ((rows, 1), (rows,)):
            per_row.append(leaf)
        elif tuple(v.shape) == (rows, width):
            if _flat(leaf) not in full:
                full.append(_flat(leaf))
        else:
            return None
    return full, per_row


def _pair_test(width: int, gate: fx.Node, up: fx.Node):
    """Test values for a gate and an up tensor, each in its node's dtype, and the [ROWS, 2I]
    float64 h they make side by side."""
    g = _test_h(width, val(gate).dtype)[:, :width]
    u = _test_h(width, val(up).dtype)[:, width:]
    return g, u, torch.cat([g, u], 1)


def _leaf_env(leaves: list[fx.Node], tests: dict[fx.Node, torch.Tensor], env: dict) -> dict:
    """Test values for the leaves themselves, from those of the tensors they are views of."""
    for leaf in leaves:
        if _flat(leaf) in tests:
            env[leaf] = tests[_flat(leaf)]
    return env


def _match_forward_pair(x: fx.Node, nodes, leaves, why: list[str]):
    """(gate, up, probs leaf or None) if x = silu(gate) * up [* probs] over two [P, I]
    tensors (or [B, S, I] views of them)."""
    rows, width = val(x).shape
    c = _full_and_rows(leaves, rows, width)
    if c is None or len(c[0]) != 2 or len(c[1]) > 1:
        return None
    full, per_row = c
    p_test = _test_vec(ROWS, val(per_row[0]).dtype, 1) if per_row else None
    for gate, up in (full, full[::-1]):
        g_test, u_test, h_test = _pair_test(width, gate, up)
        env = _leaf_env(leaves, {gate: g_test, up: u_test}, _env({}, h_test, per_row, p_test))
        try:
            got = _evaluate(nodes, env)
        except Exception:  # an op our test values do not fit: no match
            return None
        if _close(got, _swiglu64(h_test, p_test)):
            return gate, up, (per_row[0] if per_row else None)
    why.append(NOT_SWIGLU)
    return None


def _match_backward_pair(x: fx.Node, pairs: list[tuple[fx.Node, fx.Node]], why: list[str]):
    """(plane 0 | 1, dA, gate, up, probs leaf or None) if x [P, I] is d_gate (0) or d_up (1) of
    the SwiGLU of a (gate, up) pair the forward fused."""
    xv = val(x)
    if xv.dim() != 2 or not pairs:
        return None
    expr = _expression(_root(x))
    if expr is None or not expr[0]:
        return None
    nodes, leaves = expr
    rows, width = xv.shape
    c = _full_and_rows(leaves, rows, width)
    if c is None or len(c[1]) > 1:
        return None
    full, per_row = c
    p_test = _test_vec(ROWS, val(per_row[0]).dtype, 1) if per_row else None
    for gate, up in pairs:
        rest = [leaf for leaf in full if leaf is not gate and leaf is not up]
        if gate not in full or len(rest) != 1:
            continue
        d_a = rest[0]
        g_test, u_test, h_test = _pair_test(width, gate, up)
        d_test = (torch.randn(ROWS, width, generator=torch.Generator().manual_seed(2))
                  .to(val(d_a).dtype).double())
        env = _leaf_env(leaves, {gate: g_test, up: u_test, d_a: d_test},
                        _env({}, h_test, per_row, p_test))
        try:
            got = _evaluate(nodes, env)
        except Exception:
            return None
        want = _swiglu_grad64(d_test, h_test, p_test)
        for i in (0, 1):
            if _close(got, want[:, i * width:(i + 1) * width]):
                return i, d_a, gate, up, (per_row[0] if per_row else None)
        if NOT_SWIGLU not in why:
            why.append(NOT_SWIGLU)  # and try the other pairs
    return None


def _match_forward(x: fx.Node, why: list[str]):
    """(h, probs leaf or None, None) if x = silu(h[:, :I]) * h[:, I:] [* probs], or
    (gate, probs leaf or None, up) if x = silu(gate) * up [* probs]."""
    xv = val(x)
    if xv.dim() != 2:
        return None
    expr = _expression(_root(x))
    if expr is None or not expr[0]:
        return None
    nodes, leaves = expr
    c = _classify(leaves, xv.shape[0], xv.shape[1])
    if c is None or c[3] or len(c[2]) > 1:
        if c is None:
            pair = _match_forward_pair(x, nodes, leaves, why)
            if pair is not None:
                return pair[0], pair[2], pair[1]
        if _looks_gated(nodes) and not why:
            why.append(NOT_HALVES)
        return None
    h, halves, per_row, _ = c
    hv = val(h)
    h_test = _test_h(xv.shape[1], hv.dtype)
    p_test = _test_vec(ROWS, val(per_row[0]).dtype, 1) if per_row else None
    try:
        got = _evaluate(nodes, _env(halves, h_test, per_row, p_test))
    except Exception:  # an op our test values do not fit: no match
        return None
    if not _close(got, _swiglu64(h_test, p_test)):
        why.append(NOT_SWIGLU)
        return None
    return h, (per_row[0] if per_row else None), None


def _is_zeros(n: fx.Node) -> bool:
    return (isinstance(n, fx.Node) and n.target in (aten.full.default, aten.zeros.default)
            and (n.target is aten.zeros.default or n.args[1] == 0))


def _grad_halves(x: fx.Node):
    """[d_first_half, d_second_half] if x [P, 2I] is assembled from its two halves: the
    backward of split/chunk (cat) or of slicing (a sum of slice_scatters into zeros)."""
    xv = val(x)
    if xv.dim() != 2 or xv.shape[1] % 2:
        return None
    half = xv.shape[1] // 2
    if x.target is prims.convert_element_type.default:  # the gradient of an fp32 h, cast
        x = x.args[0]
    if x.target is aten.cat.default:
        dim = x.args[1] if len(x.args) > 1 else 0
        if len(x.args[0]) != 2 or dim % 2 != 1:
            return None
        if any(val(p).shape[1] != half for p in x.args[0]):
            return None
        return list(x.args[0])
    if x.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in x.args):
        found = {}
        for sc in x.args:
            if sc.target is not aten.slice_scatter.default or not _is_zeros(sc.args[0]):
                return None
            dim, start, end = (list(sc.args[2:5]) + [0, None, None][len(sc.args) - 2:])[:3]
            end = xv.shape[1] if end is None or end > xv.shape[1] else end
            if dim % 2 != 1 or (start, end) not in ((0, half), (half, 2 * half)):
                return None
            found[start // half] = sc.args[1]
        if len(found) == 2:
            return [found[0], found[1]]
    return None


def _match_backward(x: fx.Node, why: list[str]):
    """(dA, h, probs leaf or None) if x [P, 2I] holds the SwiGLU gradient (d_gate, d_up)."""
    xv = val(x)
    halves = _grad_halves(x)
    if halves is None:
        return None
    rows, width = xv.shape[0], xv.shape[1] // 2
    parts = []
    for part in halves:
        expr = _expression(part)
        if expr is None or not expr[0]:
            return None
        parts.append(expr)
    c = _classify(parts[0][1] + parts[1][1], rows, width)
    if c is None or len(set(c[3])) != 1 or len(set(c[2])) > 1:
        if _looks_gated(parts[0][0] + parts[1][0]):
            why.append(NOT_HALVES)
        return None
    h, halves, per_row, full = c
    d_a = full[0]
    hv = val(h)
    h_test = _test_h(width, hv.dtype)
    d_test = (torch.randn(ROWS, width, generator=torch.Generator().manual_seed(2))
              .to(val(d_a).dtype).double())
    p_test = _test_vec(ROWS, val(per_row[0]).dtype, 1) if per_row else None
    env = _env(halves, h_test, per_row, p_test)
    env[d_a] = d_test
    want = _swiglu_grad64(d_test, h_test, p_test)
    for i, (nodes, _) in enumerate(parts):
        try:
            got = _evaluate(nodes, env)
        except Exception:
            return None
        if not _close(got, want[:, i * width:(i + 1) * width]):
            why.append(NOT_SWIGLU)
            return None
    return d_a, h, (per_row[0] if per_row else None)


def _probs_arg(gm: fx.GraphModule, p: fx.Node | None):
    if p is None:
        return None
    if val(p).dim() != 1:  # [P, 1], or [B, S, 1] around a dense layer: one value per row
        p = call(gm, aten.view.default, (contiguous(gm, p), [-1]))
    return contiguous(gm, p)


def _tiled(h: fx.Node, up: fx.Node | None = None) -> str | None:
    for n in (h, up):
        if n is not None and val(n).dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"{n.name} has dtype {val(n).dtype}"
    if up is not None:
        width = val(h).shape[1]
        return None if width % 128 == 0 else f"I = {width} is not a multiple of 128 (1x128 tiles)"
    width = val(h).shape[1] // 2
    if width % 128:
        return f"I = {width} is not a multiple of 128 (tiles would straddle gate/up)"
    return None


def _transposed(gm: fx.GraphModule, qs: list[fx.Node], offs, align: int) -> list[fx.Node]:
    args = (qs[0], qs[1], offs) + ((align,) if align > 1 else ())
    return call_multi(gm, ops.scaling_aware_transpose.default, args, 2, name=f"t_{qs[0].name}")


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    changed = False
    pairs: list[tuple[fx.Node, fx.Node]] = []  # (gate, up) of the forward SwiGLUs fused
    planes: dict[tuple, list[fx.Node]] = {}  # one split backward per (dA, gate, up, probs)
    for n in list(gm.graph.nodes):
        col = n.target is ops.quantize_1x128_col.default
        if not col and (n.target is not ops.quantize_1x128.default
                        or (len(n.args) > 1 and n.args[1])):
            continue
        # A column-wise quantization is left only where no GEMM needed the row-wise form (a
        # wgrad whose dgrad is not computed): the fused op's row-wise output, transposed.
        offs = n.args[1] if col and len(n.args) > 1 else None
        align = n.args[2] if col and len(n.args) > 2 else 1
        x = n.args[0]
        why: list[str] = []
        with unset_fake_temporarily():  # the test values are real tensors
            # The gradient of a fused pair first: d_up = dA * silu(gate) is also silu(gate)
            # times a tensor, which the forward rule would take for another SwiGLU.
            pair_bwd = _match_backward_pair(x, pairs, why)
            fwd = bwd = None
            if pair_bwd is None:
                why.clear()
                fwd = _match_forward(x, why)
                bwd = None if fwd is not None else _match_backward(x, why)
        if pair_bwd is not None:
            _replace_with_plane(gm, ctx, n, x, pair_bwd, planes, offs, align, col)
            changed = True
            continue
        if fwd is None and bwd is None:
            if why:
                ctx.log.append(f"fuse: quantization of {x.name} kept, not fused into a SwiGLU "
                               f"op: {why[0]}")
            continue
        d_a, h, p, up = (None, *fwd) if fwd is not None else (*bwd, None)
        why = _tiled(h, up)
        if why:
            kind = "SwiGLU" if d_a is None else "SwiGLU backward"
            ctx.log.append(f"fuse: {kind} of {h.name} kept unfused: {why}")
            continue
        with gm.graph.inserting_before(n):
            if d_a is None:
                target, name = ops.swiglu_quant.default, f"swiglu_{h.name}"
                args = (contiguous(gm, h), _probs_arg(gm, p))
                if up is not None:
                    args += (contiguous(gm, up),)
                    pairs.append((h, up))
            else:
                target, name = ops.swiglu_quant_backward.default, f"swiglu_bwd_{h.name}"
                args = (contiguous(gm, d_a), contiguous(gm, h), _probs_arg(gm, p))
            new = call_multi(gm, target, args, len(target._schema.returns), name=name)[:2]
            new = _transposed(gm, new, offs, align) if col else new
        replace_outputs(gm, n, new)
        what = f"SwiGLU({h.name})" if d_a is None else f"SwiGLU gradient of {h.name}"
        if up is not None:
            what = f"SwiGLU({h.name}, {up.name})"
        ctx.log.append(f"fuse: quantization of {x.name} = {what} -> {target._opname}")
        changed = True
    if changed:
        finish(gm, dead_code=True)
    return gm


def _replace_with_plane(gm, ctx, n, x, match, planes, offs, align, col) -> None:
    """Quantize node n of d_gate (plane 0) or d_up (plane 1) -> that plane of the split SwiGLU
    backward of its (gate, up) pair, made once for both."""
    i, d_a, gate, up, p = match
    key = (d_a, gate, up, p)
    with gm.graph.inserting_before(n):
        if key not in planes:
            args = (contiguous(gm, d_a), contiguous(gm, gate), _probs_arg(gm, p), None,
                    contiguous(gm, up), True)
            planes[key] = call_multi(gm, ops.swiglu_quant_backward.default, args, 3,
                                     name=f"swiglu_bwd_{gate.name}")[:2]
        q, s = planes[key]
        new = [call(gm, aten.select.int, (q, 0, i)), call(gm, aten.select.int, (s, 0, i))]
        new = _transposed(gm, new, offs, align) if col else new
    replace_outputs(gm, n, new)
    what = ("d_gate", "d_up")[i]
    ctx.log.append(f"fuse: quantization of {x.name} = {what} of SwiGLU({gate.name}, {up.name}) "
                   f"-> swiglu_quant_backward (split), plane {i}")
