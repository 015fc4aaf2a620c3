"""scaling_aware_transpose: Triton kernel (interpreter on CPU) vs torch reference vs fp64 math."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8flow_compile.errors import Fp8Unsupported
from fp8flow_compile.kernels import transpose as tr
from fp8flow_compile.kernels.groups import aligned_width, max_tiles, pad_offsets, tile_bounds
from fp8flow_compile.kernels.permute import permute_pad_fp8_ref
from fp8flow_compile.kernels.quantize import (
    dequantize_1x128_ref,
    quantize_1x128_col_ref,
    quantize_1x128_ref,
)
from fp8flow_compile.recipe import TILE

FP8 = torch.float8_e4m3fn
U8 = torch.uint8
HALF_MIN_SUBNORMAL = 2.0 ** -10  # half of E4M3's smallest subnormal 2**-9


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(U8)


def _rows_data(M: int, K: int, seed: int, row_spread: float = 4.0) -> torch.Tensor:
    """Heavy-tailed rows whose magnitudes differ a lot from row to row (that is what makes the
    per-element shift k large), with some tiny rows and some all-zero (padding-like) rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(3 * torch.randn(M, K, generator=g))
    x = x * torch.exp(row_spread * torch.randn(M, 1, generator=g))
    kind = torch.randint(0, 8, (M, 1), generator=g)
    x = torch.where(kind == 0, x * 1e-30, x)
    return torch.where(kind == 1, 0.0, x)


def _slot_of_row(offs: torch.Tensor | None, M: int) -> torch.Tensor:
    """Tile slot of each row along M, -1 for rows outside every group."""
    starts, ends = tile_bounds(offs, M)
    slot = torch.full((M,), -1, dtype=torch.long)
    for t, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        slot[a:b] = t
    return slot


def _expected_by_formula(q, s, sT, offs):
    """qT from "dequantize with the row scales, divide by the new scales, round to E4M3", all in
    float64 (exact: E4M3 values times powers of two) with torch's nearest-even cast."""
    M, K = q.shape
    slot = _slot_of_row(offs, M)
    inside = slot >= 0
    s_row = s.double().repeat_interleave(TILE, 1).t()  # [K, M]
    s_new = sT.double()[:, slot.clamp(min=0)]  # [K, M]
    val = q.double().t() * s_row / s_new
    out = torch.where(inside[None, :], val, 0.0).to(FP8)
    return out, val, inside


def _check_new_scales(q, s, sT, offs):
    """sT[block, t] is the largest row scale among the tile's rows with a nonzero block, 1 if none;
    checked without the reference's code path: it bounds those scales and is one of them."""
    M, K = q.shape
    starts, ends = tile_bounds(offs, M)
    nz = (_bytes(q).view(M, K // TILE, TILE) & 0x7F).ne(0).any(-1)  # [M, KB]
    for t, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        for kb in range(K // TILE):
            col = sT[kb * TILE:(kb + 1) * TILE, t]
            assert torch.all(col == col[0])
            cand = s[a:b, kb][nz[a:b, kb]]
            if cand.numel() == 0:
                assert col[0] == 1.0
            else:
                assert torch.all(cand <= col[0]) and bool((cand == col[0]).any())


def _assert_same(a, b):
    qa, sa = a
    qb, sb = b
    assert qa.shape == qb.shape and sa.shape == sb.shape
    mism = (_bytes(qa) != _bytes(qb)).sum().item()
    assert mism == 0, f"{mism} bytes differ"
    assert torch.equal(sa, sb)


# ---------------------------------------------------------------- the byte arithmetic, exhaustively

def test_every_byte_and_shift():
    # Row r has scale 2**(1-r): against row 0 (scale 2) its shift is k = r, so one 128-row tile
    # over K = 256 columns holding all 256 bytes covers every byte for every k in [0, 127].
    q = torch.arange(256, dtype=U8).repeat(TILE, 1).view(FP8)
    s = (2.0 ** (1 - torch.arange(TILE, dtype=torch.float64))).float()[:, None].repeat(1, 2)
    got = tr.scaling_aware_transpose_triton(q, s)
    _assert_same(got, tr.scaling_aware_transpose_ref(q, s))
    qT, sT = got
    assert torch.all(sT == 2.0)

    b_in = _bytes(q).t().int()  # [256 bytes, 128 shifts]
    b_out = _bytes(qT).int()
    k = torch.arange(TILE)[None, :].expand(256, TILE)
    nan = (b_in & 0x7F) == 0x7F
    assert torch.equal(b_out[nan], b_in[nan])
    assert torch.equal(b_out & 0x80, b_in & 0x80)  # the sign survives, zeros included
    val = q.double().t() * 2.0 ** (-k.double())
    assert torch.equal(b_out[~nan], _bytes(val.to(FP8)).int()[~nan])
    # Results that stay normal keep the mantissa field bit for bit.
    ex_in = (b_in >> 3) & 0xF
    normal = ~nan & (ex_in - k >= 1) & (ex_in >= 1)
    assert torch.equal(b_out[normal] & 0x7, b_in[normal] & 0x7)
    assert torch.equal((b_out[normal] >> 3) & 0xF, (ex_in - k)[normal])
    # Zeros from nonzero inputs are exactly the values at or below half the smallest subnormal.
    flushed = ((b_in & 0x7F) != 0) & ((b_out & 0x7F) == 0)
    assert torch.equal(flushed, ~nan & ((b_in & 0x7F) != 0) & (val.abs() <= HALF_MIN_SUBNORMAL))
    assert 0 < int(flushed.sum()) < flushed.numel()  # the test reaches both sides


# ---------------------------------------------------------------- Triton vs reference

OFFS_CASES = [
    None,
    [37, 37, 141, 300],  # empty group, sizes not multiples of 16 or 128, full cover
    [0, 130, 130, 259],  # leading and inner empty groups, rows 259.. outside every group
    [16, 48, 250],  # rows past offs[-1]
    [300],  # one group
]


@pytest.mark.parametrize("offs", OFFS_CASES)
@pytest.mark.parametrize("K", [128, 384])
def test_triton_matches_reference(offs, K):
    M = 300
    x = _rows_data(M, K, seed=K + (0 if offs is None else len(offs)))
    q, s = quantize_1x128_ref(x)
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    got = tr.scaling_aware_transpose_triton(q, s, o)
    _assert_same(got, tr.scaling_aware_transpose_ref(q, s, o))
    expect, _, _ = _expected_by_formula(q, s, got[1], o)
    assert torch.equal(_bytes(got[0]), _bytes(expect))
    _check_new_scales(q, s, got[1], o)


@pytest.mark.parametrize("group_t", [1, 2, 3])
def test_program_order_bands_give_the_same_bytes(group_t):
    """Bands of group_t tile slots (the launch order) against the plain order; 3 leaves a
    short last band (7 slots with the groups below)."""
    x = _rows_data(300, 384, seed=9)
    q, s = quantize_1x128_ref(x)
    o = torch.tensor([37, 37, 141, 300], dtype=torch.int32)
    for align in (1, 16):
        _assert_same(tr.scaling_aware_transpose_triton(q, s, o, align, group_t=group_t),
                     tr.scaling_aware_transpose_ref(q, s, o, align))


@pytest.mark.parametrize("M", [1, 129])
def test_small_and_ragged_m(M):
    x = _rows_data(M, 128, seed=M)
    q, s = quantize_1x128_ref(x)
    got = tr.scaling_aware_transpose_triton(q, s)
    _assert_same(got, tr.scaling_aware_transpose_ref(q, s))
    assert got[1].shape == (128, -(-M // TILE))


def test_zero_rows_do_not_inflate_scale():
    # Small rows (scale 2**-20) next to all-zero padding rows (scale 1): the column scale must come
    # from the data, else every value would lose 20 binades and flush to zero.
    x = 0.9 * torch.tanh(torch.randn(64, 128)) * 2.0 ** -12
    x[:, 0] = 2.0 ** -12  # every data row: amax 2**-12, scale 2**ceil(log2(2**-12 / 448))
    x[::3] = 0.0
    x[::6] = -0.0  # 0x80 bytes count as zero too
    q, s = quantize_1x128_ref(x)
    assert _bytes(q)[::6].eq(0x80).all()
    assert s[::3].eq(1.0).all() and s[1::3].eq(2.0 ** -20).all()
    qT, sT = tr.scaling_aware_transpose_triton(q, s)
    assert torch.all(sT == 2.0 ** -20)
    assert torch.equal(_bytes(qT), _bytes(q).t())  # every nonzero row has the same scale: k = 0


@pytest.mark.parametrize("offs", [[37, 37, 141, 300], [0, 130, 130, 259], [16, 48, 250],
                                  [3, 5, 6, 300]])
def test_aligned_layout(offs):
    """align=16: the Triton kernel (word stores on every tile now) equals the reference, and each
    group's bytes and tile scales are the plain layout's, moved to the group's 16-aligned start;
    all else is zero bytes."""
    M, K = 300, 256
    x = _rows_data(M, K, seed=len(offs) + offs[0])
    q, s = quantize_1x128_ref(x)
    o = torch.tensor(offs, dtype=torch.int32)
    got = tr.scaling_aware_transpose_triton(q, s, o, 16)
    _assert_same(got, tr.scaling_aware_transpose_ref(q, s, o, 16))
    W = aligned_width(M, len(offs), 16)
    assert got[0].shape == (K, W) and got[1].shape == (K, max_tiles(W, len(offs)))
    plain = tr.scaling_aware_transpose_ref(q, s, o)
    starts, ends = tile_bounds(o, M)
    pstarts, _ = tile_bounds(pad_offsets(o, 16), W)
    written = torch.zeros(W, dtype=torch.bool)
    for t, (a, b, pa) in enumerate(zip(starts.tolist(), ends.tolist(), pstarts.tolist())):
        if b > a:
            assert pa % 16 == 0
            assert torch.equal(_bytes(got[0])[:, pa:pa + b - a], _bytes(plain[0])[:, a:b])
            assert torch.equal(got[1][:, t], plain[1][:, t])
            written[pa:pa + b - a] = True
    assert (_bytes(got[0])[:, ~written] == 0).all()


@pytest.mark.parametrize("offs", [[100, 50, 300], [5, 3, 9, 20], [300, 0, 300], [-4, 40, 500]])
@pytest.mark.parametrize("align", [1, 16])
def test_offsets_out_of_order_or_range(offs, align):
    """Offsets that go down or past M: the kernel writes what the reference writes (which
    cannot write outside its output), in both layouts."""
    x = _rows_data(300, 256, seed=9)
    q, s = quantize_1x128_ref(x)
    o = torch.tensor(offs, dtype=torch.int32)
    _assert_same(tr.scaling_aware_transpose_triton(q, s, o, align),
                 tr.scaling_aware_transpose_ref(q, s, o, align))


def _gather_index(T: int, P: int, seed: int, pads: int = 0) -> torch.Tensor:
    """A top-k-like gather of P rows from T tokens (each token several times, in no order),
    with `pads` entries of -1 (pad rows) spread through it."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, T, (P,), generator=g)
    if pads:
        idx[torch.randperm(P, generator=g)[:pads]] = -1
    return idx.to(torch.int32)


@pytest.mark.parametrize("offs, align, pads", [
    (None, 1, 0), (None, 1, 9), ([37, 37, 141, 300], 16, 0), ([37, 37, 141, 300], 1, 5),
    ([0, 130, 130, 259], 16, 7), ([3, 5, 6, 300], 16, 0)])
def test_gathered_rows_equal_gather_then_transpose(offs, align, pads):
    """src_row: the kernel's bytes and scales equal the plain transpose of permute_pad_fp8's
    rows (bit for bit: the gather is a copy, pad rows zero with scale 1), on both the word
    path (align 16) and the byte path (align 1, tiles off 4-row boundaries)."""
    T, P, K = 97, 300, 256
    q, s = quantize_1x128_ref(_rows_data(T, K, seed=T + pads))
    idx = _gather_index(T, P, seed=len(offs or []) + pads, pads=pads)
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    qp, sp = permute_pad_fp8_ref(q, s, idx)
    want = tr.scaling_aware_transpose_ref(qp, sp, o, align)
    _assert_same(tr.scaling_aware_transpose_ref(q, s, o, align, idx), want)
    _assert_same(tr.scaling_aware_transpose_triton(q, s, o, align, idx), want)
    _assert_same(torch.ops.fp8flow.scaling_aware_transpose(q, s, o, align, idx), want)


def test_gathered_rows_from_no_rows_are_pad_rows():
    q, s = quantize_1x128_ref(torch.randn(0, 128))
    idx = torch.full((20,), -1, dtype=torch.int32)
    qT, sT = tr.scaling_aware_transpose_triton(q, s, None, 1, idx)
    assert qT.shape == (128, 20) and (_bytes(qT) == 0).all() and (sT == 1).all()
    _assert_same((qT, sT), tr.scaling_aware_transpose_ref(q, s, None, 1, idx))


def test_bad_src_row():
    q, s = quantize_1x128_ref(torch.randn(64, 128))
    op = torch.ops.fp8flow.scaling_aware_transpose
    with pytest.raises(Fp8Unsupported, match="src_row values must lie in"):
        op(q, s, None, 1, torch.tensor([0, 64], dtype=torch.int32))
    with pytest.raises(Fp8Unsupported, match="src_row values must lie in"):
        op(q, s, None, 1, torch.tensor([-2, 3], dtype=torch.int32))
    with pytest.raises(Fp8Unsupported, match="src_row must have dtype"):
        op(q, s, None, 1, torch.tensor([0, 3]))
    with pytest.raises(Fp8Unsupported, match="src_row must be 1-D"):
        op(q, s, None, 1, torch.zeros(2, 2, dtype=torch.int32))


def test_no_rows():
    q, s = quantize_1x128_ref(torch.randn(0, 256))
    o = torch.tensor([0, 0], dtype=torch.int32)
    for align in (1, 16):
        _assert_same(tr.scaling_aware_transpose_triton(q, s, o, align),
                     tr.scaling_aware_transpose_ref(q, s, o, align))


# ---------------------------------------------------------------- against quantize_1x128_col

def _equal_scale_tiles(M, K, offs, seed):
    """x whose every tile (rows of a slot x 128 columns) has one amax A that occurs in every row
    and in every column of the tile, so row-wise and column-wise quantization give one scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(3 * torch.randn(M, K, generator=g))
    starts, ends = tile_bounds(offs, M)
    for a, b in zip(starts.tolist(), ends.tolist()):
        n = b - a
        if n <= 0:
            continue
        i = torch.arange(TILE) % n  # column j of the block gets its peak in row j mod n
        for kb in range(K // TILE):
            A = float(torch.exp(4 * torch.randn((), generator=g)))
            blk = x[a:b, kb * TILE:(kb + 1) * TILE]
            # Background strictly below A, with a share of tiny values (subnormal or flushed).
            blk.copy_(A * 0.49 * torch.tanh(blk) * torch.where(
                torch.rand(blk.shape, generator=g) < 0.2, 2.0 ** -14, 1.0))
            sign = torch.where(torch.rand(TILE, generator=g) < 0.5, -1.0, 1.0)
            blk[i, torch.arange(TILE)] = A * sign
    return x


@pytest.mark.parametrize("offs", [None, [100, 100, 229, 250]])
def test_equals_column_quantization_when_row_scales_agree(offs):
    M, K = 300, 256
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    x = _equal_scale_tiles(M, K, o, seed=7)
    q, s = quantize_1x128_ref(x)  # rows past offs[-1] hold nonzero bytes: they must vanish
    _assert_same(tr.scaling_aware_transpose_triton(q, s, o), quantize_1x128_col_ref(x, o))


@pytest.mark.parametrize("offs", [None, [37, 37, 141, 290]])
def test_dequantized_transpose_close_to_xT(offs):
    M, K = 300, 256
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    x = _rows_data(M, K, seed=11)
    q, s = quantize_1x128_ref(x)
    qT, sT = tr.scaling_aware_transpose_triton(q, s, o)
    qc, sc_col = quantize_1x128_col_ref(x, o)
    assert qT.shape == qc.shape and sT.shape == sc_col.shape
    # A tile's merged scale bounds every column scale of the fresh column-wise quantization.
    assert torch.all(sT >= sc_col)
    deq = dequantize_1x128_ref(qT, sT, o).double()
    slot = _slot_of_row(o, M)
    xT = torch.where((slot >= 0)[None, :], x.double().t(), 0.0)
    s_new = sT.double()[:, slot.clamp(min=0)]
    # Two nearest-even roundings to 3 mantissa bits, each off by at most 2**-4 relative (normal)
    # or 2**-10 of its scale (subnormal): the first (row scale <= new scale) on x, the second on
    # the first's result, |x| (1 + 2**-4) + 2**-10 s_new, so in total
    # (2**-4 + 2**-4 (1 + 2**-4)) |x| + (2 + 2**-4) 2**-10 s_new.
    bound = 0.12890625 * xT.abs() + 2.0625 * HALF_MIN_SUBNORMAL * s_new
    err = (deq - xT).abs()
    assert torch.all(err <= bound), float((err - bound).max())


# ---------------------------------------------------------------- property test

@st.composite
def _row_quantized(draw):
    M = draw(st.integers(1, 260))
    K = TILE * draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    spread = draw(st.floats(0.0, 12.0))  # row magnitudes vary by up to ~e**(3*spread)
    tail = draw(st.floats(0.0, 3.0))
    specials = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32),
                             max_size=24))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(tail * torch.randn(M, K, generator=g))
    x = x * torch.exp(spread * torch.randn(M, 1, generator=g))
    tiny = torch.rand(M, K, generator=g) < draw(st.floats(0.0, 0.5))
    x = torch.where(tiny, x * 2.0 ** -40, x)
    zero_rows = torch.rand(M, 1, generator=g) < draw(st.floats(0.0, 0.3))
    x = torch.where(zero_rows, 0.0, x)
    if specials:
        pos = torch.randint(0, M * K, (len(specials),), generator=g)
        x.view(-1)[pos] = torch.tensor(specials, dtype=torch.float32)
    offs = None
    if draw(st.booleans()):
        cuts = draw(st.lists(st.integers(0, M), min_size=1, max_size=4))
        offs = torch.tensor(sorted(cuts), dtype=torch.int32)
    return x, offs


@settings(max_examples=30, deadline=None)
@given(_row_quantized())
def test_property_equals_dequantize_divide_round(case):
    x, offs = case
    q, s = quantize_1x128_ref(x)
    qT, sT = tr.scaling_aware_transpose_triton(q, s, offs)
    expect, val, inside = _expected_by_formula(q, s, sT, offs)
    assert torch.equal(_bytes(qT), _bytes(expect))
    _check_new_scales(q, s, sT, offs)
    # The only nonzero values lost are those at or below half the smallest subnormal.
    b_in = _bytes(q).t()
    was = ((b_in & 0x7F) != 0) & inside[None, :]
    became_zero = was & ((_bytes(qT) & 0x7F) == 0)
    assert torch.equal(became_zero, was & (val.abs() <= HALF_MIN_SUBNORMAL))


# ---------------------------------------------------------------- NaN, errors, registration

def test_nan_propagates():
    M, K = 200, 256
    x = _rows_data(M, K, seed=3)
    x[5, 7] = float("nan")
    x[150, 200] = float("inf")
    x[151, 130:140] = float("-inf")
    x[20, :128] = float("nan")  # a block with no finite value: scale 1, all bytes NaN
    offs = torch.tensor([90, 190], dtype=torch.int32)
    q, s = quantize_1x128_ref(x)
    for o in (None, offs):
        qT, sT = tr.scaling_aware_transpose_triton(q, s, o)
        _assert_same((qT, sT), tr.scaling_aware_transpose_ref(q, s, o))
        assert torch.equal(torch.isnan(qT.float()), ~torch.isfinite(x.t()))
        assert torch.all(torch.isfinite(sT))


@pytest.mark.parametrize("make, msg", [
    (lambda q, s: (q.float(), s), "data must have dtype"),
    (lambda q, s: (q, s.double()), "scales must have dtype"),
    (lambda q, s: (q[None], s), "2-D"),
    (lambda q, s: (q[:, :192].contiguous(), s[:, :1].contiguous()), "multiple of 128"),
    (lambda q, s: (q, s[:, :1].contiguous()), "scales must have shape"),
    (lambda q, s: (q.t().contiguous().t(), s), "contiguous"),
])
def test_bad_inputs(make, msg):
    q, s = quantize_1x128_ref(torch.randn(256, 256))
    with pytest.raises(Fp8Unsupported, match=msg):
        torch.ops.fp8flow.scaling_aware_transpose(*make(q, s))


def test_bad_offs():
    q, s = quantize_1x128_ref(torch.randn(64, 128))
    with pytest.raises(Fp8Unsupported, match="needs offs"):
        tr.scaling_aware_transpose(q, s, None, 16)
    with pytest.raises(Fp8Unsupported, match="power of two"):
        tr.scaling_aware_transpose(q, s, torch.tensor([64], dtype=torch.int32), 24)
    with pytest.raises(Fp8Unsupported, match="offs must have dtype"):
        tr.scaling_aware_transpose(q, s, torch.tensor([64]))
    with pytest.raises(Fp8Unsupported, match="non-empty 1-D"):
        tr.scaling_aware_transpose(q, s, torch.zeros(0, dtype=torch.int32))


def test_op_registered_and_fake():
    x = _rows_data(150, 256, seed=5)
    q, s = quantize_1x128_ref(x)
    offs = torch.tensor([60, 140], dtype=torch.int32)
    got = torch.ops.fp8flow.scaling_aware_transpose(q, s, offs)
    _assert_same(got, tr.scaling_aware_transpose_ref(q, s, offs))
    # test_schema is left out: its own checker multiplies the FP8 output, which CPU torch lacks.
    idx = _gather_index(150, 200, seed=3, pads=4)
    for args in ((q, s, offs), (q, s), (q, s, offs, 16), (q, s, offs, 16, idx)):
        torch.library.opcheck(tr.scaling_aware_transpose, args,
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("offs", [None, [0, 1000, 1000, 1777, 3001, 4000]])
def test_gpu_matches_reference(offs):
    M, K = 4100, 1024
    x = _rows_data(M, K, seed=1)
    x[7, 3] = float("nan")
    q, s = quantize_1x128_ref(x)
    o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
    ref = tr.scaling_aware_transpose_ref(q, s, o)
    got = torch.ops.fp8flow.scaling_aware_transpose(
        q.cuda(), s.cuda(), None if o is None else o.cuda())
    _assert_same((got[0].cpu(), got[1].cpu()), ref)


@pytest.mark.gpu
def test_gpu_aligned_layout_matches_reference():
    M, K = 4100, 1024
    x = _rows_data(M, K, seed=2)
    q, s = quantize_1x128_ref(x)
    o = torch.tensor([0, 999, 999, 1777, 3001, 4000], dtype=torch.int32)
    got = torch.ops.fp8flow.scaling_aware_transpose(q.cuda(), s.cuda(), o.cuda(), 16)
    _assert_same((got[0].cpu(), got[1].cpu()), tr.scaling_aware_transpose_ref(q, s, o, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("align", [1, 16])
def test_gpu_gathered_rows_match_reference(align):
    T, P, K = 1500, 4100, 1024
    q, s = quantize_1x128_ref(_rows_data(T, K, seed=4))
    idx = _gather_index(T, P, seed=5, pads=33)
    o = torch.tensor([0, 999, 999, 1777, 3001, 4000], dtype=torch.int32)
    got = torch.ops.fp8flow.scaling_aware_transpose(q.cuda(), s.cuda(), o.cuda(), align,
                                                    idx.cuda())
    qp, sp = permute_pad_fp8_ref(q, s, idx)
    _assert_same((got[0].cpu(), got[1].cpu()), tr.scaling_aware_transpose_ref(qp, sp, o, align))


@pytest.mark.gpu
def test_gpu_every_byte_and_shift():
    q = torch.arange(256, dtype=U8).repeat(TILE, 1).view(FP8)
    s = (2.0 ** (1 - torch.arange(TILE, dtype=torch.float64))).float()[:, None].repeat(1, 2)
    got = torch.ops.fp8flow.scaling_aware_transpose(q.cuda(), s.cuda())
    _assert_same((got[0].cpu(), got[1].cpu()), tr.scaling_aware_transpose_ref(q, s))
