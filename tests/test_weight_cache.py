"""Option cache_weights: FP8 weights kept across calls while the parameter is unchanged."""

import copy
import gc

import pytest
import torch
import torch._dynamo

import fp8flow_compile as ff
from examples.moe import MoE
from fp8flow_compile.backend import fp8flow
from fp8flow_compile.kernels import weight_cache as wc

ops = torch.ops.fp8flow


@pytest.fixture
def setup():
    torch._dynamo.reset()
    ff.last_report().records.clear()
    ff.clear_weight_cache()
    wc.reset_weight_cache_stats()
    torch.manual_seed(0)
    H, I, E, k, T = 256, 128, 4, 2, 96
    model = MoE(H, I, E, k)
    # x requires grad, so the backward runs the dgrad of both expert weights.
    x = torch.randn(T, H).bfloat16().requires_grad_(True)
    gy = torch.randn(T, H).bfloat16()
    yield model, x, gy
    torch._dynamo.reset()
    ff.clear_weight_cache()


def _compile(model, cache, inner="eager"):
    # fp8_min_intensity=0: on CUDA the default leaves GEMMs this small in BF16.
    return torch.compile(model, backend=fp8flow, options={"inner": inner, "cache_weights": cache,
                                                          "fp8_min_intensity": 0})


def _step(cm, x, gy):
    x = x.detach().requires_grad_(True)
    y = cm(x)
    y.backward(gy)
    return y.detach(), x.grad


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("opt", ["sgd", "adamw_foreach", "adamw_fused"])
def test_cached_matches_uncached_over_steps(setup, opt):
    """Two micro-batches per optimizer step, three steps: the cached model's outputs and
    gradients equal the uncached model's bit for bit, so every optimizer update was seen (the
    fused optimizers leave `_version` alone: the step hook must catch them); the weights are
    quantized once per step (2 misses) and read from the cache otherwise."""
    model, x, gy = setup
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    c1, c2 = _compile(m1, True), _compile(m2, False)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
            "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
            "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)}[opt]
    o1, o2 = make(m1.parameters()), make(m2.parameters())
    prev = None
    for step in range(3):
        for _ in range(2):
            y1, dx1 = _step(c1, x, gy)
            y2, dx2 = _step(c2, x, gy)
            assert torch.equal(y1, y2) and torch.equal(dx1, dx2), step
        g1, g2 = _grads(m1), _grads(m2)
        assert _same(g1, g2), step
        if prev is not None:
            assert not torch.equal(y1, prev), "the update changed nothing: the test is blind"
        prev = y1
        info = ff.weight_cache_info()
        # Per micro-batch: the forward's fill of w13 and w2, fprop of both, dgrad of both =
        # 6 reads; per step the first read of each weight (its fill) quantizes it.
        assert (info["misses"], info["hits"]) == (2 * (step + 1), 10 * (step + 1)), info
        assert info["entries"] == 2
        o1.step(), o2.step()
        assert ff.weight_cache_info()["entries"] == 0  # the step hook emptied it
        o1.zero_grad(), o2.zero_grad()


def _fp8_record():
    return next(r for r in ff.last_report().records if any(g["fp8"] for g in r.gemms))


def test_graph_and_report(setup):
    model, x, gy = setup
    _step(_compile(copy.deepcopy(model), False), x, gy)
    quant_places = {n.prev.name for n in _fp8_record().graphs["after"].graph.nodes
                    if n.target is ops.quantize_128x128_dual.default}
    assert len(quant_places) == 2
    torch._dynamo.reset()
    ff.last_report().records.clear()
    _step(_compile(model, True), x, gy)
    rec = _fp8_record()
    after = rec.graphs["after"]
    targets = [n.target for n in after.graph.nodes if n.op == "call_function"]
    assert ops.quantize_128x128_dual.default not in targets
    # fprop and dgrad of each of the two expert weights
    assert targets.count(ops.gemm_fp8_cached_weight.default) == 4
    # one fill per weight, each read by GEMMs only, in the place of the quantization
    fills = [n for n in after.graph.nodes if n.target is ops.weight_cache_fill.default]
    assert len(fills) == 2
    for f in fills:
        assert all(u.target is ops.gemm_fp8_cached_weight.default for u in f.users)
    assert {f.prev.name for f in fills} == quant_places
    assert any("cache_weights: FP8 forms kept" in line and "w13" in line and "w2" in line
               for line in rec.log)
    # The cast counts still count the weight quantization (it runs once per change).
    assert rec.casts_after["forward"].get("weight", 0) == 2
    # The forward saves no FP8 weight copy for the backward: the dgrad reads the cache.
    assert sum(rec.saved_bytes["fp8flow_weights"].values()) == 0
    info = ff.weight_cache_info()
    w_bytes = sum(p.numel() for n, p in model.named_parameters() if n in ("w13", "w2"))
    # Two one-byte copies of each weight plus fp32 scales per 128x128 block, twice.
    assert w_bytes * 2 <= info["bytes"] <= w_bytes * 2 * (1 + 4 * 2 / 128**2) + 4096


def test_inductor_matches_uncached(setup):
    model, x, gy = setup
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    c1, c2 = _compile(m1, True, "inductor"), _compile(m2, False, "inductor")
    for _ in range(2):
        y1, dx1 = _step(c1, x, gy)
        y2, dx2 = _step(c2, x, gy)
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert _same(_grads(m1), _grads(m2))
    assert ff.weight_cache_info()["misses"] == 2


def test_load_state_dict_is_seen(setup):
    model, x, gy = setup
    other = MoE(256, 128, 4, 2)
    c1 = _compile(model, True)
    _step(c1, x, gy)
    model.load_state_dict(other.state_dict())
    y1, _ = _step(c1, x, gy)
    y2, _ = _step(_compile(copy.deepcopy(other), False), x, gy)
    assert torch.equal(y1, y2)


def test_writes_through_data_need_clear(setup):
    """The documented limit: `.data` has its own version counter, so the cache cannot see a
    write through it; clear_weight_cache() makes the next call quantize again."""
    model, x, gy = setup
    c1 = _compile(model, True)
    y0, _ = _step(c1, x, gy)
    with torch.no_grad():
        new = {n: p * 0.5 for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.data.copy_(new[n])
    stale, _ = _step(c1, x, gy)
    ff.clear_weight_cache()
    fresh, _ = _step(c1, x, gy)
    ref, _ = _step(_compile(copy.deepcopy(model), False), x, gy)
    assert torch.equal(fresh, ref)
    assert not torch.equal(stale, ref)
    # stale used the old expert weights with the new router: neither y0 nor ref
    assert not torch.equal(stale, y0)


def test_entry_goes_with_the_weight(setup):
    _, x, gy = setup
    model = MoE(256, 128, 4, 2)  # held by nothing else (the fixture's model is)
    _step(_compile(model, True), x, gy)
    assert ff.weight_cache_info()["entries"] == 2
    del model
    torch._dynamo.reset()
    gc.collect()
    assert ff.weight_cache_info()["entries"] == 0


def test_op_checks_and_fake():
    w = torch.randn(4, 256, 128, dtype=torch.bfloat16)
    a = torch.zeros(8, 128, dtype=torch.float8_e4m3fn)
    s = torch.ones(8, 1)
    with pytest.raises(ff.Fp8Unsupported, match="gemm_fp8_cached_weight"):
        ops.gemm_fp8_cached_weight(a, s, w, False, None)  # 3-D weight without group ends
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fa, fs, fw = mode.from_tensor(a), mode.from_tensor(s), mode.from_tensor(w)
        offs = torch.empty(4, dtype=torch.int32)
        assert ops.gemm_fp8_cached_weight(fa, fs, fw, False, offs).shape == (8, 256)
        assert ops.gemm_fp8_cached_weight(fa, fs, fw, True, offs).shape == (8, 128)


@pytest.mark.gpu
def test_cached_matches_uncached_on_cuda(setup):
    """The same on the GPU (Triton and cuBLAS kernels, Inductor), with the fused CUDA AdamW."""
    model, x, gy = setup
    m1, m2 = copy.deepcopy(model).cuda(), copy.deepcopy(model).cuda()
    c1, c2 = _compile(m1, True, "inductor"), _compile(m2, False, "inductor")
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True)
    x, gy = x.detach().cuda(), gy.cuda()
    for step in range(2):
        for _ in range(2):
            y1, dx1 = _step(c1, x, gy)
            y2, dx2 = _step(c2, x, gy)
            assert torch.equal(y1, y2) and torch.equal(dx1, dx2), step
        assert _same(_grads(m1), _grads(m2)), step
        o1.step(), o2.step()
        o1.zero_grad(), o2.zero_grad()
    # Per step the first micro-batch quantizes w13 and w2; 6 reads per micro-batch.
    assert (ff.weight_cache_info()["misses"], ff.weight_cache_info()["hits"]) == (4, 20)


def test_accumulate_benchmark_checks_the_cache(tmp_path, monkeypatch):
    """benchmarks/accumulate.py's own check: with the optimizer hook working it runs and writes
    a row per variant and K; with the hook disabled (the cache never emptied) the cached
    variant's weights drift from the uncached one's and the run stops with an error."""
    from benchmarks import accumulate
    argv = ["--smoke", "--shapes", "dsv3", "--k", "2", "--rounds", "1", "--out", str(tmp_path)]
    assert accumulate.main(argv) == 0
    import json
    rows = [json.loads(line) for line in open(tmp_path / "accumulate.jsonl")][1:]
    assert sorted(r["variant"] for r in rows) == sorted(accumulate.KEYS)
    assert all(r["ms_step"] > 0 and r["k"] == 2 for r in rows)
    monkeypatch.setattr(wc, "clear_weight_cache", lambda: None)
    assert accumulate.main(argv) == 1


_DYING = """
import threading, torch
import fp8flow_compile as ff
from fp8flow_compile.kernels import weight_cache as wc
box = [torch.nn.Parameter(torch.randn(256, 128, dtype=torch.bfloat16))]
with torch.no_grad():
    wc.cached_weight(box[0])
assert ff.weight_cache_info()["entries"] == 1
done = threading.Event()
def run():
    with wc._lock:
        box.clear()  # the last reference: the callback runs here, lock held
    done.set()
t = threading.Thread(target=run, daemon=True)
t.start()
t.join(20)
assert done.is_set(), "the weak reference's callback blocked on the cache's lock"
assert ff.weight_cache_info()["entries"] == 0
print("ok")
"""


def test_weight_dying_while_the_lock_is_held():
    """A weak reference's callback can run inside any allocation (a garbage collection), also
    while the cache's lock is held: it must not take the lock. The weight dies in a thread
    that holds the lock. In a child process, so that a callback that locks fails this test
    (the lock stays held) without hanging the rest of the suite."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _DYING], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_forms_hold_no_autograd_history(setup):
    """Called with grad mode on, the forms must not record a graph (its nodes would hold the
    weight, so the entry would never go)."""
    box = [torch.nn.Parameter(torch.randn(256, 128, dtype=torch.bfloat16))]
    forms = wc.cached_weight(box[0])
    assert all(f.grad_fn is None for f in forms)
    del forms
    box.clear()
    gc.collect()
    assert ff.weight_cache_info()["entries"] == 0
