"""The `fp8flow` torch.compile backend (entry point `torch_dynamo_backends: fp8flow`).

    torch.compile(model, backend="fp8flow", options={...})

Forward and backward are captured together (the AOTAutograd joint graph), rewritten into one FP8
dataflow by the passes in `fp8flow_compile.passes`, partitioned (the backward then reads the FP8
tensors the forward made), and compiled by Inductor (default) or run eagerly.

Options:
- ``flow`` (bool, default True): False runs the naive Q/DQ graph (every GEMM operand quantized
  from its high-precision value), the baseline for numerics and speed.
- ``inner`` ("inductor" | "eager"): what compiles the rewritten graphs.
- ``fp8_router`` (bool, default False): take the router GEMM to FP8 too.
- ``include`` / ``exclude`` (lists of substrings of parameter paths): which weights' GEMMs may go
  to FP8.
- ``fp8_min_intensity`` (float): a weight's GEMMs go to FP8 only where the arithmetic intensity
  of its forward GEMM per group, 1 / (1/M + 1/K + 1/N), reaches this; smaller ones stay BF16
  with the reason in the report. Default 850 on CUDA (measured on the H100, see
  passes/find_gemms.py), 0 elsewhere; 0 takes every eligible GEMM to FP8.
- ``fp8_swiglu_input`` (bool, default True): the backward keeps the SwiGLU input (the FC1
  output) in FP8 rather than BF16, as DeepSeek-V3 does (passes/flow_save.py).
- ``cache_weights`` (bool, default False): keep each parameter's FP8 forms across calls and
  quantize it again only after an optimizer step or another in-place change (its `_version`),
  so gradient-accumulation micro-batches after the first skip the weight quantization. Costs
  the FP8 weights' memory between steps. Writes through `.data`, `p.data = t` swaps and other
  tensors sharing the weight's storage are not seen outside an optimizer step: call
  `fp8flow_compile.clear_weight_cache()` after such updates (kernels/weight_cache.py).
- ``block_scales`` (bool, default True): the wgrad GEMMs read the scaling-aware transpose's
  scales as the 128x128 blocks they are, which cuBLAS runs faster; the same values
  (passes/block_scales.py). False keeps the per-row form, for comparisons.
- ``merge_gate_up`` (bool, default True): a SwiGLU whose gate and up are GEMMs over weights of
  their own (torchtitan's w1 / w3, a Llama MLP's gate_proj / up_proj) runs its FC1 GEMMs as one
  over both weights, forward and dgrad, as for a stacked weight (passes/merge_gate_up.py). False
  keeps two GEMMs each, for comparisons. Not applied with ``cache_weights``.
- ``align_groups`` ("auto" | int, default "auto"): lay the expert rows out with every group
  starting on a multiple of this many rows (zero rows between groups), so that DeepGEMM's
  grouped GEMM, which needs 128, runs whatever loads the router gives the experts
  (passes/align_groups.py). "auto": 128 where DeepGEMM is installed and takes the layer's
  GEMMs, else nothing; 0 never. The same results bit for bit.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
import torch.fx as fx

from . import passes
from .passes.graph import Ctx, size_hint
from .recipe import DEFAULT
from .report import GraphRecord, Report

log = logging.getLogger(__name__)

_LAST = Report()
_KNOWN = {"flow", "inner", "fp8_router", "include", "exclude", "fp8_min_intensity",
          "fp8_swiglu_input", "probs_in_swiglu", "cache_weights", "block_scales",
          "merge_gate_up", "align_groups"}


def last_report() -> Report:
    """The report of the most recent `torch.compile(..., backend="fp8flow")` call's graphs."""
    return _LAST


def _param_path(source_name: str) -> str:
    keys = [k for k in re.findall(r"\['([^']+)'\]", source_name)
            if k not in ("self",)]
    return ".".join(k for k in keys if k not in ("_modules", "_parameters"))


def _decompositions():
    # Inductor's own table. Keeping aten.silu whole for a future SwiGLU fusion pass fails on
    # torch 2.11 ("both a fallback and a decomp for same op: aten.silu"), so the fusion will have
    # to match the decomposed form.
    from torch._inductor.decomposition import select_decomp_table
    return select_decomp_table()


def _saved_bytes(joint: fx.GraphModule, num_fwd_outputs: int,
                 params: dict[str, tuple[bool, str]]) -> tuple[dict, dict]:
    """Bytes the forward saves for backward, by dtype: (activations, weight copies).

    A saved tensor computed from parameters alone (a view of a weight, its FP8 copy) is a weight
    copy; anything that depends on an input is an activation. Graph inputs themselves are not
    counted (they are alive anyway)."""
    import copy

    from torch._functorch.partitioners import min_cut_rematerialization_partition
    gm = copy.deepcopy(joint)
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fw, _ = min_cut_rematerialization_partition(gm, inputs, num_fwd_outputs=num_fwd_outputs)
    from_weights: dict[fx.Node, bool] = {}
    for n in fw.graph.nodes:
        if n.op == "placeholder":
            from_weights[n] = params.get(n.name, (False, ""))[0]
        else:
            ins = n.all_input_nodes
            from_weights[n] = bool(ins) and all(from_weights.get(a, False) for a in ins)
    out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    acts: dict[str, int] = {}
    weights: dict[str, int] = {}
    for n in out[num_fwd_outputs:]:
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        if not isinstance(v, torch.Tensor) or _view_of_input(n):
            continue
        res = weights if from_weights.get(n) else acts
        key = str(v.dtype).replace("torch.", "")
        res[key] = res.get(key, 0) + size_hint(v.numel()) * v.element_size()
    return acts, weights


_VIEWS = {"view", "_unsafe_view", "permute", "t", "transpose", "expand", "alias", "slice",
          "select", "unsqueeze", "squeeze", "as_strided"}


def _view_of_input(n: fx.Node) -> bool:
    """n is a graph input or a view of one: it costs no memory of its own."""
    while n.op == "call_function" and getattr(n.target, "_opname", None) in _VIEWS:
        n = n.args[0]
    return n.op == "placeholder"


def _num_fwd_outputs(gm: fx.GraphModule) -> int:
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    n_primals = sum(1 for n in gm.graph.nodes
                    if n.op == "placeholder" and "tangents" not in n.name)
    return len(outs) - n_primals


def fp8flow(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    options = dict(options or {})
    unknown = set(options) - _KNOWN
    if unknown:
        raise ValueError(f"fp8flow: unknown options {sorted(unknown)}; known: {sorted(_KNOWN)}")
    mi = options.get("fp8_min_intensity")
    if mi is not None and (isinstance(mi, bool) or not isinstance(mi, (int, float)) or mi < 0):
        raise ValueError(f"fp8flow: options['fp8_min_intensity'] must be a number >= 0, got {mi!r}")
    ag = options.get("align_groups", "auto")
    if ag != "auto" and (not isinstance(ag, (bool, int)) or ag < 0):
        raise ValueError(f"fp8flow: options['align_groups'] must be 'auto' or an int >= 0, "
                         f"got {ag!r}")
    inner = options.get("inner", "inductor")
    if inner not in ("inductor", "eager"):
        raise ValueError(f"fp8flow: options['inner'] must be 'inductor' or 'eager', got {inner}")

    # Which graph inputs are parameters, by placeholder order (AOTAutograd names them primals_i).
    params: dict[str, tuple[bool, str]] = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (ph, ex) in enumerate(zip(phs, example_inputs)):
        ga = ph.meta.get("grapharg")
        path = _param_path(ga.source.name) if ga is not None else ph.name
        params[f"primals_{i + 1}"] = (isinstance(ex, torch.nn.Parameter), path)
    graph_name = f"graph_{len(_LAST.records)}"
    made: list[GraphRecord] = []  # the record, once joint_pass has made it

    def joint_pass(joint: fx.GraphModule) -> None:
        ctx = Ctx(recipe=DEFAULT, options=options, params=params)
        nfo = _num_fwd_outputs(joint)
        rec = passes.run_joint(joint, ctx)
        saved = {}
        try:
            (saved["bf16_baseline"], saved["bf16_baseline_weights"]) = _saved_bytes(
                rec["before"], nfo, params)
            saved["fp8flow"], saved["fp8flow_weights"] = _saved_bytes(joint, nfo, params)
        except Exception as e:  # the report must not break a compile
            log.warning("fp8flow: saved-activation accounting failed: %s", e)
        gemms = [{"name": g.node.name, "describe": g.describe(), "fp8": g.fp8,
                  "reason": g.reason, "phase": g.phase, "weight": g.weight} for g in ctx.gemms]
        record = GraphRecord(graph_name, gemms, rec["casts_naive"], rec["casts_after"], saved,
                             {k: rec[k] for k in ("before", "naive", "after")}, ctx.log,
                             rec["casts_by_module"])
        _LAST.records.append(record)
        made[:] = [record]
        _trace(graph_name, rec)

    def graph_pass(g: fx.GraphModule) -> None:
        """On each partitioned graph before it is compiled: kept in the report."""
        if made:
            bwd = any(n.op == "placeholder" and "tangents" in n.name for n in g.graph.nodes)
            made[0].graphs["backward" if bwd else "forward"] = copy.deepcopy(g)

    if inner == "eager":
        return _compile_eager(gm, example_inputs, joint_pass, graph_pass)
    return _compile_inductor(gm, example_inputs, joint_pass, graph_pass)


def _trace(name: str, rec: dict) -> None:
    for stage in ("naive", "after"):
        code = rec[stage].print_readable(print_output=False)
        log.debug("fp8flow %s %s graph:\n%s", name, stage, code)
        try:
            torch._logging.trace_structured(
                "artifact",
                metadata_fn=lambda s=stage: {"name": f"fp8flow_{name}_{s}",
                                             "encoding": "string"},
                payload_fn=lambda c=code: c)
        except Exception:  # tlparse artifacts are best effort across torch versions
            pass


def _compile_eager(gm, example_inputs, joint_pass, graph_pass):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def partition(joint, joint_inputs, **kwargs):
        joint_pass(joint)
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def boxed(g, _inputs):
        graph_pass(g)
        return make_boxed_func(g.forward)

    return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition,
                        decompositions=_decompositions())(gm, example_inputs)


def _compile_inductor(gm, example_inputs, joint_pass, graph_pass):
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class JointPass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            joint_pass(graph.owning_module)

        def uuid(self) -> Any:
            # The rewrite depends on the options and on this package's code; caches key on it.
            from . import __version__
            return f"fp8flow-{__version__}"

    class GraphPass(JointPass):
        def __call__(self, graph: fx.Graph) -> None:
            graph_pass(graph.owning_module)

    import torch._functorch.config as fconfig
    # A cache hit would skip the joint pass and leave the report empty.
    with fconfig.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=_decompositions(),
                          config_patches={"joint_custom_pre_pass": JointPass(),
                                          "post_grad_custom_post_pass": GraphPass(),
                                          "fx_graph_cache": False})
