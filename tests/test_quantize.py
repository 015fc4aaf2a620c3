"""Quantize / dequantize: the recipe's scale rule, float64 bounds, and Triton == reference bytes."""

import math

import pytest
import torch

from fp8flow_compile import Fp8Unsupported
from fp8flow_compile.kernels import groups as G
from fp8flow_compile.kernels import quantize as Q
from fp8flow_compile.recipe import E4M3_MAX, TILE

FP8 = torch.float8_e4m3fn
# E4M3 keeps 3 mantissa bits: round-to-nearest moves a normal value by at most 2^-4 of itself.
E4M3_REL = 2.0**-4
# Below 2^-6 (the smallest normal) the grid step is 2^-9, so the absolute error is <= 2^-10.
E4M3_ABS_SUB = 2.0**-10


def heavy(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    return x.to(dtype)


def same_bytes(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def scale_rule_f64(amax: float) -> float:
    if amax == 0:
        return 1.0
    return 2.0 ** min(max(math.ceil(math.log2(amax / E4M3_MAX)), -126), 126)


def check_tile_error(x64, deq64, scale):
    """Each element within E4M3's rounding bound at its tile's scale."""
    bound = torch.maximum(E4M3_REL * x64.abs(), torch.full_like(x64, E4M3_ABS_SUB) * scale)
    assert ((deq64 - x64).abs() <= bound).all()


def test_pow2_scale_matches_exact_rule():
    g = torch.Generator().manual_seed(1)
    amax = torch.cat([
        torch.exp(torch.randn(2000, generator=g) * 20).float(),
        torch.tensor([0.0, 448.0, 448.0 * 2, 448.0 * 2 ** -3, 447.99, 448.01, 1e-39, 3e38]),
    ])
    s = Q.pow2_scale(amax)
    for a, v in zip(amax.double().tolist(), s.double().tolist()):
        assert v == scale_rule_f64(a), (a, v)


@pytest.mark.parametrize("shape", [(37, 256), (5, 300), (64, 128)])
def test_quantize_1x128_ref_vs_float64(shape):
    x = heavy(shape, 2)
    q, s = Q.quantize_1x128_ref(x)
    assert q.dtype == FP8 and s.shape == (shape[0], -(-shape[1] // TILE))
    x64 = x.double()
    for t in range(s.shape[1]):
        blk = x64[:, t * TILE:(t + 1) * TILE]
        for r in range(shape[0]):
            assert s[r, t].item() == scale_rule_f64(blk[r].abs().max().item())
    deq = Q.dequantize_1x128_ref(q, s).double()
    se = s.double().repeat_interleave(TILE, 1)[:, : shape[1]]
    check_tile_error(x64, deq, se)
    assert (q.float().abs() <= E4M3_MAX).all()


def test_quantize_tiny_and_saturation():
    x = torch.tensor([[1e-30] * 127 + [3e-30], [448.0 * 2**20] + [1.0] * 127])
    q, s = Q.quantize_1x128_ref(x)
    # amax 3e-30: scale is the smallest power of two >= 3e-30/448, and values round-trip.
    assert s[0, 0].item() == scale_rule_f64(3e-30)
    deq = Q.dequantize_1x128_ref(q, s).double()
    check_tile_error(x.double(), deq, s.double().repeat_interleave(TILE, 1))
    assert q[1, 0].float().item() == E4M3_MAX


def test_nan_and_inf_become_nan_and_do_not_touch_scale():
    x = heavy((4, 256), 3, torch.float32)
    x[0, 3] = float("nan")
    x[1, 130] = float("inf")
    x[2, 0] = -float("inf")
    q, s = Q.quantize_1x128_ref(x)
    qt, st = Q.quantize_1x128_triton(x)
    assert same_bytes(q, qt) and torch.equal(s, st)
    deq = Q.dequantize_1x128_ref(q, s)
    assert deq[0, 3].isnan() and deq[1, 130].isnan() and deq[2, 0].isnan()
    assert deq.isnan().sum() == 3
    clean = x.clone()
    clean[0, 3] = clean[1, 130] = clean[2, 0] = 0.0
    assert torch.equal(s, Q.quantize_1x128_ref(clean)[1])


def with_non_finite(x):
    """x with NaN, +-Inf and a negative NaN spread over rows, columns and tiles."""
    x = x.clone()
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[130, 2] = -float("inf")
    x[-1, -1] = -float("nan")
    x[64:68, 40] = float("inf")  # four rows that share one word of the column-wise form
    x[5, 6] = -0.0  # keeps its sign through the non-finite handling
    return x


# The column-wise form's layouts: plain (words, a bytes path for groups off 4-column
# boundaries), aligned (words only), no groups (words only).
COL_LAYOUTS = [(None, 1), ([50, 50, 201, 290], 1), ([50, 50, 201, 290], 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("offs, align", COL_LAYOUTS)
def test_quantize_1x128_col_non_finite_bytes(dtype, offs, align):
    """NaN and +-Inf (either sign) become the byte 0x7F and stay out of their column's scale,
    in every layout the column-wise kernel has a path for."""
    x = with_non_finite(heavy((292, 136), 14, torch.float32).to(dtype))
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    q1, s1 = Q.quantize_1x128_col_ref(x, o, align)
    q2, s2 = Q.quantize_1x128_col_triton(x, o, align)
    assert same_bytes(q1, q2) and torch.equal(s1, s2)
    covered = x if o is None else x[:int(o[-1])]  # rows past the last group are not quantized
    assert (q1.view(torch.uint8) == 0x7F).sum() == (~covered.isfinite()).sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quantize_1x128_triton_bit_exact(dtype):
    x = heavy((70, 300), 4, dtype if dtype != torch.float16 else torch.float32).to(dtype)
    q1, s1 = Q.quantize_1x128_ref(x)
    q2, s2 = Q.quantize_1x128_triton(x)
    assert same_bytes(q1, q2) and torch.equal(s1, s2)


def test_quantize_1x128_grouped_tiles():
    x = heavy((9, 300), 5)
    offs = torch.tensor([0, 50, 50, 200, 260], dtype=torch.int32)
    q1, s1 = Q.quantize_1x128_ref(x, offs)
    q2, s2 = Q.quantize_1x128_triton(x, offs)
    assert same_bytes(q1, q2) and torch.equal(s1, s2)
    # Tiles restart at each group: [0,50) [50,178) [178,200) [200,260), then empty slots.
    assert s1.shape == (9, 3 + 5)
    x64 = x.double()
    for t, (a, b) in enumerate([(0, 50), (50, 178), (178, 200), (200, 260)]):
        for r in range(9):
            assert s1[r, t].item() == scale_rule_f64(x64[r, a:b].abs().max().item())
    assert (s1[:, 4:] == 1).all()
    assert (q1.view(torch.uint8)[:, 260:] == 0).all()


def test_quantize_1x128_col_matches_rowwise_of_transpose():
    x = heavy((300, 70), 6)
    offs = torch.tensor([17, 17, 150, 290], dtype=torch.int32)
    for o in (None, offs):
        q1, s1 = Q.quantize_1x128_col_ref(x, o)
        q2, s2 = Q.quantize_1x128_col_triton(x, o)
        q3, s3 = Q.quantize_1x128_ref(x.t().contiguous(), o)
        assert same_bytes(q1, q2) and torch.equal(s1, s2)
        assert same_bytes(q1, q3) and torch.equal(s1, s3)
        d1 = Q.dequantize_1x128_ref(q1, s1, o)
        assert torch.equal(d1, Q.dequantize_1x128_triton(q1, s1, o))


def test_quantize_1x128_col_program_order_bands_give_the_same_bytes():
    """Launch orders in bands of 1 and 3 tile slots (a short last band) against the plain one:
    with 7 slots x 3 column blocks every program's (slot, block) must still come up once."""
    x = heavy((300, 136), 13)
    o = torch.tensor([17, 17, 150, 290], dtype=torch.int32)
    q1, s1 = Q.quantize_1x128_col_ref(x, o)
    for group_t in (1, 3):
        q2, s2 = Q.quantize_1x128_col_triton(x, o, group_t=group_t)
        assert same_bytes(q1, q2) and torch.equal(s1, s2)


ALIGN_CASES = [[17, 17, 150, 290], [0, 64, 64, 300], [1, 2, 3], [300]]


@pytest.mark.parametrize("offs", ALIGN_CASES)
def test_quantize_1x128_col_aligned_layout(offs):
    """align=16: every group on a 16-token boundary with zero bytes between, read with the padded
    group ends; each group's bytes and tile scales are the plain layout's, moved."""
    x = heavy((300, 136), 12)
    o = torch.tensor(offs, dtype=torch.int32)
    qa, sa = Q.quantize_1x128_col_ref(x, o, 16)
    qt, st = Q.quantize_1x128_col_triton(x, o, 16)
    assert same_bytes(qa, qt) and torch.equal(sa, st)
    W = G.aligned_width(300, len(offs), 16)
    assert qa.shape == (136, W) and W % 16 == 0 and sa.shape == (136, G.max_tiles(W, len(offs)))
    po = G.pad_offsets(o, 16)
    assert torch.equal(po, torch.ops.fp8flow.pad_offsets(o, 16))
    q1, s1 = Q.quantize_1x128_col_ref(x, o)  # the plain layout
    plain, pad = G.tile_bounds(o, 300), G.tile_bounds(po, W)
    b1, ba = q1.view(torch.uint8), qa.view(torch.uint8)
    written = torch.zeros(W, dtype=torch.bool)
    for t, (a, b) in enumerate(zip(*[v.tolist() for v in plain])):
        if b <= a:
            continue
        pa, pb = pad[0][t].item(), pad[1][t].item()  # the same slot in the aligned layout
        assert pa % 16 == 0 and pb - pa in (b - a, -(-(b - a) // 16) * 16)  # last tile: padded
        assert torch.equal(ba[:, pa:pa + b - a], b1[:, a:b]) and torch.equal(sa[:, t], s1[:, t])
        written[pa:pa + b - a] = True
    assert (ba[:, ~written] == 0).all()  # padding and the rows past the last group
    # dequantized with the padded ends it is x^T with zero columns inserted
    assert torch.equal(Q.dequantize_1x128_ref(qa, sa, po),
                       Q.dequantize_1x128_ref(*Q.quantize_1x128_col_ref(
                           G.pad_groups(x, o, 16), po), po))


def test_pad_offsets_kernel_matches_torch():
    for offs in ([17, 17, 150, 290], [0, 0], [5, 3, 9], [400, 500], [-2, 7], [300, 0, 300]):
        o = torch.tensor(offs, dtype=torch.int32)
        want = G.pad_offsets(o, 16)
        got = torch.empty_like(o)
        G._pad_offsets_kernel[(1,)](o, got, o.numel(), ALIGN=16, G_BLOCK=G.group_block(o.numel()))
        assert torch.equal(got, want)
        # independently: sizes of the running-max ends, each rounded up to 16, summed
        ends, run = [], 0
        for e in offs:
            run = max(run, e)
            ends.append(run)
        sizes = [e - p for p, e in zip([0] + ends[:-1], ends)]
        assert want.tolist() == [sum(-(-n // 16) * 16 for n in sizes[:i + 1])
                                 for i in range(len(sizes))]


@pytest.mark.parametrize("offs", [[17, 17, 150, 290], [0, 64, 64, 300], [300, 0, 300],
                                  [-4, 40, 500]])
@pytest.mark.parametrize("align", [1, 16])
def test_tile_table_matches_the_host_tile_bounds(offs, align):
    """tile_table (what the column-wise producers' programs read): the slots that hold data
    have the host's tile bounds, as output slots of the layout's group ends and as input rows
    of the plain layout; the other slots read nothing, and together all slots write every
    output column exactly once (the tail past the last group gets zero bytes)."""
    M = 300
    o = torch.tensor(offs, dtype=torch.int32)
    W = G.aligned_width(M, len(offs), align)
    T = G.max_tiles(W, len(offs))
    table = Q.tile_table(o, M, W, T, align)
    assert table.shape == (T, 4) and table.dtype == torch.int32
    ends = G.pad_offsets(o, align) if align > 1 else o
    ostart, oend = G.tile_bounds(ends, W)
    istart, iend = G.tile_bounds(o, M)
    for t, (a, b, oa, ob) in enumerate(table.tolist()):
        if b > a:  # a slot with data: the host's bounds, and no more rows than output slots
            assert (oa, ob) == (int(ostart[t]), int(oend[t])) and b - a <= ob - oa <= 128
            assert (a, b) == (int(istart[t]), int(iend[t]))
        else:
            assert (a, b) == (0, 0)
    if align == 1 and offs != sorted(offs):
        return  # the plain layout reads decreasing ends as torch._grouped_mm would: overlaps
    written = torch.cat([torch.arange(oa, ob) for _, _, oa, ob in table.tolist()])
    assert torch.equal(written.sort().values, torch.arange(W))
    last = max(0, min(max(offs), M))  # every row of every group is read exactly once
    read = torch.cat([torch.arange(a, b) for a, b, _, _ in table.tolist()])
    assert torch.equal(read.sort().values, torch.arange(last))


@pytest.mark.parametrize("offs", [[100, 50, 300], [5, 3, 9, 20], [300, 0, 300], [-4, 40, 500]])
@pytest.mark.parametrize("align", [1, 16])
def test_quantize_1x128_col_offsets_out_of_order_or_range(offs, align):
    """Offsets that go down or past the axis (invalid for a GEMM, not for memory): the kernel
    writes what the reference writes, within its output (a write past it would corrupt the
    heap, which the interpreter's plain CPU memory does not always show; the byte equality with
    a reference that cannot write outside does)."""
    x = heavy((300, 128), 13)
    o = torch.tensor(offs, dtype=torch.int32)
    qa, sa = Q.quantize_1x128_col_ref(x, o, align)
    qt, st = Q.quantize_1x128_col_triton(x, o, align)
    assert same_bytes(qa, qt) and torch.equal(sa, st)


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 256, 128)])
def test_quantize_128x128(shape):
    w = heavy(shape, 7)
    q1, s1 = Q.quantize_128x128_ref(w)
    q2, s2 = Q.quantize_128x128_triton(w)
    assert same_bytes(q1, q2) and torch.equal(s1, s2)
    w64 = w.double()
    N, K = shape[-2:]
    se = s1.double().repeat_interleave(TILE, -2).repeat_interleave(TILE, -1)[..., :N, :K]
    blocks = w64.reshape(-1, N, K)
    for e in range(blocks.shape[0]):
        for nb in range(s1.shape[-2]):
            for kb in range(s1.shape[-1]):
                blk = blocks[e, nb * TILE:(nb + 1) * TILE, kb * TILE:(kb + 1) * TILE]
                assert s1.reshape(-1, *s1.shape[-2:])[e, nb, kb].item() == scale_rule_f64(
                    blk.abs().max().item())
    deq = Q.dequantize_128x128_ref(q1, s1).double()
    check_tile_error(w64, deq, se)
    assert torch.equal(Q.dequantize_128x128_ref(q1, s1), Q.dequantize_128x128_triton(q1, s1))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 256, 128)])
def test_quantize_128x128_dual_is_the_transposed_bytes(shape):
    w = heavy(shape, 12)
    q, s = Q.quantize_128x128_ref(w)
    for fn in (Q.quantize_128x128_dual_ref, Q.quantize_128x128_dual_triton):
        q1, s1, qt, st = fn(w)
        assert same_bytes(q1, q) and torch.equal(s1, s)
        assert same_bytes(qt, q.transpose(-2, -1).contiguous())
        assert torch.equal(st, s.transpose(-2, -1).contiguous())


def test_custom_ops_registered_and_traceable():
    x = heavy((16, 256), 8)
    q, s = torch.ops.fp8flow.quantize_1x128(x)
    q2, s2 = Q.quantize_1x128_ref(x)
    assert same_bytes(q, q2) and torch.equal(s, s2)
    # test_schema compares outputs with arithmetic torch lacks for float8 on CPU; the fake
    # (meta) functions are what compile relies on, and those are checked here.
    fake = ("test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.fp8flow.quantize_1x128.default, (x,), test_utils=fake)
    for extra in ((), (16,)):
        torch.library.opcheck(torch.ops.fp8flow.quantize_1x128_col.default,
                              (x, torch.tensor([5, 16], dtype=torch.int32), *extra),
                              test_utils=fake)
    torch.library.opcheck(torch.ops.fp8flow.pad_offsets.default,
                          (torch.tensor([5, 16], dtype=torch.int32), 16), test_utils=fake)
    torch.library.opcheck(torch.ops.fp8flow.quantize_128x128.default, (heavy((2, 128, 256), 9),),
                          test_utils=fake)
    torch.library.opcheck(torch.ops.fp8flow.dequantize_1x128.default, (q, s), test_utils=fake)

    @torch.compile(backend="inductor", fullgraph=True)
    def roundtrip(x):
        return torch.ops.fp8flow.dequantize_1x128(*torch.ops.fp8flow.quantize_1x128(x))

    assert torch.equal(roundtrip(x), Q.dequantize_1x128_ref(q2, s2))


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ops.fp8flow.quantize_1x128(torch.randn(4, 128, dtype=torch.float64)), "dtype"),
    (lambda: torch.ops.fp8flow.quantize_1x128(torch.randn(4, 256)[:, ::2]), "contiguous"),
    (lambda: torch.ops.fp8flow.quantize_1x128(torch.randn(2, 4, 128)), "2-D"),
    (lambda: torch.ops.fp8flow.quantize_128x128(torch.randn(128)), "2-D or 3-D"),
    (lambda: torch.ops.fp8flow.dequantize_1x128(
        torch.zeros(4, 256, dtype=FP8), torch.ones(4, 1)), "scales must have shape"),
    (lambda: torch.ops.fp8flow.quantize_1x128_col(
        torch.randn(8, 128), torch.tensor([4.0, 8.0])), "offs"),
    (lambda: torch.ops.fp8flow.quantize_1x128_col(
        torch.randn(8, 128), torch.tensor([4, 8], dtype=torch.int32), 12), "power of two"),
    (lambda: torch.ops.fp8flow.quantize_1x128_col(torch.randn(8, 128), None, 16), "needs offs"),
    (lambda: torch.ops.fp8flow.pad_offsets(torch.tensor([4.0]), 16), "offs must have dtype"),
])
def test_bad_input_names_the_constraint(bad, match):
    with pytest.raises(Fp8Unsupported, match=match):
        bad()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("offs, align", COL_LAYOUTS)
def test_gpu_quantize_non_finite_bytes(dtype, offs, align):
    """The compiled kernels' conversions give the reference's NaN byte for NaN and +-Inf of
    either sign, row-wise and column-wise."""
    x = with_non_finite(heavy((292, 136), 14, torch.float32).to(dtype))
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    q, s = torch.ops.fp8flow.quantize_1x128_col(x.cuda(), None if o is None else o.cuda(), align)
    q2, s2 = Q.quantize_1x128_col_ref(x, o, align)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)
    q, s = torch.ops.fp8flow.quantize_1x128(x.cuda())
    q2, s2 = Q.quantize_1x128_ref(x)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)


@pytest.mark.gpu
def test_gpu_quantize_ops_match_reference():
    x = heavy((1000, 1024), 10)
    offs = torch.tensor([100, 100, 513, 900], dtype=torch.int32)
    q, s = torch.ops.fp8flow.quantize_1x128(x.cuda())
    q2, s2 = Q.quantize_1x128_ref(x)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)
    q, s = torch.ops.fp8flow.quantize_1x128_col(x.cuda(), offs.cuda())
    q2, s2 = Q.quantize_1x128_col_ref(x, offs)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)
    d = torch.ops.fp8flow.dequantize_1x128(q, s, offs.cuda())
    assert torch.equal(d.cpu(), Q.dequantize_1x128_ref(q2, s2, offs))
    q, s = torch.ops.fp8flow.quantize_1x128_col(x.cuda(), offs.cuda(), 16)
    q2, s2 = Q.quantize_1x128_col_ref(x, offs, 16)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)
    assert torch.equal(torch.ops.fp8flow.pad_offsets(offs.cuda(), 16).cpu(),
                       G.pad_offsets(offs, 16))
    w = heavy((4, 384, 256), 11)
    q, s = torch.ops.fp8flow.quantize_128x128(w.cuda())
    q2, s2 = Q.quantize_128x128_ref(w)
    assert same_bytes(q.cpu(), q2) and torch.equal(s.cpu(), s2)
    outs = torch.ops.fp8flow.quantize_128x128_dual(w.cuda())
    for o, r in zip(outs, Q.quantize_128x128_dual_ref(w)):
        assert same_bytes(o.cpu(), r)
    assert torch.equal(torch.ops.fp8flow.dequantize_128x128(q, s).cpu(),
                       Q.dequantize_128x128_ref(q2, s2))
