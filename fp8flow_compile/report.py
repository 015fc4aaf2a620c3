"""What the backend did, per compiled graph: GEMM decisions, cast counts, saved activations."""

from __future__ import annotations

import dataclasses
import html
import os

import torch
import torch.fx as fx

from .passes import count


@dataclasses.dataclass
class GraphRecord:
    name: str
    gemms: list[dict]
    casts_naive: dict
    casts_after: dict
    saved_bytes: dict  # {"bf16_baseline": {...}, "fp8flow": {...}} by dtype group
    graphs: dict[str, fx.GraphModule]
    log: list[str]
    # Activation/gradient casts after the flow, per module that owns the GEMM weights they
    # feed: {"model.layers.0.self_attn": {"forward": 1, "backward": 3}, ...}
    casts_by_module: dict = dataclasses.field(default_factory=dict)


def _act(c: dict) -> int:
    return sum(v.get("act", 0) for v in c.values())


class Report:
    def __init__(self) -> None:
        self.records: list[GraphRecord] = []

    @property
    def graphs(self) -> dict[str, dict[str, fx.GraphModule]]:
        """`report.graphs[name]["before" | "naive" | "after"]`: the joint (forward + backward)
        graph as captured, after Q/DQ insertion, and after the flow rewrites;
        `["forward" | "backward"]`: the partitioned graphs as they go to the compiler (after
        Inductor's post-grad passes), once each is compiled (the backward at the first backward
        call)."""
        return {r.name: r.graphs for r in self.records}

    def summary(self) -> dict:
        g8 = sum(1 for r in self.records for g in r.gemms if g["fp8"])
        g16 = sum(1 for r in self.records for g in r.gemms if not g["fp8"])
        # GEMMs merged into one call (merge_gate_up) share the call's node name
        calls8 = sum(len({g["name"] for g in r.gemms if g["fp8"]}) for r in self.records)
        saved = {k: sum(sum(r.saved_bytes.get(k, {}).values()) for r in self.records)
                 for k in ("bf16_baseline", "fp8flow", "bf16_baseline_weights",
                           "fp8flow_weights")}
        return {
            "graphs": len(self.records),
            "gemms_fp8": g8,
            "gemms_bf16": g16,
            "gemm_calls_fp8": calls8,
            "casts_before": sum(_act(r.casts_naive) for r in self.records),
            "casts_after": sum(_act(r.casts_after) for r in self.records),
            "weight_casts": sum(v.get("weight", 0) for r in self.records
                                for v in r.casts_after.values()),
            # Activations saved for backward (tensors that depend on an input), and apart from
            # them the weight copies the backward reads (FP8 weights in the flow; BF16 graphs
            # save views of the parameters, which cost nothing).
            "saved_activation_bytes": saved["fp8flow"],
            "saved_activation_bytes_bf16": saved["bf16_baseline"],
            "saved_weight_bytes": saved["fp8flow_weights"],
        }

    def __str__(self) -> str:
        if not self.records:
            return "fp8flow report: nothing compiled yet"
        out = []
        for r in self.records:
            out.append(f"== graph {r.name}")
            if not r.gemms:
                out.append("   no GEMMs: the graph runs unchanged")
            for g in r.gemms:
                tag = "FP8 " if g["fp8"] else "BF16"
                why = "" if g["fp8"] else f"  <- {g['reason']}"
                out.append(f"   [{tag}] {g['describe']}{why}")
            for phase in ("forward", "backward"):
                a = r.casts_naive.get(phase, {})
                b = r.casts_after.get(phase, {})
                out.append(f"   {phase:<8} activation/gradient casts {a.get('act', 0)} -> "
                           f"{b.get('act', 0)}   weight casts {b.get('weight', 0)}   "
                           f"fp8 ops {_ops(b)}")
            if len(r.casts_by_module) > 1:
                out.append("   casts after the flow by module (forward/backward): " + ", ".join(
                    f"{m} {c['forward']}/{c['backward']}" for m, c in r.casts_by_module.items()))
            sb = r.saved_bytes
            if sb:
                out.append(f"   activations saved for backward: {_fmt(sb.get('fp8flow', {}))} "
                           f"(BF16 graph: {_fmt(sb.get('bf16_baseline', {}))})")
                if sum(sb.get("fp8flow_weights", {}).values()):
                    out.append(f"   weight copies saved for backward: "
                               f"{_fmt(sb['fp8flow_weights'])}")
            out.extend(f"   {m}" for m in r.log)
        s = self.summary()
        calls = (f" (run as {s['gemm_calls_fp8']} calls)"
                 if s["gemm_calls_fp8"] != s["gemms_fp8"] else "")
        out.append(f"== total: {s['gemms_fp8']} GEMMs in FP8{calls}, {s['gemms_bf16']} in BF16; "
                   f"activation/gradient casts {s['casts_before']} -> {s['casts_after']}")
        return "\n".join(out)

    def save_html(self, directory: str) -> str:
        """Write index.html with every graph drawn as SVG, casts red, FP8 ops green."""
        os.makedirs(directory, exist_ok=True)
        parts = ["<html><head><meta charset='utf-8'><title>fp8flow report</title></head><body>",
                 f"<pre>{html.escape(str(self))}</pre>"]
        for r in self.records:
            for stage in ("before", "naive", "after", "forward", "backward"):
                gm = r.graphs.get(stage)
                if gm is None:
                    continue
                parts.append(f"<h3>{html.escape(r.name)}: {stage}</h3>")
                parts.append(graph_svg(gm))
        parts.append("</body></html>")
        path = os.path.join(directory, "index.html")
        with open(path, "w") as f:
            f.write("\n".join(parts))
        return path


def _ops(c: dict) -> str:
    rest = {k: v for k, v in c.items() if k not in ("act", "weight", "dequant")}
    return ", ".join(f"{k} {v}" for k, v in sorted(rest.items())) or "none"


def _fmt(d: dict) -> str:
    tot = sum(d.values())
    return f"{tot / 2**20:.2f} MiB" + (
        " (" + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(d.items())) + ")" if d else "")


def _color(n: fx.Node) -> str:
    if n.op != "call_function":
        return "#dddddd"
    if n.target in count.ACT or n.target in count.DEQ:
        return "#f4a6a6"
    if n.target in count.WEIGHT:
        return "#f7d08a"
    if getattr(n.target, "namespace", None) == "fp8flow":
        return "#a8dfa8"
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor) and v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "#cdeccd"
    return "#ffffff"


def graph_svg(gm: fx.GraphModule) -> str:
    """An arc diagram: nodes top to bottom in graph order, edges as arcs on the right."""
    nodes = [n for n in gm.graph.nodes]
    idx = {n: i for i, n in enumerate(nodes)}
    row, width = 18, 520
    h = row * len(nodes) + 20
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width + 400}' height='{h}' "
           "font-family='monospace' font-size='11'>"]
    for n in nodes:
        i = idx[n]
        y = 10 + i * row
        for a in n.all_input_nodes:
            j = idx[a]
            ya = 10 + j * row + row / 2
            r = min(380, 6 * (i - j))
            fp8 = isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dtype in (
                torch.float8_e4m3fn, torch.float8_e5m2)
            col = "#2a8f2a" if fp8 else "#999999"
            out.append(f"<path d='M {width} {ya} C {width + r} {ya}, {width + r} {y + row / 2}, "
                       f"{width} {y + row / 2}' stroke='{col}' fill='none'/>")
        v = n.meta.get("val")
        shape = ""
        if isinstance(v, torch.Tensor):
            shape = f" {str(v.dtype).replace('torch.', '')}{list(v.shape)}"
        target = n.target if n.op != "call_function" else getattr(n.target, "__name__",
                                                                   str(n.target))
        label = html.escape(f"{n.name} = {target}{shape}"[:80])
        out.append(f"<rect x='2' y='{y}' width='{width - 4}' height='{row - 2}' "
                   f"fill='{_color(n)}' stroke='#888'/>")
        out.append(f"<text x='6' y='{y + row - 6}'>{label}</text>")
    out.append("</svg>")
    return "\n".join(out)
