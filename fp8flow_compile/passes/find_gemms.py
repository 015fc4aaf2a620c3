"""Find the GEMMs of a joint (forward + backward) ATen graph and decide which go to FP8.

Expects: the AOTAutograd joint graph (placeholders `primals_*` then `tangents_*`).
Guarantees: `ctx.gemms` holds one `Gemm` per mm / addmm / bmm / _grouped_mm node, with its
operands classified (activation, or weight = a parameter seen through views and transposes), its
phase, and `fp8` set with a `reason` for every GEMM left in BF16. The graph is not changed.

Rules, in order: operands must be BF16/FP16 (FP32 GEMMs are the user's choice of precision);
batched matmul stays BF16; the router (a GEMM whose output reaches top-k) stays BF16 unless
`options["fp8_router"]`; `options["exclude"]` / `options["include"]` match parameter paths; on
CUDA a weight whose GEMMs are too small for FP8 to pay stays BF16 (`intensity`, below); the
contracted dim of fprop/dgrad forms must be a multiple of the scale tile. Backward GEMMs follow
the forward GEMM of the same weight when that one was kept in BF16 by policy (router, exclude).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .graph import Ctx, backward_nodes, size_hint, strip, val

aten = torch.ops.aten
GEMM_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default}
LOW = (torch.bfloat16, torch.float16)

#: Default `options["fp8_min_intensity"]` on CUDA devices. FP8 saves GEMM time in proportion to
#: the multiply-adds, M*K*N per group, and costs quantization traffic in proportion to the
#: operands, M*K (input), M*N (gradient) and K*N per group (weight); so whether it pays depends on
#: their ratio, the arithmetic intensity of one group's GEMM, M*K*N / (M*K + M*N + K*N) =
#: 1 / (1/M + 1/K + 1/N), M the mean rows per group. Measured in the layer on the H100
#: (docs/benchmarks.md, "Which weights pay"), every weight at 878 or more sped the layer up with
#: the other weight in FP8 too or alone, at 683 or less none gained more than 2%, and
#: at 819 an FC1 alone slowed it (0.98x) while an FC2 alone sped it up (1.13x) but not beside an
#: FP8 FC1 (1.09x with both against 1.23x with the FC1 alone).
MIN_INTENSITY_CUDA = 850.0


@dataclasses.dataclass
class Gemm:
    node: fx.Node
    kind: str  # "mm", "addmm", "bmm", "grouped" (2-D x 3-D), "grouped_wgrad" (2-D x 2-D)
    phase: str  # "forward" | "backward"
    a: fx.Node
    b: fx.Node
    offs: fx.Node | None
    weight: str | None = None  # parameter path of the weight this GEMM reads or differentiates
    b_is_weight: bool = False  # b is that parameter (through views): 128x128 blocks
    fp8: bool = False
    reason: str = ""
    policy: bool = False  # kept in BF16 by policy (router/exclude), inherited by partners
    # the weight of the GEMM this one runs as one call with (passes/merge_gate_up.py): node
    # is then the merged call, and its output shape that of both
    merged_with: str | None = None

    def describe(self) -> str:
        shape = "x".join(str(d) for d in val(self.node).shape)
        w = f" weight={self.weight}" if self.weight else ""
        m = f", one call with {self.merged_with}'s" if self.merged_with else ""
        return f"{self.node.name} ({self.kind}, {self.phase}, out {shape}{w}{m})"


def _operands(n: fx.Node):
    if n.target is aten.addmm.default:
        return n.args[1], n.args[2], None
    if n.target is aten._grouped_mm.default:
        offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
        return n.args[0], n.args[1], offs
    return n.args[0], n.args[1], None


def _reaches_topk(n: fx.Node, limit: int = 12) -> bool:
    frontier, seen = [n], set()
    for _ in range(limit):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.target is aten.topk.default:
                    return True
                if u.target not in GEMM_OPS:  # a GEMM in between makes n the layer before
                    nxt.append(u)
        frontier = nxt
    return False


def _grad_of(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Map the nodes producing parameter gradients (through views) to the parameter name."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    primals = [n for n in gm.graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    grads = outs[len(outs) - len(primals):]
    res = {}
    for p, g in zip(primals, grads):
        if isinstance(g, fx.Node):
            src, _ = strip(g)
            res[src] = p.name
    return res


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    opts = ctx.options
    bwd = backward_nodes(gm)
    grad_src = _grad_of(gm)
    gemms: list[Gemm] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in GEMM_OPS:
            continue
        a, b, offs = _operands(n)
        kind = {aten.mm.default: "mm", aten.addmm.default: "addmm",
                aten.bmm.default: "bmm"}.get(n.target, "grouped")
        if kind == "grouped" and val(b).dim() == 2:
            kind = "grouped_wgrad"
        g = Gemm(n, kind, "backward" if n in bwd else "forward", a, b, offs)
        bsrc, _ = strip(b)
        if bsrc.op == "placeholder" and ctx.params.get(bsrc.name, (False, ""))[0]:
            g.weight = ctx.params[bsrc.name][1]
            g.b_is_weight = True
        gemms.append(g)

    # Policy decisions on forward GEMMs, by the weight they read.
    policy_bf16: dict[str, str] = {}
    for g in gemms:
        if g.phase != "forward" or g.weight is None:
            continue
        if not opts.get("fp8_router", False) and _reaches_topk(g.node):
            policy_bf16[g.weight] = ("router GEMM (its output feeds top-k); "
                                     "options['fp8_router']=True takes it to FP8")
        elif any(s in g.weight for s in opts.get("exclude", ())):
            policy_bf16[g.weight] = f"excluded by options['exclude'] ({g.weight})"
        elif opts.get("include") and not any(s in g.weight for s in opts["include"]):
            policy_bf16[g.weight] = f"not matched by options['include'] ({g.weight})"
        else:
            small = _too_small(g, opts)
            if small:
                policy_bf16[g.weight] = small
    weight_of_param = {name: path for name, (is_p, path) in ctx.params.items() if is_p}

    for g in gemms:
        partner = g.weight
        if partner is None and g.node in grad_src:  # wgrad of a parameter
            partner = weight_of_param.get(grad_src[g.node])
            g.weight = partner
        if partner in policy_bf16:
            g.fp8, g.reason, g.policy = False, policy_bf16[partner], True
            continue
        g.fp8, g.reason = _shape_rule(g)
    ctx.gemms = gemms
    return gm


def _shape_rule(g: Gemm) -> tuple[bool, str]:
    va, vb = val(g.a), val(g.b)
    if va.dtype not in LOW or vb.dtype not in LOW:
        return False, (f"operands are {va.dtype}/{vb.dtype}: only BF16/FP16 GEMMs are taken "
                       f"to FP8")
    if g.kind == "bmm":
        return False, "batched matmul (bmm) is left in BF16"
    if g.kind == "grouped" or (g.kind in ("mm", "addmm") and g.b_is_weight):
        # A weight's 128x128 blocks pair with whole 1x128 tiles; two activations (the wgrad
        # form) may end in a partial tile.
        k = va.shape[-1]
        if k % 128:
            return False, f"contracted dim {k} is not a multiple of 128 (1x128 tiles)"
    if g.kind == "addmm":
        beta = g.node.kwargs.get("beta", 1)
        alpha = g.node.kwargs.get("alpha", 1)
        if beta != 1 or alpha != 1:
            return False, "addmm with alpha/beta != 1"
    if g.kind == "grouped" and not g.b_is_weight:
        return False, "grouped GEMM whose 3-D operand is not a parameter"
    if g.kind in ("grouped", "grouped_wgrad") and g.offs is None:
        return False, "grouped GEMM without offsets"
    return True, "FP8"


def min_intensity(opts: dict, device: torch.device) -> float:
    """The intensity threshold in force: `options["fp8_min_intensity"]`, else MIN_INTENSITY_CUDA
    on CUDA and 0 elsewhere (the CPU runs the FP8 references to check numerics, not for speed)."""
    v = opts.get("fp8_min_intensity")
    if v is None:
        return MIN_INTENSITY_CUDA if device.type == "cuda" else 0.0
    return float(v)


def _group_dims(g: Gemm) -> tuple[float, int, int]:
    """(mean rows per group M, contracted K, output N) of a forward GEMM."""
    va, vo = val(g.a), val(g.node)
    groups = size_hint(val(g.offs).shape[0]) if g.offs is not None else 1
    return (size_hint(va.shape[0]) / max(groups, 1), size_hint(va.shape[-1]),
            size_hint(vo.shape[-1]))


def intensity(g: Gemm) -> float:
    """1 / (1/M + 1/K + 1/N) of a forward GEMM: M rows per group (mean), K contracted, N out."""
    m, k, n = _group_dims(g)
    if min(m, k, n) <= 0:
        return 0.0
    return 1.0 / (1.0 / m + 1.0 / k + 1.0 / n)


def _too_small(g: Gemm, opts: dict) -> str:
    """Why the weight's GEMMs stay BF16 for their size, or "" if they may go to FP8."""
    limit = min_intensity(opts, val(g.a).device)
    if limit <= 0:
        return ""
    got = intensity(g)
    if got >= limit:
        return ""
    m, k, n = _group_dims(g)
    return (f"too small for FP8 to pay: intensity {got:.0f} ({m:.0f} rows per group x {k} x "
            f"{n}) < options['fp8_min_intensity']={limit:g}")
