"""Weight quantization started ahead by the graph before the one that needs it
(fp8flow_compile/prefetch.py): which graph begins it, when a result is used or dropped, and that
the compiled layer's results do not change. On the CPU, where prefetching computes inline (it is
CUDA-only outside tests); the side stream runs in the GPU test."""

from __future__ import annotations

import gc

import pytest
import torch

import fp8flow_compile as ff
from examples.moe import MoE
from fp8flow_compile import prefetch
from fp8flow_compile.kernels.quantize import quantize_128x128_dual_ref


@pytest.fixture
def on_cpu():
    prefetch.reset()
    prefetch.DEVICES.add("cpu")
    prefetch.set_prefetch(True)
    yield
    prefetch.DEVICES.discard("cpu")
    prefetch.set_prefetch(prefetch._enabled)
    prefetch.reset()


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 256, 128, generator=g).to(torch.bfloat16)


def _same(a, b):
    return all(torch.equal(x.view(torch.uint8) if x.dtype.itemsize == 1 else x,
                           y.view(torch.uint8) if y.dtype.itemsize == 1 else y)
               for x, y in zip(a, b, strict=True))


def test_the_graph_before_begins_the_quantization_and_the_next_takes_it(on_cpu):
    a, b = prefetch._Token(), prefetch._Token()
    w = _weight()
    prefetch.graph_started(a)
    prefetch.graph_started(b)
    assert prefetch.take(w) is None  # first step: nothing begun, the link a -> w recorded
    prefetch.graph_started(a)
    assert prefetch.stats() == {"started": 1, "dropped": 0}
    prefetch.graph_started(b)
    got = prefetch.take(w)
    assert got is not None and _same(got, quantize_128x128_dual_ref(w))
    assert prefetch.stats()["taken"] == 1
    assert prefetch.take(w) is None  # taken once: the op computes it if asked again


def test_a_weight_written_after_the_start_is_recomputed_and_the_result_dropped(on_cpu):
    a, b = prefetch._Token(), prefetch._Token()
    w = _weight()
    prefetch.graph_started(a)
    prefetch.graph_started(b)
    prefetch.take(w)
    prefetch.graph_started(a)  # begins w's quantization at its current version
    w.add_(1.0)                # an in-place write bumps the version counter
    prefetch.graph_started(b)
    assert prefetch.take(w) is None
    prefetch.graph_started(a)  # the stale result is dropped, a fresh one begun
    assert prefetch.stats() == {"started": 2, "dropped": 1}
    prefetch.graph_started(b)
    assert _same(prefetch.take(w), quantize_128x128_dual_ref(w))


def test_weights_are_held_weakly_and_off_means_nothing_begun(on_cpu):
    a, b = prefetch._Token(), prefetch._Token()
    w = _weight()
    prefetch.graph_started(a)
    prefetch.graph_started(b)
    prefetch.take(w)
    del w
    gc.collect()
    prefetch.graph_started(a)  # the weight is gone: nothing to begin, no error
    assert prefetch.stats().get("started", 0) == 0
    w = _weight(1)
    prefetch.graph_started(b)
    prefetch.take(w)
    prefetch.set_prefetch(False)
    prefetch.graph_started(b)
    prefetch.graph_started(b)
    assert prefetch.take(w) is None and prefetch.stats().get("started", 0) == 0


def test_wrap_forwards_the_call_and_keeps_attributes():
    seen = []

    def compiled(args):
        seen.append(args)
        return [a * 2 for a in args]

    compiled._boxed_call = True
    run = prefetch.wrap(compiled)
    assert run._boxed_call is True and isinstance(run.fp8flow_token, prefetch._Token)
    assert run([1, 2]) == [2, 4] and seen == [[1, 2]]
    assert prefetch._current is run.fp8flow_token
    prefetch.reset()


def _layer_grads(m, x, steps):
    outs = []
    for _ in range(steps):
        x.grad = None
        for p in m.parameters():
            p.grad = None
        out = m(x)
        out.float().square().sum().backward()
        outs.append([out.detach().clone(), x.grad.clone(), m.w13.grad.clone(),
                     m.w2.grad.clone()])
    return outs


def test_compiled_layer_takes_the_prefetched_weights_and_gives_the_same_bits(on_cpu):
    """The canonical layer breaks its graph at bincount: the routing's graph begins the expert
    weights' quantization, the experts' graph takes it, from the second step on (the first
    records which graph comes first). Outputs and gradients equal those without prefetching."""
    torch.manual_seed(0)
    base = MoE(256, 128, 4, 2)
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)

    def run(on):
        prefetch.reset()
        prefetch.set_prefetch(on)
        torch._dynamo.reset()
        m = MoE(256, 128, 4, 2)
        m.load_state_dict(base.state_dict())
        cm = torch.compile(m, backend=ff.fp8flow, options={"inner": "eager"})
        got = _layer_grads(cm, x, 3)
        return got, prefetch.stats()

    with_pf, st = run(True)
    without, st_off = run(False)
    assert st == {"dropped": 0, "started": 4, "taken": 4}  # w13 and w2, steps 2 and 3
    assert st_off == {}
    for a, b in zip(with_pf, without, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_prefetch_on_a_side_stream_gives_the_same_bits():
    """On the GPU the routing's graph quantizes the expert weights on a side stream; the
    experts' graph waits on its event. Results bit-identical to prefetching off, across an
    optimizer step between steps (which bumps the weights' versions)."""
    torch.manual_seed(0)
    base = MoE(1024, 512, 8, 2, device="cuda")
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run(on):
        prefetch.reset()
        prefetch.set_prefetch(on)
        torch._dynamo.reset()
        m = MoE(1024, 512, 8, 2, device="cuda")
        m.load_state_dict(base.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        cm = torch.compile(m, backend=ff.fp8flow)
        got = []
        for _ in range(3):
            got += _layer_grads(cm, x, 1)
            opt.step()
        torch.cuda.synchronize()
        return got, prefetch.stats()

    try:
        with_pf, st = run(True)
        without, _ = run(False)
    finally:
        prefetch.set_prefetch(True)
        prefetch.reset()
    assert st.get("taken") == 4 and st.get("dropped", 0) == 0
    for a, b in zip(with_pf, without, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
