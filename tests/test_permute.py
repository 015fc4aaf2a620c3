"""MoE permutation: routing maps, FP8 / high-precision permute+pad, weighted unpermute and its
backward. Triton launchers run through the interpreter on CPU (small shapes)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8flow_compile.errors import Fp8Unsupported
from fp8flow_compile.kernels import permute as pm
from fp8flow_compile.kernels.quantize import dequantize_1x128_ref, quantize_1x128_ref
from fp8flow_compile.recipe import BLOCKWISE, TILE

ALIGN = BLOCKWISE.group_align
U32 = 2.0**-24  # fp32 unit roundoff
U16 = 2.0**-8  # bf16 unit roundoff
ops = torch.ops.fp8flow


def heavy(*shape, gen=None):
    return torch.randn(*shape, generator=gen) * torch.exp(3 * torch.randn(*shape, generator=gen))


def loop_maps(topk, E, align):
    """The padded layout built slot by slot, the obvious way."""
    T, k = topk.shape
    P = T * k + E * (align - 1)
    src_row, src_slot = [-1] * P, [-1] * P
    pos = [[-1] * k for _ in range(T)]
    members = [[] for _ in range(E)]
    for t in range(T):
        for j in range(k):
            e = int(topk[t, j])
            if 0 <= e < E:
                members[e].append((t, j))
    offs, counts, row = [], [], 0
    for e in range(E):
        for r, (t, j) in enumerate(members[e]):
            src_row[row + r], src_slot[row + r], pos[t][j] = t, t * k + j, row + r
        counts.append(len(members[e]))
        row += -(-len(members[e]) // align) * align
        offs.append(row)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)
    return (i32(src_row), i32(pos).reshape(T, k), i32(offs), i32(counts), i32(src_slot))


def assert_maps(got, want):
    for name, g, w in zip(pm.RoutingMaps._fields, got, want):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w), name


def routing(T, k, E, seed, experts=None):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    return pool[torch.randint(0, len(pool), (T, k), generator=gen)]


ROUTINGS = {
    # T*k = 148: not a multiple of 16 or 128.
    "random": (routing(37, 4, 6, 0), 6, ALIGN),
    "one_expert": (torch.full((9, 2), 2), 4, ALIGN),
    "empty_experts": (routing(13, 3, 8, 1, experts=[1, 5, 6]), 8, ALIGN),
    "single_token": (torch.tensor([[4, 0, 4]]), 5, ALIGN),
    "align_1": (routing(11, 2, 3, 2), 3, 1),
    "align_128": (routing(65, 2, 3, 3), 3, TILE),
    "no_tokens": (torch.zeros(0, 2, dtype=torch.int64), 3, ALIGN),
}


# ---------------------------------------------------------------- routing maps

@pytest.mark.parametrize("case", list(ROUTINGS))
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_routing_maps_match_loop(case, idx_dtype):
    topk, E, align = ROUTINGS[case]
    got = pm.moe_routing_maps(topk.to(idx_dtype), E, align)
    assert_maps(got, loop_maps(topk, E, align))
    T, k = topk.shape
    assert got.src_row.shape == (pm.padded_rows(T * k, E, align),)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 12), k=st.integers(1, 4), E=st.integers(1, 6),
       align=st.sampled_from([1, 3, ALIGN]), seed=st.integers(0, 2**16))
def test_routing_maps_random(T, k, E, align, seed):
    topk = routing(T, k, E, seed)
    assert_maps(pm.moe_routing_maps(topk, E, align), loop_maps(topk, E, align))


def test_routing_maps_group_invariants():
    topk, E, align = ROUTINGS["empty_experts"]
    m = pm.moe_routing_maps(topk, E, align)
    sizes = torch.diff(m.offs_pad, prepend=m.offs_pad.new_zeros(1))
    assert torch.equal(sizes, (m.counts + align - 1) // align * align)
    assert int(m.counts.sum()) == topk.numel()
    assert (sizes[m.counts == 0] == 0).all()
    # Every padded row of group g holds a slot routed to g, or is a pad row.
    g = torch.searchsorted(m.offs_pad, torch.arange(m.src_row.numel()), right=True)
    real = m.src_slot >= 0
    assert torch.equal(topk.reshape(-1)[m.src_slot[real].long()], g[real])
    assert (m.src_row[~real] == -1).all()


def test_routing_maps_dropped_ids_traced_path(monkeypatch):
    # Where the range check would need a sync, out-of-range ids are dropped, not read out of bounds.
    monkeypatch.setattr(pm, "_eager_cpu", lambda t: False)
    topk = routing(10, 3, 4, 4)
    bad = torch.rand(10, 3, generator=torch.Generator().manual_seed(5)) < 0.3
    topk = torch.where(bad, torch.where(torch.arange(3) % 2 == 0, -1, 4), topk)
    got = pm.moe_routing_maps(topk, 4, ALIGN)
    assert_maps(got, loop_maps(topk, 4, ALIGN))
    assert (got.pos[bad] == -1).all()


def test_routing_maps_compiles_without_graph_break():
    topk, E, align = ROUTINGS["random"]
    fn = torch.compile(pm.moe_routing_maps, fullgraph=True, backend="aot_eager", dynamic=False)
    assert_maps(fn(topk, E, align), loop_maps(topk, E, align))


@pytest.mark.parametrize("topk, E, align, msg", [
    (torch.tensor([[0, 3]]), 3, ALIGN, "expert ids must lie in"),
    (torch.tensor([[0, -1]]), 3, ALIGN, "expert ids must lie in"),
    (torch.tensor([[0.0, 1.0]]), 3, ALIGN, "dtype"),
    (torch.tensor([0, 1]), 3, ALIGN, "2-D"),
    (torch.tensor([[0, 1]]), 0, ALIGN, "num_experts"),
    (torch.tensor([[0, 1]]), 3, 0, "align"),
    (torch.zeros(3, 0, dtype=torch.int64), 3, ALIGN, "k >= 1"),
])
def test_routing_maps_bad_input(topk, E, align, msg):
    with pytest.raises(Fp8Unsupported, match=msg):
        pm.moe_routing_maps(topk, E, align)


# ---------------------------------------------------------------- permute_pad_fp8 / permute_pad

def quantized(T, H, seed, special=True):
    gen = torch.Generator().manual_seed(seed)
    x = heavy(T, H, gen=gen)
    x[:, : H // 3] *= 1e-30  # tiny tiles: scales far below 1
    if T and special:
        x[0, 1], x[-1, -1] = float("nan"), float("inf")
    return quantize_1x128_ref(x)


@pytest.mark.parametrize("case, H", [("random", 256), ("empty_experts", 136),
                                     ("single_token", 130), ("no_tokens", 128)])
def test_permute_pad_fp8_triton_bit_exact(case, H):
    # H = 136: rows of 17 int64 words; H = 130: int16 words and a partial last scale tile.
    topk, E, align = ROUTINGS[case]
    m = pm.moe_routing_maps(topk, E, align)
    q, s = quantized(topk.shape[0], H, seed=H)
    q_r, s_r = pm.permute_pad_fp8_ref(q, s, m.src_row)
    q_t, s_t = pm.permute_pad_fp8_triton(q, s, m.src_row)
    assert q_t.dtype == q.dtype and s_t.dtype == torch.float32
    assert torch.equal(q_t.view(torch.uint8), q_r.view(torch.uint8))
    assert torch.equal(s_t.view(torch.int32), s_r.view(torch.int32))
    real = m.src_row >= 0
    assert torch.equal(q_r.view(torch.uint8)[real], q.view(torch.uint8)[m.src_row[real].long()])
    assert torch.equal(s_r[real], s[m.src_row[real].long()])
    # Pad and tail rows: zero data, scale exactly 1.
    assert (q_t.view(torch.uint8)[~real] == 0).all()
    assert (s_t[~real] == 1.0).all()


def test_permute_pad_fp8_dequantizes_to_source_rows():
    topk, E, align = ROUTINGS["random"]
    m = pm.moe_routing_maps(topk, E, align)
    q, s = quantized(topk.shape[0], 384, seed=7)
    q_p, s_p = ops.permute_pad_fp8(q, s, m.src_row)
    got = dequantize_1x128_ref(q_p, s_p)
    src = dequantize_1x128_ref(q, s)
    real = m.src_row >= 0
    torch.testing.assert_close(got[real], src[m.src_row[real].long()], rtol=0, atol=0,
                               equal_nan=True)
    assert (got[~real] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_permute_pad_triton_bit_exact(dtype):
    topk, E, align = ROUTINGS["empty_experts"]
    m = pm.moe_routing_maps(topk, E, align)
    x = heavy(topk.shape[0], 72, gen=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 0] = float("nan")
    ref = pm.permute_pad_ref(x, m.src_row)
    got = pm.permute_pad_triton(x, m.src_row)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    real = m.src_row >= 0
    assert torch.equal(ref[real].view(torch.uint8), x[m.src_row[real].long()].view(torch.uint8))
    assert (ref[~real].view(torch.uint8) == 0).all()


# ---------------------------------------------------------------- unpermute

def unpermute64(y, pos, probs):
    """out[t] = sum_j probs[t, j] * y[pos[t, j]] in float64, one slot at a time."""
    T, k = pos.shape
    out = y.new_zeros(T, y.shape[1])
    for t in range(T):
        for j in range(k):
            if pos[t, j] >= 0:
                w = 1.0 if probs is None else probs[t, j]
                out[t] = out[t] + w * y[int(pos[t, j])]
    return out


def expert_out(P, H, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    y = heavy(P, H, gen=gen)
    y[: P // 4] *= 1e-36  # tiny, some fp32 products and sums subnormal
    return y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False])
def test_unpermute_vs_float64(dtype, weighted):
    topk, E, align = ROUTINGS["random"]
    T, k = topk.shape
    m = pm.moe_routing_maps(topk, E, align)
    H = 272  # two column blocks, the second partial
    y = expert_out(m.src_row.numel(), H, dtype, seed=11)
    probs = torch.rand(T, k, generator=torch.Generator().manual_seed(12)) if weighted else None
    ref = pm.unpermute_ref(y, m.pos, probs)
    got = pm.unpermute_triton(y, m.pos, probs)
    assert got.dtype == dtype
    # Same fp32 operations in the same order, explicit bf16 rounding: bit-exact.
    assert torch.equal(got, ref)
    y64 = y.double()
    p64 = None if probs is None else probs.double()
    want = unpermute64(y64, m.pos, p64)
    mag = unpermute64(y64.abs(), m.pos, p64)
    # k products and k additions in fp32: |err| <= (2k + 1) u32 * sum_j |w y|; bf16 output adds
    # half an ulp, u16 * |out| (both doubled for slack on the second-order terms).
    tol = 2 * (2 * k + 1) * U32 * mag + (2 * U16 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - want).abs() <= tol).all()


def test_unpermute_inverts_permute_pad_for_top1():
    topk = routing(23, 1, 4, 13)
    m = pm.moe_routing_maps(topk, 4, ALIGN)
    x = heavy(23, 64, gen=torch.Generator().manual_seed(14)).bfloat16()
    back = pm.unpermute_triton(pm.permute_pad_triton(x, m.src_row), m.pos)
    assert torch.equal(back, x)


def test_unpermute_nan_propagates_and_dropped_slots_add_nothing():
    pos = torch.tensor([[0, -1], [2, 1]], dtype=torch.int32)
    y = torch.randn(3, 8)
    y[2, 3] = float("nan")
    probs = torch.tensor([[0.5, float("nan")], [0.25, 0.75]])  # NaN prob of a dropped slot
    for fn in (pm.unpermute_ref, pm.unpermute_triton):
        out = fn(y.bfloat16(), pos, probs)
        assert torch.isnan(out).nonzero().tolist() == [[1, 3]]
        assert torch.equal(out[0], (0.5 * y[0]).bfloat16())


# ---------------------------------------------------------------- unpermute_backward

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unpermute_backward_vs_autograd_float64(dtype):
    topk, E, align = ROUTINGS["empty_experts"]
    T, k = topk.shape
    m = pm.moe_routing_maps(topk, E, align)
    P, H = m.src_row.numel(), 300  # H: two column blocks in the kernel's loop, the second partial
    gen = torch.Generator().manual_seed(21)
    y = expert_out(P, H, dtype, seed=22)
    dout = heavy(T, H, gen=gen).to(dtype)
    probs = torch.rand(T, k, generator=gen) - 0.25  # negative weights too: signed zeros
    dy_r, dp_r = pm.unpermute_backward_ref(dout, y, m.src_row, m.src_slot, probs)
    dy_t, dp_t = pm.unpermute_backward_triton(dout, y, m.src_row, m.src_slot, probs)
    assert dy_t.dtype == dtype and dp_t.dtype == torch.float32 and dp_t.shape == (T, k)
    assert torch.equal(dy_t.view(torch.uint8), dy_r.view(torch.uint8))

    y64 = y.double().requires_grad_()
    p64 = probs.double().requires_grad_()
    unpermute64(y64, m.pos, p64).backward(dout.double())
    # dy: one fp32 product (u32), then the bf16 rounding (u16).
    rel = U32 + (U16 if dtype == torch.bfloat16 else 0)
    assert ((dy_t.double() - y64.grad).abs() <= rel * y64.grad.abs()).all()
    assert (dy_t[m.src_row < 0] == 0).all()
    # dprobs: H fp32 products summed in fp32 (any order): |err| <= (H + 1) u32 * sum |dout y|.
    mag = torch.zeros(T * k, dtype=torch.float64)
    real = m.src_slot >= 0
    src = m.src_row[real].long()
    mag[m.src_slot[real].long()] = (dout.double()[src] * y.double()[real]).abs().sum(1)
    bound = (H + 1) * U32 * mag.view(T, k)
    for dp in (dp_t, dp_r):
        assert ((dp.double() - p64.grad).abs() <= bound).all()


def test_unpermute_backward_unweighted_is_permute_pad():
    topk, E, align = ROUTINGS["random"]
    m = pm.moe_routing_maps(topk, E, align)
    dout = heavy(topk.shape[0], 64, gen=torch.Generator().manual_seed(31)).bfloat16()
    for fn in (pm.unpermute_backward_ref, pm.unpermute_backward_triton):
        dy, dp = fn(dout, None, m.src_row, m.src_slot, None)
        assert dp.numel() == 0
        assert torch.equal(dy, pm.permute_pad_ref(dout, m.src_row))
    y64 = torch.zeros(m.src_row.numel(), 64, dtype=torch.float64, requires_grad=True)
    unpermute64(y64, m.pos, None).backward(dout.double())
    assert torch.equal(dy.double(), y64.grad)


def test_unpermute_backward_dropped_slot_gets_zero_dprob():
    # Token 0: slot 0 on padded row 1, slot 1 dropped (pos [[1, -1]]); row 0 is a pad row.
    src_row = torch.tensor([-1, 0], dtype=torch.int32)
    src_slot = torch.tensor([-1, 0], dtype=torch.int32)
    dout, y, probs = torch.randn(1, 16), torch.randn(2, 16), torch.rand(1, 2)
    for fn in (pm.unpermute_backward_ref, pm.unpermute_backward_triton):
        dy, dp = fn(dout, y, src_row, src_slot, probs)
        assert dp[0, 1] == 0 and dp[0, 0] != 0
        assert (dy[0] == 0).all()


# ---------------------------------------------------------------- custom ops: fakes, errors

def small_case():
    topk, E, align = ROUTINGS["single_token"]
    m = pm.moe_routing_maps(topk, E, align)
    q, s = quantized(1, 256, seed=41, special=False)  # opcheck compares without equal_nan
    y = torch.randn(m.src_row.numel(), 256)
    return m, q, s, y


def test_opcheck_all_ops():
    m, q, s, y = small_case()
    dout, probs = torch.randn(1, 256).bfloat16(), torch.rand(1, 3)
    # test_schema does arithmetic on the outputs, which torch has no kernel for on float8.
    torch.library.opcheck(ops.permute_pad_fp8.default, (q, s, m.src_row),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    for op, args in [
        (ops.permute_pad.default, (y[:1].bfloat16(), m.src_row)),
        (ops.unpermute.default, (y, m.pos, probs)),
        (ops.unpermute.default, (y.bfloat16(), m.pos, None)),
        (ops.unpermute_backward.default, (dout, y, m.src_row, m.src_slot, probs)),
        (ops.unpermute_backward.default, (dout, None, m.src_row, m.src_slot, None)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def test_ops_compile_fullgraph():
    m, q, s, y = small_case()
    probs = torch.rand(1, 3)

    def f(q, s, y, probs, topk):
        maps = pm.moe_routing_maps(topk, 5, ALIGN)
        q_p, s_p = ops.permute_pad_fp8(q, s, maps.src_row)
        return q_p, s_p, ops.unpermute(y, maps.pos, probs)

    topk = ROUTINGS["single_token"][0]
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, s, y, probs, topk)
    want = f(q, s, y, probs, topk)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_bad_inputs_raise():
    m, q, s, y = small_case()
    P = m.src_row.numel()
    bad = [
        (lambda: ops.permute_pad_fp8(q.float(), s, m.src_row), "data must have dtype"),
        (lambda: ops.permute_pad_fp8(q, s[:, :1], m.src_row), "scales must have shape"),
        (lambda: ops.permute_pad_fp8(q, s, m.src_row.long()), "src_row must have dtype"),
        (lambda: ops.permute_pad_fp8(q, s, m.src_row + 1), r"src_row values must lie in \[-1, 1\)"),
        (lambda: ops.permute_pad_fp8(q, s, m.src_row.view(1, -1)), "src_row must be 1-D"),
        (lambda: ops.permute_pad(torch.zeros(4, 8, dtype=torch.int32), m.src_row),
         "floating-point"),
        (lambda: ops.permute_pad(y.t(), m.src_row), "contiguous"),
        (lambda: ops.unpermute(y.half(), m.pos, None), "y must have dtype"),
        (lambda: ops.unpermute(y, m.pos + P, None), "pos values must lie in"),
        (lambda: ops.unpermute(y, m.pos, torch.rand(3, 1)), "probs must have shape"),
        (lambda: ops.unpermute(y, m.pos, torch.rand(1, 3).double()), "probs must have dtype"),
        (lambda: ops.unpermute_backward(y[:1], None, m.src_row, m.src_slot, torch.rand(1, 3)),
         "y .the forward input. is needed"),
        (lambda: ops.unpermute_backward(y[:1], y[:2], m.src_row, m.src_slot, torch.rand(1, 3)),
         "y must have shape"),
        (lambda: ops.unpermute_backward(y[:1], y, m.src_row, m.src_slot[:4], torch.rand(1, 3)),
         "src_slot must have"),
        (lambda: ops.unpermute_backward(y[:1], y, m.src_row, m.src_slot + 3, torch.rand(1, 3)),
         "src_slot values must lie in"),
    ]
    for call, msg in bad:
        with pytest.raises(Fp8Unsupported, match=msg):
            call()


# ---------------------------------------------------------------- GPU: custom ops vs CPU refs

def gpu_case(T=300, k=8, E=16, H=1024, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Skewed routing: a few hot experts, and some experts with no tokens.
    weights = torch.rand(E, generator=gen) ** 4
    weights[:3] = 0
    topk = torch.multinomial(weights.expand(T, E), k, replacement=True, generator=gen)
    return topk, E, gen


@pytest.mark.gpu
def test_gpu_routing_maps_and_permute_pad_fp8():
    topk, E, _ = gpu_case()
    m_cpu = pm.moe_routing_maps(topk, E, ALIGN)
    m = pm.moe_routing_maps(topk.cuda(), E, ALIGN)
    assert_maps(m, tuple(m_cpu))
    q, s = quantized(topk.shape[0], 1024, seed=1)
    q_p, s_p = ops.permute_pad_fp8(q.cuda(), s.cuda(), m.src_row)
    q_r, s_r = pm.permute_pad_fp8_ref(q, s, m_cpu.src_row)
    assert torch.equal(q_p.cpu().view(torch.uint8), q_r.view(torch.uint8))
    assert torch.equal(s_p.cpu().view(torch.int32), s_r.view(torch.int32))
    x = heavy(topk.shape[0], 7168).bfloat16()  # DeepSeek-V3 hidden size
    assert torch.equal(ops.permute_pad(x.cuda(), m.src_row).cpu(),
                       pm.permute_pad_ref(x, m_cpu.src_row))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_unpermute_and_backward(dtype):
    topk, E, gen = gpu_case(seed=2)
    T, k = topk.shape
    m = pm.moe_routing_maps(topk, E, ALIGN)
    P, H = m.src_row.numel(), 1000
    y = heavy(P, H, gen=gen).to(dtype)
    dout = heavy(T, H, gen=gen).to(dtype)
    probs = torch.rand(T, k, generator=gen)
    cu = lambda *ts: [t.cuda() for t in ts]
    for p in (probs, None):
        got = ops.unpermute(*cu(y, m.pos), None if p is None else p.cuda())
        # fp fusion is off in the kernel, so the fp32 sums match the reference bit for bit.
        assert torch.equal(got.cpu(), pm.unpermute_ref(y, m.pos, p))
    args = cu(dout, y, m.src_row, m.src_slot, probs)
    dy, dp = ops.unpermute_backward(*args)
    dy_r, dp_r = pm.unpermute_backward_ref(dout, y, m.src_row, m.src_slot, probs)
    assert torch.equal(dy.cpu(), dy_r)
    # Reduction order differs between the GPU kernel and torch's CPU sum: (H + 1) u32 bound.
    mag = torch.zeros(T * k)
    real = m.src_slot >= 0
    mag[m.src_slot[real].long()] = (dout.float()[m.src_row[real].long()]
                                    * y.float()[real]).abs().sum(1)
    assert ((dp.cpu() - dp_r).abs() <= 2 * (H + 1) * U32 * mag.view(T, k)).all()
    assert torch.equal(ops.unpermute_backward(*args)[1], dp)  # deterministic: no atomics
    dy0, dp0 = ops.unpermute_backward(args[0], None, args[2], args[3], None)
    assert dp0.numel() == 0 and torch.equal(dy0.cpu(), pm.permute_pad_ref(dout, m.src_row))


@pytest.mark.gpu
def test_gpu_compiled_pipeline_matches_eager():
    topk, E, gen = gpu_case(T=128, seed=3)
    T, k = topk.shape
    q, s = quantized(T, 512, seed=4)
    y = torch.randn(pm.padded_rows(T * k, E, ALIGN), 512, generator=gen).bfloat16()
    probs = torch.rand(T, k, generator=gen)

    def f(topk, q, s, y, probs):
        maps = pm.moe_routing_maps(topk, E, ALIGN)
        q_p, s_p = ops.permute_pad_fp8(q, s, maps.src_row)
        return q_p.view(torch.uint8), s_p, ops.unpermute(y, maps.pos, probs), maps.offs_pad

    args = [t.cuda() for t in (topk, q, s, y, probs)]
    got = torch.compile(f, fullgraph=True)(*args)
    want = f(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
