"""Flow rewrite "save": the backward keeps the SwiGLU input h in FP8, not in BF16.

Expects: a graph after flow_fuse (the SwiGLU and its gradient are `swiglu_quant` and
`swiglu_quant_backward` nodes). Guarantees: where a forward `swiglu_quant(h, probs)` and the
backward's `swiglu_quant_backward(dA, h, probs)` read the same h, and nothing else in the backward
reads h, the forward op becomes `swiglu_quant_save(h, probs)`, which also writes h quantized 1x128
along 2I from the same pass over h, and the backward op reads that FP8 copy with its scales. The
partitioner then keeps 1 byte per element of h (plus one fp32 scale per 128) instead of 2: at the
Mixtral-like shape h is 16384 x 28672, 896 MiB in BF16.

DeepSeek-V3 trains this way (it caches the SwiGLU inputs in FP8 with its fine-grained
quantization). The forward output is unchanged; the backward computes the SwiGLU gradient at the
dequantized h, whose elements are within 2^-4 of h's relative to their 1x128 tile. Off with
`options["fp8_swiglu_input"] = False`.

Gate and up from two GEMMs (`swiglu_quant(gate, probs, up)` and the split backward of the same
two): both are kept as the one FP8 copy [P, 2I], gate then up, and the backward reads it as it
reads a saved h.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import Ctx, call_multi, finish, forward_required, replace_outputs

ops = torch.ops.fp8flow


def _pair_backward(u: fx.Node, gate: fx.Node, up: fx.Node) -> bool:
    """u is the split SwiGLU backward of this gate and up, from their high-precision values."""
    return (u.target is ops.swiglu_quant_backward.default and len(u.args) == 6
            and u.args[1] is gate and u.args[3] is None and u.args[4] is up
            and u.args[5] is True and not u.kwargs)


def run(gm: fx.GraphModule, ctx: Ctx) -> fx.GraphModule:
    if not ctx.options.get("fp8_swiglu_input", True):
        return gm
    fwd = forward_required(gm)
    changed = False
    for n in list(gm.graph.nodes):
        if n.target is not ops.swiglu_quant.default or n not in fwd:
            continue
        h = n.args[0]
        probs = n.args[1] if len(n.args) > 1 else n.kwargs.get("probs")
        up = n.args[2] if len(n.args) > 2 else n.kwargs.get("up")
        srcs = [h] if up is None else [h, up]  # gate and up from two GEMMs: both are kept
        later = list(dict.fromkeys(u for src in srcs for u in src.users if u not in fwd))
        if up is None:
            bwd = [u for u in later if u.target is ops.swiglu_quant_backward.default
                   and u.args[1] is h and len(u.args) < 4 and not u.kwargs]
        else:
            bwd = [u for u in later if _pair_backward(u, h, up)]
        if not bwd:
            continue
        if len(bwd) != len(later):
            others = ", ".join(sorted(u.name for u in later if u not in bwd))
            names = " and ".join(src.name for src in srcs)
            ctx.log.append(f"save: {names} kept in {h.meta['val'].dtype} for the backward: "
                           f"also read there by {others}")
            continue
        with gm.graph.inserting_before(n):
            q, s, hq, hs = call_multi(gm, ops.swiglu_quant_save.default, (h, probs, up), 4,
                                      name=f"swiglu_save_{h.name}")
        replace_outputs(gm, n, [q, s])
        for b in bwd:
            p = b.args[2] if len(b.args) > 2 else None
            # the saved copy is one [P, 2I] tensor, gate then up, whichever form h had
            b.args = (b.args[0], hq, p, hs) + ((None, True) if up is not None else ())
        ctx.log.append(f"save: {' and '.join(src.name for src in srcs)} kept for the backward "
                       f"in FP8 (swiglu_quant_save), read by {', '.join(b.name for b in bwd)}")
        changed = True
    if changed:
        finish(gm)
    return gm
