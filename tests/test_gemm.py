"""FP8 GEMMs (fprop, dgrad, wgrad; dense and grouped) against float64 matmul.

Two kinds of bound:
- vs float64 matmul of the dequantized operands: those operands are exact, so the only errors are
  the fp32 accumulation and the final bf16 rounding.
- end to end vs float64 matmul of the original bf16 inputs: the E4M3 rounding of each operand on
  top of that.
"""

import ctypes

import pytest
import torch
import triton
import triton.language as tl

from fp8flow_compile import Fp8Unsupported
from fp8flow_compile.kernels import cublas as CB
from fp8flow_compile.kernels import cublaslt as LT
from fp8flow_compile.kernels import gemm as G
from fp8flow_compile.kernels import groups as GR
from fp8flow_compile.kernels import quantize as Q
from fp8flow_compile.kernels.groups import group_block, group_slot, group_span, tile_bounds
from fp8flow_compile.recipe import TILE

FP8 = torch.float8_e4m3fn
BF16, F32 = torch.bfloat16, torch.float32
# fp32 unit roundoff.
U32 = 2.0**-24
# E4M3 keeps 3 mantissa bits: round-to-nearest moves a normal value by at most 2^-4 of itself;
# below 2^-6 the grid step is 2^-9, so the absolute error is <= 2^-10 (times the tile scale).
E4M3_REL = 2.0**-4
E4M3_ABS_SUB = 2.0**-10

OFFS_CASES = {
    # empty first and third groups, sizes 100 and 150 (not multiples of 16), rows 250.. in no group
    "empty_and_tail": [0, 100, 100, 250],
    # every row in group 0, the other groups empty
    "one_group": [300, 300, 300, 300],
    # ragged sizes 37, 133, 130 (partial tiles everywhere)
    "ragged": [37, 37, 170, 300],
}
P = 300  # grouped rows


@triton.jit
def _slots_kernel(offs_ptr, out_ptr, G, length, TILE_: tl.constexpr, G_BLOCK: tl.constexpr,
                  TAIL: tl.constexpr):
    t = tl.program_id(0)
    g, first, end = group_slot(offs_ptr, G, length, t, TILE_, G_BLOCK, TAIL)
    tl.store(out_ptr + t * 3, g)
    tl.store(out_ptr + t * 3 + 1, first)
    tl.store(out_ptr + t * 3 + 2, end)


@triton.jit
def _spans_kernel(offs_ptr, out_ptr, G, length, TILE_: tl.constexpr, G_BLOCK: tl.constexpr):
    g = tl.program_id(0)
    first, end, slot = group_span(offs_ptr, G, length, g, TILE_, G_BLOCK)
    tl.store(out_ptr + g * 3, first)
    tl.store(out_ptr + g * 3 + 1, end)
    tl.store(out_ptr + g * 3 + 2, slot)


def slots_of(offs, length, tile, tail):
    """group_slot for every slot of max_tiles(length, E, tile), as (group, first, end)."""
    n = -(-length // tile) + offs.numel()
    out = torch.zeros(n, 3, dtype=torch.int32)
    _slots_kernel[(n,)](offs, out, offs.numel(), length, TILE_=tile,
                        G_BLOCK=group_block(offs.numel()), TAIL=tail)
    return [tuple(r) for r in out.tolist()]


def spans_of(offs, length):
    out = torch.zeros(offs.numel(), 3, dtype=torch.int32)
    _spans_kernel[(offs.numel(),)](offs, out, offs.numel(), length, TILE_=TILE,
                                   G_BLOCK=group_block(offs.numel()))
    return [tuple(r) for r in out.tolist()]


def rnd(shape, seed, kind="heavy", dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "heavy":
        x = x * torch.exp(3 * torch.randn(shape, generator=g))
    elif kind == "tiny":  # scales far below 1 (still far above the 2^-126 clamp)
        x = x * 1e-20
    return x.to(dtype)


def acc_bound(absprod, k):
    """fp32 accumulation of k exact products with power-of-two rescaling: gamma_k < 2 k u per
    element times sum |a||b|, plus gradual underflow (<= 2^-150 per operation, 2 k operations)."""
    return 2 * k * U32 * absprod + 2 * k * 2.0**-150


def out_bound(exact, acc, out_dtype):
    if out_dtype == BF16:
        # Final round-to-nearest to bf16 (8 significant bits): half an ulp is at most 2^-8 of
        # the value; bf16 subnormals have spacing 2^-133.
        return acc + 2.0**-8 * (exact.abs() + acc) + 2.0**-134
    return acc


def assert_within(out, exact, bound):
    err = (out.double() - exact).abs()
    ok = err <= bound
    assert ok.all(), (f"{(~ok).sum().item()} of {ok.numel()} elements out of bound; "
                      f"worst err/bound {(err / bound).max().item():.3g}")


def check_gemm(out, a64, b64, out_dtype):
    """out [M, N] vs a64 [M, K] @ b64 [K, N] (float64, exact operands)."""
    exact = a64 @ b64
    bound = out_bound(exact, acc_bound(a64.abs() @ b64.abs(), a64.shape[1]), out_dtype)
    assert_within(out, exact, bound)


def fp8_operand_error(x64, scale64):
    """A priori bound on |dequant(quant(x)) - x| per element."""
    return E4M3_REL * x64.abs() + E4M3_ABS_SUB * scale64


def check_end_to_end(out, a64, ea, b64, eb, aq64, bq64, out_dtype):
    """out vs a64 @ b64 (original inputs), where the FP8 operands aq64/bq64 differ from them by
    at most ea/eb per element: |aq bq - a b| <= ea|b| + |a|eb + ea eb, summed over k."""
    exact = a64 @ b64
    quant = ea @ b64.abs() + a64.abs() @ eb + ea @ eb
    acc = acc_bound(aq64.abs() @ bq64.abs(), a64.shape[1])
    assert_within(out, exact, out_bound(exact, acc + quant, out_dtype) + quant)


def deq_rows(q, s, offs=None):
    return Q.dequantize_1x128_ref(q, s, offs).double()


def deq_w(q, s):
    return Q.dequantize_128x128_ref(q, s).double()


def scale_of_rows(s, cols, offs=None):
    ones = torch.ones(s.shape[0], cols).to(FP8)
    return Q.dequantize_1x128_ref(ones, s, offs).double()


def scale_of_blocks(s, shape):
    return Q.dequantize_128x128_ref(torch.ones(shape).to(FP8), s).double()


IMPLS = {
    "ref": (G.gemm_fp8_ref, G.grouped_gemm_fp8_ref, G.gemm_fp8_wgrad_ref,
            G.grouped_gemm_fp8_wgrad_ref),
    "triton": (G.gemm_fp8_triton, G.grouped_gemm_fp8_triton, G.gemm_fp8_wgrad_triton,
               G.grouped_gemm_fp8_wgrad_triton),
}


# ---------------------------------------------------------------- dense fprop / dgrad

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trans_b,out_dtype", [(True, BF16), (False, BF16), (True, F32),
                                               (False, F32)])
def test_gemm_fp8_vs_float64(impl, trans_b, out_dtype):
    gemm = IMPLS[impl][0]
    M = 200
    # fprop: y [M, 192] = x [M, 256] @ W^T, W [192, 256];
    # dgrad: dx [M, 200] = dy [M, 256] @ W, W [256, 200] contracted over its first dim.
    w_shape = (192, 256) if trans_b else (256, 200)
    k = w_shape[1] if trans_b else w_shape[0]
    aq, as_ = Q.quantize_1x128_ref(rnd((M, k), 1))
    bq, bs = Q.quantize_128x128_ref(rnd(w_shape, 2, "normal") * 0.05)
    out = gemm(aq, as_, bq, bs, trans_b, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, w_shape[0] if trans_b else w_shape[1])
    w64 = deq_w(bq, bs)
    check_gemm(out, deq_rows(aq, as_), w64.t() if trans_b else w64, out_dtype)


def test_dgrad_orientation_matches_explicit_transpose():
    """Reading W [N, K] as [K_contracted, N_out] through strides == materialising W^T: 128x128
    blocks of W^T are the transposed blocks of W, so both calls do identical arithmetic."""
    aq, as_ = Q.quantize_1x128_ref(rnd((150, 256), 3))
    bq, bs = Q.quantize_128x128_ref(rnd((256, 200), 4, "normal"))
    via_strides = G.gemm_fp8_triton(aq, as_, bq, bs, trans_b=False, out_dtype=F32)
    bqt = bq.view(torch.uint8).t().contiguous().view(FP8)
    explicit = G.gemm_fp8_triton(aq, as_, bqt, bs.t().contiguous(), trans_b=True, out_dtype=F32)
    assert torch.equal(via_strides, explicit)


def test_tiny_activations():
    aq, as_ = Q.quantize_1x128_ref(rnd((64, 256), 5, "tiny"))
    bq, bs = Q.quantize_128x128_ref(rnd((128, 256), 6, "normal"))
    out = G.gemm_fp8_triton(aq, as_, bq, bs, True, BF16)
    assert out.abs().max() < 1e-15 and (out != 0).float().mean() > 0.9
    check_gemm(out, deq_rows(aq, as_), deq_w(bq, bs).t(), BF16)


# ---------------------------------------------------------------- grouped fprop / dgrad

def check_grouped(out, a64, w64, offs, trans_b, out_dtype):
    start = 0
    for g, end in enumerate(offs.tolist()):
        wg = w64[g].t() if trans_b else w64[g]
        if end > start:
            check_gemm(out[start:end], a64[start:end], wg, out_dtype)
        start = end
    assert (out[start:] == 0).all()  # rows past offs[-1] belong to no group


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,trans_b", [("empty_and_tail", True), ("one_group", True),
                                          ("ragged", True), ("empty_and_tail", False)])
def test_grouped_gemm_fp8_vs_float64(impl, case, trans_b):
    grouped = IMPLS[impl][1]
    offs = torch.tensor(OFFS_CASES[case], dtype=torch.int32)
    E = offs.numel()
    w_shape = (E, 192, 256) if trans_b else (E, 256, 192)
    aq, as_ = Q.quantize_1x128_ref(rnd((P, 256), 7))
    # Row past offs[-1] hold NaN: they must not leak into any group's output.
    aq.view(torch.uint8)[OFFS_CASES[case][-1]:] = 0x7F
    bq, bs = Q.quantize_128x128_ref(rnd(w_shape, 8, "normal") * 0.05)
    out = grouped(aq, as_, bq, bs, offs, trans_b, BF16)
    assert out.shape == (P, 192)
    check_grouped(out, deq_rows(aq, as_), deq_w(bq, bs), offs, trans_b, BF16)


@pytest.mark.parametrize("config", [G.GemmConfig(block_m=32, block_n=64, block_k=64, group_m=2),
                                    G.GemmConfig(block_m=64, block_n=256, group_m=1),
                                    G.GemmConfig(block_m=32, block_n=128, unroll=2),
                                    G.GemmConfig(block_m=32, block_n=64, block_k=64, unroll=2)])
def test_grouped_gemm_fp8_other_tiles(config):
    """Smaller/larger tiles: two K steps per scale tile, one scale block spanning several output
    tiles or several scale blocks in one tile, and the launch-order bands."""
    offs = torch.tensor(OFFS_CASES["ragged"], dtype=torch.int32)
    aq, as_ = Q.quantize_1x128_ref(rnd((P, 256), 9))
    bq, bs = Q.quantize_128x128_ref(rnd((4, 200, 256), 10, "normal"))
    out = G.grouped_gemm_fp8_triton(aq, as_, bq, bs, offs, True, F32, config)
    check_grouped(out, deq_rows(aq, as_), deq_w(bq, bs), offs, True, F32)


def test_grouped_row_tiles_from_offs_on_the_device():
    offs = torch.tensor([0, 100, 100, 250], dtype=torch.int32)
    got = slots_of(offs, 300, 64, tail=True)
    assert len(got) == 300 // 64 + 1 + 4  # max_tiles(300, 4, 64)
    want = [(1, 0, 64), (1, 64, 100), (3, 100, 164), (3, 164, 228), (3, 228, 250),
            (4, 250, 300)]  # group 4 = the rows past offs[-1]
    assert [r for r in got if r[2] > r[1]] == want
    assert all(r[1] == r[2] == 0 for r in got[len(want):])  # unused slots store nothing


# ---------------------------------------------------------------- wgrad

def wgrad_operands(offs, n=192, k=256, seed=11, kind="heavy"):
    dy = rnd((P, n), seed, kind)
    x = rnd((P, k), seed + 1)
    return dy, x, Q.quantize_1x128_col_ref(dy, offs), Q.quantize_1x128_col_ref(x, offs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,out_dtype", [("empty_and_tail", F32), ("one_group", F32),
                                            ("ragged", BF16)])
def test_grouped_wgrad_vs_float64(impl, case, out_dtype):
    wgrad = IMPLS[impl][3]
    offs = torch.tensor(OFFS_CASES[case], dtype=torch.int32)
    _, _, (aq, as_), (bq, bs) = wgrad_operands(offs)
    out = wgrad(aq, as_, bq, bs, offs, out_dtype)
    assert out.shape == (4, 192, 256) and out.dtype == out_dtype
    a64, b64 = deq_rows(aq, as_, offs), deq_rows(bq, bs, offs)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            check_gemm(out[g], a64[:, start:end], b64[:, start:end].t(), out_dtype)
        else:
            assert (out[g] == 0).all()  # empty group
        start = end


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_wgrad_vs_float64(impl):
    wgrad = IMPLS[impl][2]
    _, _, (aq, as_), (bq, bs) = wgrad_operands(None, kind="tiny")
    out = wgrad(aq, as_, bq, bs, F32)
    assert out.shape == (192, 256)
    check_gemm(out, deq_rows(aq, as_), deq_rows(bq, bs).t(), F32)


@pytest.mark.parametrize("cfg", [G.GemmConfig(block_m=32, block_n=64, block_k=32, group_m=2),
                                 G.GemmConfig(block_m=32, block_n=64, block_k=32, unroll=2),
                                 G.GemmConfig(block_m=32, block_n=64, unroll=2)])
def test_wgrad_other_tiles(cfg):
    offs = torch.tensor(OFFS_CASES["ragged"], dtype=torch.int32)
    _, _, (aq, as_), (bq, bs) = wgrad_operands(offs, n=100, k=160)
    out = G.grouped_gemm_fp8_wgrad_triton(aq, as_, bq, bs, offs, F32, cfg)
    a64, b64 = deq_rows(aq, as_, offs), deq_rows(bq, bs, offs)
    start = 0
    for g, end in enumerate(offs.tolist()):
        check_gemm(out[g], a64[:, start:end], b64[:, start:end].t(), F32)
        start = end


@pytest.mark.parametrize("offs", [[0, 130, 130, 300, 301], [5], [128, 256], [0, 0]])
def test_device_group_tables_match_tile_bounds(offs):
    offs = torch.tensor(offs, dtype=torch.int32)
    starts, ends = tile_bounds(offs, 320)
    got = slots_of(offs, 320, TILE, tail=False)
    assert [(s, e) for _, s, e in got] == list(zip(starts.tolist(), ends.tolist()))
    for g, (first, end, slot) in enumerate(spans_of(offs, 320)):
        assert (first, end) == (offs[g - 1].item() if g else 0, offs[g].item())
        j = 0
        while first + j * TILE < end:
            assert got[slot + j] == (g, first + j * TILE, min(first + (j + 1) * TILE, end))
            j += 1


# ---------------------------------------------------------------- end to end vs bf16 inputs

def test_end_to_end_fprop_dgrad_vs_bf16_inputs():
    x, w = rnd((200, 256), 12), rnd((192, 256), 13, "normal") * 0.05
    aq, as_ = Q.quantize_1x128_ref(x)
    bq, bs = Q.quantize_128x128_ref(w)
    x64, w64 = x.double(), w.double()
    ex = fp8_operand_error(x64, scale_of_rows(as_, 256))
    ew = fp8_operand_error(w64, scale_of_blocks(bs, w.shape))
    y = G.gemm_fp8_triton(aq, as_, bq, bs, True, BF16)
    check_end_to_end(y, x64, ex, w64.t(), ew.t(), deq_rows(aq, as_), deq_w(bq, bs).t(), BF16)
    # dgrad of the same weight: dx = dy @ W, dy row-wise along W's first dim.
    dy = rnd((200, 192), 14)
    dq, ds = Q.quantize_1x128_ref(torch.nn.functional.pad(dy, (0, 64)))  # contract 256
    dy64 = torch.nn.functional.pad(dy, (0, 64)).double()
    wp = torch.nn.functional.pad(w, (0, 0, 0, 64))
    bq2, bs2 = Q.quantize_128x128_ref(wp)
    ed = fp8_operand_error(dy64, scale_of_rows(ds, 256))
    ew2 = fp8_operand_error(wp.double(), scale_of_blocks(bs2, wp.shape))
    dx = G.gemm_fp8_triton(dq, ds, bq2, bs2, False, BF16)
    check_end_to_end(dx, dy64, ed, wp.double(), ew2, deq_rows(dq, ds), deq_w(bq2, bs2), BF16)


def test_end_to_end_grouped_and_wgrad_vs_bf16_inputs():
    offs = torch.tensor(OFFS_CASES["empty_and_tail"], dtype=torch.int32)
    x, w = rnd((P, 256), 15), rnd((4, 192, 256), 16, "normal") * 0.05
    aq, as_ = Q.quantize_1x128_ref(x)
    bq, bs = Q.quantize_128x128_ref(w)
    y = G.grouped_gemm_fp8_triton(aq, as_, bq, bs, offs, True, BF16)
    x64, w64 = x.double(), w.double()
    ex = fp8_operand_error(x64, scale_of_rows(as_, 256))
    ew = fp8_operand_error(w64, scale_of_blocks(bs, w.shape))
    xq64, wq64 = deq_rows(aq, as_), deq_w(bq, bs)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            check_end_to_end(y[start:end], x64[start:end], ex[start:end], w64[g].t(),
                             ew[g].t(), xq64[start:end], wq64[g].t(), BF16)
        start = end
    assert (y[start:] == 0).all()

    dy, x, (aq, as_), (bq, bs) = wgrad_operands(offs)
    dw = G.grouped_gemm_fp8_wgrad_triton(aq, as_, bq, bs, offs, F32)
    a64, b64 = dy.double().t(), x.double().t()
    ea = fp8_operand_error(a64, scale_of_rows(as_, P, offs))
    eb = fp8_operand_error(b64, scale_of_rows(bs, P, offs))
    aq64, bq64 = deq_rows(aq, as_, offs), deq_rows(bq, bs, offs)
    start = 0
    for g, end in enumerate(offs.tolist()):
        sl = slice(start, end)
        check_end_to_end(dw[g], a64[:, sl], ea[:, sl], b64[:, sl].t(), eb[:, sl].t(),
                         aq64[:, sl], bq64[:, sl].t(), F32)
        start = end


def test_bound_detects_a_wrong_scale_tile():
    """The float64 bound is tight enough to see one scale tile read from the wrong place."""
    aq, as_ = Q.quantize_1x128_ref(rnd((64, 256), 17))
    bq, bs = Q.quantize_128x128_ref(rnd((128, 256), 18, "normal"))
    out = G.gemm_fp8_ref(aq, as_.flip(1).contiguous(), bq, bs, True, F32)
    with pytest.raises(AssertionError):
        check_gemm(out, deq_rows(aq, as_), deq_w(bq, bs).t(), F32)


# ---------------------------------------------------------------- NaN rule

@pytest.mark.parametrize("impl", IMPLS)
def test_nan_reaches_outputs_that_read_it(impl):
    gemm, grouped, _, gwgrad = IMPLS[impl]
    x = rnd((130, 256), 19, dtype=F32)
    x[5, 200] = float("nan")
    aq, as_ = Q.quantize_1x128_ref(x)
    bq, bs = Q.quantize_128x128_ref(rnd((2, 128, 256), 20, "normal"))
    y = gemm(aq, as_, bq[0], bs[0], True, BF16)
    assert y[5].isnan().all() and not y[torch.arange(130) != 5].isnan().any()
    offs = torch.tensor([3, 130], dtype=torch.int32)
    y = grouped(aq, as_, bq, bs, offs, True, BF16)
    assert y[5].isnan().all() and not y[torch.arange(130) != 5].isnan().any()

    offs = torch.tensor(OFFS_CASES["ragged"], dtype=torch.int32)
    dy = rnd((P, 64), 21, dtype=F32)
    dy[100, 7] = float("nan")  # token 100 is in group 2
    aq, as_ = Q.quantize_1x128_col_ref(dy, offs)
    bq, bs = Q.quantize_1x128_col_ref(rnd((P, 128), 22), offs)
    dw = gwgrad(aq, as_, bq, bs, offs, F32)
    assert dw[2, 7].isnan().all()
    dw[2, 7] = 0
    assert not dw.isnan().any()


# ---------------------------------------------------------------- the cuBLAS loop (CPU stand-in)

def _cublas_layout(a, s_cm, kind):
    """The layout rules cuBLAS enforces on the H100 (see kernels/cublas.py), asserted."""
    rows, k = a.shape
    assert a.stride(1) == 1 and k % CB.ALIGN == 0 and a.stride(0) % CB.ALIGN == 0
    assert a.storage_offset() % CB.ALIGN == 0, "slice must start on a 16-byte boundary"
    assert s_cm.shape == (rows, -(-k // TILE)) and s_cm.stride() == (1, rows), \
        f"scales {tuple(s_cm.shape)} strides {s_cm.stride()} are not packed column-major"
    if kind == "fwd":
        assert rows % CB.ROW_ALIGN == 0 and k % (CB.K_BLOCKS * TILE) == 0


def strict_dense_fwd(a, s_cm, b, b_s, out):
    _cublas_layout(a, s_cm, "fwd")
    assert b.is_contiguous() and b_s.is_contiguous() and out.is_contiguous()
    out.copy_(G.gemm_fp8_ref(a, s_cm.contiguous(), b, b_s, True, out.dtype))


def strict_dense_wgrad(a, s_cm, b, s_b_cm, out):
    _cublas_layout(a, s_cm, "wgrad")
    _cublas_layout(b, s_b_cm, "wgrad")
    assert out.is_contiguous()
    out.copy_(G.gemm_fp8_wgrad_ref(a, s_cm.contiguous(), b, s_b_cm.contiguous(), out.dtype))


# Group sizes that exercise every branch of the loop: empty groups, row counts off the multiple of
# ROW_ALIGN (calls that run into the next group's rows, or past offs[-1] into rows zeroed after;
# a padded tail call where the rounded rows would pass M), token counts and starts off the 16
# alignment (padded columns), rows past offs[-1].
CUBLAS_OFFS = {**OFFS_CASES, "small_and_unaligned": [1, 6, 22, 38, 38, 166, 294],
               "overrun_past_empty": [5, 5, 130, 299]}


@pytest.mark.parametrize("case", CUBLAS_OFFS)
def test_cublas_grouped_loop_matches_reference(case, monkeypatch):
    offs = torch.tensor(CUBLAS_OFFS[case], dtype=torch.int32)
    E = offs.numel()
    aq, as_ = Q.quantize_1x128_ref(rnd((P, 512), 50))
    bq, bs = Q.quantize_128x128_ref(rnd((E, 96, 512), 51, "normal"))
    y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=strict_dense_fwd)
    assert torch.equal(y, G.grouped_gemm_fp8_ref(aq, as_, bq, bs, offs, True, BF16))
    y2 = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=strict_dense_fwd,
                        offs_host=offs.clone())
    assert torch.equal(y2, y)

    da, db = rnd((P, 64), 52), rnd((P, 160), 53)
    ta, tb = Q.quantize_1x128_col_ref(da, offs), Q.quantize_1x128_col_ref(db, offs)
    # the aligned group layout, read with the padded ends: no zero-padded copy is needed
    po = GR.pad_offsets(offs, 16)
    ta16, tb16 = Q.quantize_1x128_col_ref(da, offs, 16), Q.quantize_1x128_col_ref(db, offs, 16)
    for out_dtype in (F32, BF16):
        dw = CB.grouped_wgrad(*ta, *tb, offs, out_dtype, dense=strict_dense_wgrad)
        ref = G.grouped_gemm_fp8_wgrad_ref(*ta, *tb, offs, out_dtype)
        assert torch.equal(CB.grouped_wgrad(*ta, *tb, offs, out_dtype, dense=strict_dense_wgrad,
                                            offs_host=offs.clone()), dw)
        with monkeypatch.context() as mp:
            mp.setattr(CB, "_pad_cols", lambda *a: pytest.fail("padded copy in aligned layout"))
            dw16 = CB.grouped_wgrad(*ta16, *tb16, po, out_dtype, dense=strict_dense_wgrad)
        # Same dequantized operands and float32 matmuls; the padded columns only add zeros, but
        # a matmul of another width may sum in another order: fp32 accumulation bound.
        a64, b64 = deq_rows(*ta, offs), deq_rows(*tb, offs)
        start = 0
        for g, end in enumerate(offs.tolist()):
            end = max(end, start)
            bound = out_bound(ref[g].double(),
                              acc_bound(a64[:, start:end].abs() @ b64[:, start:end].abs().t(),
                                        max(end - start, 1)), out_dtype)
            assert_within(dw[g], ref[g].double(), 2 * bound)
            assert_within(dw16[g], ref[g].double(), 2 * bound)
            start = end


def _floats_at(addr: int, count: int) -> torch.Tensor:
    """A copy of `count` float32 values at a host address (CPU tensors' data)."""
    return torch.frombuffer(bytearray((ctypes.c_float * count).from_address(addr)),
                            dtype=torch.float32)


class RawCaller(LT.Caller):
    """Stands in for the direct cuBLASLt loop on the CPU: rebuilds each call's operands from
    the raw offsets and scale addresses it is given (what cuBLASLt would read) and runs the
    strict stand-ins on them, so the address arithmetic of the direct loops is checked."""

    def __init__(self, kind):  # no handle, stream or device
        self.kind, self.raw_calls = kind, 0

    def __call__(self, *args):
        (strict_dense_fwd if self.kind == "fwd" else strict_dense_wgrad)(*args)

    def many(self, a, b, out, calls, streams=1):
        self.streams = streams
        for oa, m, ob, n, k, oo, pas, pbs in calls:
            view = lambda t, r, off: torch.as_strided(t, (r, k if t is not out else n),
                                                      (t.stride(0), 1), t.storage_offset() + off)
            A, B, O = view(a, m, oa), view(b, n, ob), view(out, m, oo)
            kt = -(-k // TILE)
            sa = _floats_at(pas, m * kt).view(kt, m).t()  # packed column-major [m, k / 128]
            if self.kind == "fwd":  # b's 128x128 grid, rows contiguous
                sb = _floats_at(pbs, -(-n // TILE) * kt).view(-1, kt)
            else:
                sb = _floats_at(pbs, n * kt).view(kt, n).t()
            self(A, sa, B, sb, O)
            self.raw_calls += 1


@pytest.mark.parametrize("case", CUBLAS_OFFS)
def test_cublas_direct_loop_addresses_match_the_tensor_loop(case):
    offs = torch.tensor(CUBLAS_OFFS[case], dtype=torch.int32)
    E = offs.numel()
    aq, as_ = Q.quantize_1x128_ref(rnd((P, 512), 54))
    bq, bs = Q.quantize_128x128_ref(rnd((E, 96, 512), 55, "normal"))
    raw = RawCaller("fwd")
    y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=raw)
    assert torch.equal(y, CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=strict_dense_fwd))
    assert raw.raw_calls > 0 or offs.max() <= 0
    da, db = rnd((P, 64), 56), rnd((P, 160), 57)
    po = GR.pad_offsets(offs, 16)
    for lay, o in [((Q.quantize_1x128_col_ref(da, offs), Q.quantize_1x128_col_ref(db, offs)), offs),
                   ((Q.quantize_1x128_col_ref(da, offs, 16),
                     Q.quantize_1x128_col_ref(db, offs, 16)), po)]:
        (ta, tb) = lay
        for out_dtype in (F32, BF16):
            raw = RawCaller("wgrad")
            dw = CB.grouped_wgrad(*ta, *tb, o, out_dtype, dense=raw)
            ref = CB.grouped_wgrad(*ta, *tb, o, out_dtype, dense=strict_dense_wgrad)
            assert torch.equal(dw, ref)
            if o is po:  # the aligned layout: every non-empty group on raw offsets
                assert raw.raw_calls == int(((po.diff(prepend=po.new_zeros(1))) > 0).sum())


class FailingCaller(RawCaller):
    """A direct call that cuBLASLt refuses partway through the loop."""

    def many(self, a, b, out, calls, streams=1):
        super().many(a, b, out, calls[:1])
        raise LT.CublasLtError("cuBLASLt matmul: CUBLAS_STATUS_NOT_SUPPORTED (15)")


def test_cublas_direct_loop_refused_reruns_through_torch(monkeypatch):
    """A cuBLASLt error partway through a grouped GEMM runs every group again through the torch
    call (here the strict stand-ins), with a warning, not a half-written output."""
    monkeypatch.setattr(CB, "dense_fwd", strict_dense_fwd)
    monkeypatch.setattr(CB, "dense_wgrad", strict_dense_wgrad)
    offs = torch.tensor(CUBLAS_OFFS["small_and_unaligned"], dtype=torch.int32)
    E = offs.numel()
    aq, as_ = Q.quantize_1x128_ref(rnd((P, 512), 58))
    bq, bs = Q.quantize_128x128_ref(rnd((E, 96, 512), 59, "normal"))
    y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=FailingCaller("fwd"))
    assert torch.equal(y, CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, dense=strict_dense_fwd))
    po = GR.pad_offsets(offs, 16)
    ta = Q.quantize_1x128_col_ref(rnd((P, 64), 60), offs, 16)
    tb = Q.quantize_1x128_col_ref(rnd((P, 160), 61), offs, 16)
    dw = CB.grouped_wgrad(*ta, *tb, po, F32, dense=FailingCaller("wgrad"))
    assert torch.equal(dw, CB.grouped_wgrad(*ta, *tb, po, F32, dense=strict_dense_wgrad))


@pytest.mark.parametrize("offs", [[5, 3, 9, 20], [0, 0, 0], [16, 48, 250],
                                  [1, 6, 22, 38, 38, 166, 294], [300], [3, 297, 299]])
def test_pack_scales_kernel_matches_gather(offs):
    """The packing kernel the CUDA path uses (interpreter here) against the torch gather, and
    both against the rows they stand for: group g's rows rounded up to ROW_ALIGN, the rows past
    M read as scale 1."""
    o = torch.tensor(offs, dtype=torch.int32)
    M = 300 if max(offs) >= 250 else 12
    KB = 5
    s = torch.rand(M, KB) + 0.5
    bounds = CB._host_bounds(o, M)
    rows = [CB.cdiv(e - b, CB.ROW_ALIGN) * CB.ROW_ALIGN for b, e in bounds]
    total = sum(rows)
    packed = CB._pack_group_scales(s, o, bounds, rows)
    padded = torch.cat([s, torch.ones(CB.ROW_ALIGN, KB)])
    for (b, _), r, view in zip(bounds, rows, packed):
        assert view.shape == (r, KB) and view.stride() == (1, r)
        assert torch.equal(view, padded[b:b + r])
    if total:
        buf = torch.full((total * KB,), -1.0)
        CB._pack_scales_kernel[(CB.cdiv(total, CB._PACK_ROWS),)](
            s, o, buf, o.numel(), M, KB, total, ROW_ALIGN_=CB.ROW_ALIGN, BLOCK_R=CB._PACK_ROWS,
            G_BLOCK=8, KB_BLOCK=8)
        assert torch.equal(buf, packed[0].as_strided((total * KB,), (1,), 0))


def test_cublas_dense_calls_match_reference():
    for m in (3, 5, 200):  # tail only, head and tail, head only
        aq, as_ = Q.quantize_1x128_ref(rnd((m, 512), 54))
        bq, bs = Q.quantize_128x128_ref(rnd((96, 512), 55, "normal"))
        y = CB.gemm_fwd(aq, as_, bq, bs, BF16, dense=strict_dense_fwd)
        assert torch.equal(y, G.gemm_fp8_ref(aq, as_, bq, bs, True, BF16))
    ta = Q.quantize_1x128_col_ref(rnd((208, 64), 56))
    tb = Q.quantize_1x128_col_ref(rnd((208, 32), 57))
    dw = CB.gemm_wgrad(*ta, *tb, F32, dense=strict_dense_wgrad)
    assert torch.equal(dw, G.gemm_fp8_wgrad_ref(*ta, *tb, F32))


def test_cublas_selection_rules():
    cpu = torch.empty(1, dtype=FP8)
    assert not CB.choose(cpu, "fwd", BF16, (128, 512))  # CPU runs the torch reference
    with pytest.raises(ValueError, match="must be one of"):
        CB.set_gemm_backend("cutlass")
    assert CB._host_bounds(torch.tensor([5, 3, 9, 20], dtype=torch.int32), 12) == \
        [(0, 5), (5, 5), (5, 9), (9, 12)]
    # given a host copy, the bounds come from it (the device offs is not read)
    assert CB._host_bounds(torch.tensor([0, 0], dtype=torch.int32), 12,
                           torch.tensor([4, 8], dtype=torch.int32)) == [(0, 4), (4, 8)]
    # the static part: shapes and backend, as the passes ask it at compile time
    cuda = torch.device("cuda")
    assert not CB.may_choose(torch.device("cpu"), "fwd", (128, 512))
    assert not CB.may_choose(cuda, "fwd", (128, 256))  # K not a multiple of 4 x 128
    assert not CB.may_choose(cuda, "wgrad", (120, 512))  # output dim off the 16 alignment
    assert not CB.may_choose(cuda, "wgrad", (128, 512), CB.GROUP_WORK / 2)  # small groups
    assert CB.may_choose(cuda, "wgrad", (128, 512), CB.GROUP_WORK)


# ---------------------------------------------------------------- custom ops: checks and fakes

def _ops_inputs():
    aq, as_ = Q.quantize_1x128_ref(rnd((40, 256), 23))
    bq, bs = Q.quantize_128x128_ref(rnd((2, 64, 256), 24, "normal"))
    offs = torch.tensor([10, 40], dtype=torch.int32)
    wa = Q.quantize_1x128_col_ref(rnd((40, 64), 25), offs)
    wb = Q.quantize_1x128_col_ref(rnd((40, 96), 26), offs)
    return aq, as_, bq, bs, offs, wa, wb


def test_custom_ops_match_reference_and_fake():
    aq, as_, bq, bs, offs, wa, wb = _ops_inputs()
    ops = torch.ops.fp8flow
    cases = [
        (ops.gemm_fp8, (aq, as_, bq[0], bs[0], True, BF16), G.gemm_fp8_ref),
        (ops.grouped_gemm_fp8, (aq, as_, bq, bs, offs, True, BF16), G.grouped_gemm_fp8_ref),
        (ops.grouped_gemm_fp8_wgrad, (*wa, *wb, offs, F32), G.grouped_gemm_fp8_wgrad_ref),
    ]
    da = Q.quantize_1x128_col_ref(rnd((40, 64), 27))
    db = Q.quantize_1x128_col_ref(rnd((40, 96), 28))
    cases.append((ops.gemm_fp8_wgrad, (*da, *db, F32), G.gemm_fp8_wgrad_ref))
    oh = offs.clone()
    cases += [  # with the host copy of offs, which the references do not take
        (ops.grouped_gemm_fp8, (aq, as_, bq, bs, offs, True, BF16, oh),
         lambda *a: G.grouped_gemm_fp8_ref(*a[:-1])),
        (ops.grouped_gemm_fp8_wgrad, (*wa, *wb, offs, F32, oh),
         lambda *a: G.grouped_gemm_fp8_wgrad_ref(*a[:-1])),
        (ops.offsets_to_host, (offs,), lambda o: o)]
    for op, args, ref in cases:
        assert torch.equal(op(*args), ref(*args))
        # test_schema needs arithmetic torch lacks for float8 on CPU; the fakes are what
        # compile relies on.
        torch.library.opcheck(op, args, test_utils=("test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def _bad(aq, as_, bq, bs, offs, wa, wb):
    ops = torch.ops.fp8flow
    k200 = Q.quantize_1x128_ref(rnd((40, 200), 29))
    col_major = aq.view(torch.uint8).t().contiguous().t().view(FP8)  # same shape, strides (1, 40)
    w200 = Q.quantize_128x128_ref(rnd((64, 200), 30))
    return [
        (lambda: ops.gemm_fp8(*k200, *w200, True, BF16), "multiple of 128"),
        (lambda: ops.gemm_fp8(aq.float(), as_, bq[0], bs[0], True, BF16), "a must have dtype"),
        (lambda: ops.gemm_fp8(col_major, as_, bq[0], bs[0], True, BF16), "contiguous"),
        (lambda: ops.gemm_fp8(aq, as_[:, :1].contiguous(), bq[0], bs[0], True, BF16),
         "scales must have shape"),
        (lambda: ops.gemm_fp8(aq, as_, bq[0], bs[0], False, BF16), "contracted dim"),
        (lambda: ops.gemm_fp8(aq, as_, bq[0], bs[0], True, torch.float16), "out_dtype"),
        (lambda: ops.gemm_fp8(aq, as_, bq, bs, True, BF16), "must be 2-D"),
        (lambda: ops.grouped_gemm_fp8(aq, as_, bq[0], bs[0], offs, True, BF16), "3-D"),
        (lambda: ops.grouped_gemm_fp8(aq, as_, bq, bs, offs.long(), True, BF16), "offs"),
        (lambda: ops.grouped_gemm_fp8(aq, as_, bq, bs, offs[:1], True, BF16),
         "one end per group"),
        (lambda: ops.grouped_gemm_fp8(aq, as_, bq, bs, offs, True, BF16, offs[:1]),
         "offs_host must be a CPU copy"),
        (lambda: ops.grouped_gemm_fp8_wgrad(wa[0], wa[1], wb[0][:, :30].contiguous(), wb[1],
                                            offs, F32), "token dim"),
        (lambda: ops.gemm_fp8_wgrad(*wa, *wb, F32), "scales must have shape"),
    ]


def test_bad_inputs_raise_fp8unsupported():
    for fn, msg in _bad(*_ops_inputs()):
        with pytest.raises(Fp8Unsupported, match=msg):
            fn()


# ---------------------------------------------------------------- GPU (compiled Triton)

# On the GPU each 128-deep step is a fp8 tensor-core MMA whose internal accumulation keeps only
# about 14 bits (it is promoted to fp32 after every step): per element at most ~2^-7 of
# sum |a||b| in the worst case, far less in norm.
GPU_ACC = 2.0**-7
# Norm-wise: bf16 rounding is <= 2^-8 relative per element; the MMA error adds well below that
# in norm for random data.
GPU_NORM = 2.0**-7


def check_gpu(out, a64, b64):
    exact = a64 @ b64
    bound = GPU_ACC * (a64.abs() @ b64.abs()) + 2.0**-8 * exact.abs() + 2.0**-134
    assert_within(out.cpu(), exact, bound)
    rel = (out.cpu().double() - exact).norm() / exact.norm()
    assert rel <= GPU_NORM, rel.item()


def check_wgrad_gpu(outs, a64, b64, ends):
    """Each output's weight gradient of every group against the float64 bound; empty groups
    must be zeros."""
    start = 0
    for g, end in enumerate(ends.tolist()):
        for out in outs:
            if end > start:
                check_gpu(out[g], a64[:, start:end], b64[:, start:end].t())
            else:
                assert (out[g] == 0).all()
        start = end


def _gpu_offs(P_, E):
    g = torch.Generator().manual_seed(31)
    sizes = torch.randint(0, 2 * P_ // E, (E,), generator=g)
    sizes[1] = 0  # one empty group
    ends = torch.cumsum(sizes, 0).clamp(max=P_ - 100)  # and rows past offs[-1]
    return ends.to(torch.int32)


@pytest.fixture(params=["triton", "cublas", "cublas_via_torch"])
def gemm_backend(request):
    """Run a GPU test with the GEMMs forced through one implementation: the Triton kernels,
    the cuBLAS loop calling cuBLASLt directly (the default), or the loop calling torch."""
    before, lt_before = CB.gemm_backend(), LT.enabled()
    CB.set_gemm_backend("triton" if request.param == "triton" else "cublas")
    LT.set_enabled(request.param != "cublas_via_torch")
    yield "cublas" if request.param == "cublas_via_torch" else request.param
    CB.set_gemm_backend(before)
    LT.set_enabled(lt_before)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", ["random", "small_and_unaligned"])
def test_gpu_grouped_fprop_dgrad_wgrad(gemm_backend, sizes):
    Pg, K, N, E = 4096, 1024, 1024, 8
    if sizes == "random":
        offs = _gpu_offs(Pg, E)
    else:  # groups of 1..40 rows and unaligned token starts, then one big group
        offs = torch.tensor([1, 17, 20, 56, 56, 95, 130, 3000], dtype=torch.int32)
    x, dy = rnd((Pg, K), 40), rnd((Pg, N), 41)
    w = rnd((E, N, K), 42, "normal") * 0.03
    ops = torch.ops.fp8flow
    aq, as_ = Q.quantize_1x128_ref(x)
    bq, bs, bqT, bsT = Q.quantize_128x128_dual_ref(w)
    dq, ds = Q.quantize_1x128_ref(dy)
    cu = lambda *ts: [t.cuda() for t in ts]
    if gemm_backend == "cublas":  # the probes pass, so the ops below do run through cuBLAS
        for kind, dt in [("fwd", BF16), ("wgrad", BF16), ("wgrad", F32)]:
            assert CB.choose(aq.cuda(), kind, dt, (N, K)), CB._probe(0, kind, dt)
            if LT.enabled():  # and the loop calls cuBLASLt directly
                assert LT.probe(0, kind, dt) is None, LT.probe(0, kind, dt)
    y = ops.grouped_gemm_fp8(*cu(aq, as_, bq, bs, offs), True, BF16)
    dx = ops.grouped_gemm_fp8(*cu(dq, ds, bq, bs, offs), False, BF16)
    # dgrad as the backend runs it: the transposed weight copy, B K-major (cuBLAS takes this one)
    dx_t = ops.grouped_gemm_fp8(*cu(dq, ds, bqT, bsT, offs), True, BF16)
    xq, wq, dyq = deq_rows(aq, as_), deq_w(bq, bs), deq_rows(dq, ds)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            check_gpu(y[start:end], xq[start:end], wq[g].t())
            check_gpu(dx[start:end], dyq[start:end], wq[g])
            check_gpu(dx_t[start:end], dyq[start:end], wq[g])
        start = end
    assert (y[start:] == 0).all() and (dx[start:] == 0).all() and (dx_t[start:] == 0).all()
    # with the host copy of offs the compiled graph hands over: the same bytes
    oh = offs.clone()
    assert torch.equal(ops.grouped_gemm_fp8(*cu(aq, as_, bq, bs, offs), True, BF16, oh), y)
    # pinned, filled without waiting; the GEMM waits on its event before reading it
    oh_async = ops.offsets_to_host(offs.cuda())
    assert oh_async.is_pinned() and oh_async._fp8flow_ready is not None
    assert torch.equal(ops.grouped_gemm_fp8(*cu(aq, as_, bq, bs, offs), True, BF16, oh_async), y)
    assert torch.equal(oh_async, offs)

    ta, tb = Q.quantize_1x128_col_ref(dy, offs), Q.quantize_1x128_col_ref(x, offs)
    a64, b64 = deq_rows(*ta, offs), deq_rows(*tb, offs)
    # the aligned group layout (every group on 16 tokens), read with the padded ends
    pa = GR.pad_offsets(offs, 16)
    ta16, tb16 = Q.quantize_1x128_col_ref(dy, offs, 16), Q.quantize_1x128_col_ref(x, offs, 16)
    for out_dtype in (F32, BF16):
        dw = ops.grouped_gemm_fp8_wgrad(*cu(*ta, *tb, offs), out_dtype)
        assert torch.equal(ops.grouped_gemm_fp8_wgrad(*cu(*ta, *tb, offs), out_dtype, oh), dw)
        dw16 = ops.grouped_gemm_fp8_wgrad(*cu(*ta16, *tb16, pa), out_dtype, pa.clone())
        check_wgrad_gpu((dw, dw16), a64, b64, offs)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [BF16, F32])
def test_gpu_cublaslt_direct_call_matches_the_torch_call(out_dtype):
    """The loop's two dense calls on the same groups: straight into cuBLASLt (algorithm kept
    per power-of-two class of the varying dim) and through torch (searched per call)."""
    if not LT.enabled():
        pytest.skip("FP8FLOW_CUBLASLT=0")
    # group sizes: 1..3 rows (the padded tail path), 2048 (a power of two: the same search as
    # torch's), 4 + 16 + 36, and an empty group
    offs = torch.tensor([2, 2050, 2054, 2070, 2106, 2106, 3000], dtype=torch.int32)
    P_, K, N, E = 3100, 1024, 512, offs.numel()
    x, dy = rnd((P_, K), 50), rnd((P_, N), 51)
    w = rnd((E, N, K), 52, "normal") * 0.03
    aq, as_ = (t.cuda() for t in Q.quantize_1x128_ref(x))
    bq, bs = (t.cuda() for t in Q.quantize_128x128_ref(w))
    oc = offs.cuda()
    if out_dtype == BF16:
        assert LT.probe(0, "fwd", out_dtype) is None, LT.probe(0, "fwd", out_dtype)
        direct = CB.grouped_fwd(aq, as_, bq, bs, oc, out_dtype)
        torch_ = CB.grouped_fwd(aq, as_, bq, bs, oc, out_dtype, dense=CB.dense_fwd)
        assert torch.equal(direct[2:2050], torch_[2:2050])
        xq, wq = deq_rows(aq.cpu(), as_.cpu()), deq_w(bq.cpu(), bs.cpu())
        start = 0
        for g, end in enumerate(offs.tolist()):
            if end > start:
                check_gpu(direct[start:end], xq[start:end], wq[g].t())
            start = end
        assert (direct[start:] == 0).all()
    # wgrad from the aligned group layout (the compiled graph's), tokens contracted
    pa = GR.pad_offsets(offs, 16)
    ta = [t.cuda() for t in Q.quantize_1x128_col_ref(dy, offs, 16)]
    tb = [t.cuda() for t in Q.quantize_1x128_col_ref(x, offs, 16)]
    assert LT.probe(0, "wgrad", out_dtype) is None, LT.probe(0, "wgrad", out_dtype)
    dw = CB.grouped_wgrad(*ta, *tb, pa.cuda(), out_dtype)
    dw_t = CB.grouped_wgrad(*ta, *tb, pa.cuda(), out_dtype, dense=CB.dense_wgrad)
    assert torch.equal(dw[1], dw_t[1])  # 2048 tokens: the same search as torch's
    a64, b64 = deq_rows(ta[0].cpu(), ta[1].cpu(), pa), deq_rows(tb[0].cpu(), tb[1].cpu(), pa)
    check_wgrad_gpu((dw,), a64, b64, pa)


@pytest.mark.gpu
@pytest.mark.parametrize("streams", [2, 3])
def test_gpu_cublaslt_streams_give_the_bits_of_one_stream(monkeypatch, streams):
    """Groups spread over side streams (aligned groups, one empty): the same outputs as all on
    the current stream, and the current stream sees them without a synchronize (its next
    kernel reads them)."""
    if not LT.enabled():
        pytest.skip("FP8FLOW_CUBLASLT=0")
    offs = torch.tensor([512, 1024, 1024, 2048, 2560, 3072], dtype=torch.int32)
    P_, K, N, E = 3072, 1024, 512, offs.numel()
    x, dy = rnd((P_, K), 65), rnd((P_, N), 66)
    aq, as_ = (t.cuda() for t in Q.quantize_1x128_ref(x))
    bq, bs = (t.cuda() for t in Q.quantize_128x128_ref(rnd((E, N, K), 67, "normal") * 0.03))
    ta = [t.cuda() for t in Q.quantize_1x128_col_ref(dy, offs)]
    tb = [t.cuda() for t in Q.quantize_1x128_col_ref(x, offs)]
    oc = offs.cuda()
    outs = {}
    for n in (1, streams):
        monkeypatch.setattr(LT, "STREAMS", n)
        torch.cuda._sleep(50_000_000)  # the side streams' work queued behind a busy stream
        y = CB.grouped_fwd(aq, as_, bq, bs, oc, BF16)
        dw = CB.grouped_wgrad(*ta, *tb, oc, F32)
        outs[n] = (y.sum(1), dw.sum((1, 2)), y.clone(), dw.clone())  # read on the current stream
    for a, b in zip(outs[1], outs[streams]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_host_copy_of_offs_is_read_after_the_copy():
    """The copy is queued behind a long kernel; the host bounds must still see its values."""
    offs = torch.tensor([7, 7, 300, 4000], dtype=torch.int32, device="cuda")
    # Warm-up: the first launch of a kernel (CUDA's lazy module loading) and the first pinned
    # buffer of a size wait for the device; in training only the first step pays that.
    CB._host_bounds(offs, 4096, CB.host_copy(offs * 1))
    for _ in range(3):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the copy
        host = CB.host_copy(offs * 1)
        assert not host._fp8flow_ready.query()  # the copy has not run yet
        assert CB._host_bounds(offs, 4096, host) == [(0, 7), (7, 7), (7, 300), (300, 4000)]


@pytest.mark.gpu
def test_gpu_cublas_nan_reaches_outputs_that_read_it(gemm_backend):
    x = rnd((130, 512), 19, dtype=F32)
    x[5, 400] = float("nan")
    aq, as_ = Q.quantize_1x128_ref(x)
    bq, bs = Q.quantize_128x128_ref(rnd((2, 128, 512), 20, "normal"))
    offs = torch.tensor([3, 130], dtype=torch.int32)
    y = torch.ops.fp8flow.grouped_gemm_fp8(*(t.cuda() for t in (aq, as_, bq, bs, offs)), True,
                                           BF16).cpu()
    assert y[5].isnan().all() and not y[torch.arange(130) != 5].isnan().any()


@pytest.mark.gpu
def test_gpu_dense_and_scaled_mm_blockwise(gemm_backend):
    M, K, N = 2048, 1024, 1536
    aq, as_ = Q.quantize_1x128_ref(rnd((M, K), 43))
    bq, bs = Q.quantize_128x128_ref(rnd((N, K), 44, "normal") * 0.03)
    a, s_a, b, s_b = (t.cuda() for t in (aq, as_, bq, bs))
    y = torch.ops.fp8flow.gemm_fp8(a, s_a, b, s_b, True, BF16)
    check_gpu(y, deq_rows(aq, as_), deq_w(bq, bs).t())
    ta, tb = Q.quantize_1x128_col_ref(rnd((M, N), 45)), Q.quantize_1x128_col_ref(rnd((M, K), 46))
    dw = torch.ops.fp8flow.gemm_fp8_wgrad(*(t.cuda() for t in (*ta, *tb)), F32)
    check_gpu(dw, deq_rows(*ta), deq_rows(*tb).t())
    # cuBLAS blockwise as a peer: scale_a column-major (M, K/128), scale_b the transpose of the
    # contiguous (N/128, K/128) blocks.
    F = torch.nn.functional
    theirs = F.scaled_mm(a, b.t(), s_a.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                         s_b.t(), F.ScalingType.BlockWise128x128, output_dtype=BF16)
    check_gpu(theirs, deq_rows(aq, as_), deq_w(bq, bs).t())
    rel = (y.double() - theirs.double()).norm() / theirs.double().norm()
    assert rel <= 2 * GPU_NORM, rel.item()


def test_split_calls_balances_work_in_call_order():
    # entries (oa, m, ob, n, k, oo, pas, pbs): work m * n * k
    calls = [(i, m, 0, 8, 16, 0, 0, 0) for i, m in enumerate([64, 16, 16, 16, 64, 0, 32])]
    assert LT.split_calls(calls, 1) == [calls]
    assert LT.split_calls(calls[:1], 2) == [calls[:1]]
    parts = LT.split_calls(calls, 2)
    assert sorted(c for p in parts for c in p) == sorted(calls)  # each entry once
    assert all(p == sorted(p) for p in parts)  # call order kept within a stream
    work = [sum(c[1] for c in p) for p in parts]
    assert work == [64 + 32, 16 + 16 + 16 + 64 + 0]  # greedy: least-loaded list first
    assert len(LT.split_calls(calls[:3], 8)) == 3  # no empty lists


def test_cublas_direct_loop_uses_one_stream_only_where_rows_overrun():
    """fprop rounds a group's rows up to 4 into the next group's rows, which that group's call
    must overwrite after it: such loops stay on one stream; the aligned layout and wgrad spread."""
    aq, as_ = Q.quantize_1x128_ref(rnd((64, 512), 62))
    bq, bs = Q.quantize_128x128_ref(rnd((2, 96, 512), 63, "normal"))
    for offs, streams in (([5, 64], 1), ([16, 64], LT.STREAMS)):
        raw = RawCaller("fwd")
        CB.grouped_fwd(aq, as_, bq, bs, torch.tensor(offs, dtype=torch.int32), BF16, dense=raw)
        assert raw.streams == streams
    t = Q.quantize_1x128_col_ref(rnd((64, 128), 64), torch.tensor([16, 64], dtype=torch.int32))
    raw = RawCaller("wgrad")
    CB.grouped_wgrad(*t, *t, torch.tensor([16, 64], dtype=torch.int32), F32, dense=raw)
    assert raw.streams == LT.STREAMS


# ---------------------------------------------------------------- wgrad scales in 128x128 blocks

from fp8flow_compile.kernels import transpose as TR  # noqa: E402
from fp8flow_compile.kernels.common import expand_block_scales, is_block_scaled  # noqa: E402


def transposed_operand(rows, offs, seed, align=1, src_row=None):
    """A wgrad operand as the flow makes it: row-wise 1x128 FP8 of [P, rows] values, then the
    scaling-aware transpose into the group layout. Returns (qT, sT per row, sT in blocks)."""
    q, s = Q.quantize_1x128_ref(rnd((P, rows), seed))
    qT, sT = TR.scaling_aware_transpose_ref(q, s, offs, align, src_row)
    return qT, sT, sT[::TILE].contiguous()


def block_operand(rows, offs, seed, length=P, align=1):
    """A wgrad operand whose scales are constant over 128-row blocks, with any number of rows
    (the transpose needs a multiple of 128): column-wise FP8 bytes with the scales replaced by
    a random power-of-two grid. Returns (qT, sT per row, sT in blocks)."""
    qT, sT = Q.quantize_1x128_col_ref(rnd((length, rows), seed), offs, align)
    g = torch.Generator().manual_seed(seed)
    blk = torch.exp2(torch.randint(-6, 6, (-(-rows // TILE), sT.shape[1]), generator=g).float())
    return qT, expand_block_scales(blk, rows).contiguous(), blk


@pytest.mark.parametrize("case", ["ragged", "empty_and_tail", "aligned16", "gathered", "dense"])
def test_transpose_scales_are_constant_over_128_row_blocks(case):
    """What passes/block_scales.py relies on: the transpose gives every row of a 128-row block
    the same scale per token tile, so every 128th row holds all of them; a row-wise column
    quantization does not (its scales differ row by row)."""
    offs = None if case == "dense" else torch.tensor(OFFS_CASES["ragged" if case == "ragged"
                                                                else "empty_and_tail"],
                                                     dtype=torch.int32)
    align = 16 if case == "aligned16" else 1
    src = None
    if case == "gathered":
        src = torch.randperm(P, generator=torch.Generator().manual_seed(3)).to(torch.int32)
        src[::7] = -1
    qT, sT, blk = transposed_operand(384, offs, 60, align, src)
    assert blk.shape == (3, sT.shape[1]) and is_block_scaled(blk, 384)
    assert torch.equal(expand_block_scales(blk, 384), sT)
    _, s_col = Q.quantize_1x128_col_ref(rnd((P, 384), 60), offs)
    assert not torch.equal(expand_block_scales(s_col[::TILE].contiguous(), 384), s_col)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["ragged", "empty_and_tail", "one_group"])
def test_grouped_wgrad_block_scales_give_the_same_bits(impl, case):
    """Per-row and block forms of the same scales, in every combination, through the reference
    and the Triton kernel (interpreter): the same output bits. Rows not a multiple of 128 (200)
    make the last block partial."""
    wgrad = IMPLS[impl][3]
    offs = torch.tensor(OFFS_CASES[case], dtype=torch.int32)
    aq, as_rows, as_blk = block_operand(200, offs, 61)
    bq, bs_rows, bs_blk = transposed_operand(256, offs, 62)
    ref = wgrad(aq, as_rows, bq, bs_rows, offs, F32)
    for sa, sb in [(as_rows, bs_blk), (as_blk, bs_rows), (as_blk, bs_blk)]:
        assert torch.equal(wgrad(aq, sa, bq, sb, offs, F32), ref)
    check_gemm(ref[1], deq_rows(aq, as_rows, offs)[:, offs[0]:offs[1]],
               deq_rows(bq, bs_rows, offs)[:, offs[0]:offs[1]].t(), F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_wgrad_block_scales_give_the_same_bits(impl):
    wgrad = IMPLS[impl][2]
    aq, as_rows, as_blk = block_operand(200, None, 63)
    bq, bs_rows, bs_blk = transposed_operand(256, None, 64)
    ref = wgrad(aq, as_rows, bq, bs_rows, BF16)
    for sa, sb in [(as_rows, bs_blk), (as_blk, bs_rows), (as_blk, bs_blk)]:
        assert torch.equal(wgrad(aq, sa, bq, sb, BF16), ref)


def _grid_at(addr, rows, k):
    """A call's 128x128 scale grid read from its address as cuBLAS reads it: [cdiv(rows, 128),
    cdiv(k, 128)] with the row stride rounded up to GRID_LD; returned per row."""
    kt = -(-k // TILE)
    ld = -(-kt // LT.GRID_LD) * LT.GRID_LD
    rb = -(-rows // TILE)
    grid = _floats_at(addr, rb * ld).view(rb, ld)[:, :kt]
    return _packed_cm(expand_block_scales(grid, rows))


def _packed_cm(x):
    """x with packed column-major strides (1, rows), also where it has one column."""
    return torch.empty_strided(x.shape, (1, x.shape[0])).copy_(x)


class RawBlockCaller(RawCaller):
    """RawCaller for the wgrad kinds with one operand's scales in 128x128 blocks: the grid is
    read from its address by cuBLAS's rule (`_grid_at`), expanded to rows and run through the
    per-row stand-in."""

    def __call__(self, a, sa, b, sb, out):
        k = a.shape[1]
        if self.kind == "wgrad_a":
            sa = _grid_at(sa.data_ptr(), a.shape[0], k)
        else:
            sb = _grid_at(sb.data_ptr(), b.shape[0], k)
        strict_dense_wgrad(a, sa, b, sb, out)
        self.tensor_calls = getattr(self, "tensor_calls", 0) + 1

    def many(self, a, b, out, calls, streams=1):
        self.streams = streams
        for oa, m, ob, n, k, oo, pas, pbs in calls:
            view = lambda t, r, off, c: torch.as_strided(t, (r, c), (t.stride(0), 1),  # noqa
                                                         t.storage_offset() + off)
            A, B, O = view(a, m, oa, k), view(b, n, ob, k), view(out, m, oo, n)
            kt = -(-k // TILE)
            if self.kind == "wgrad_a":
                sa = _grid_at(pas, m, k)
                sb = _floats_at(pbs, n * kt).view(kt, n).t()
            else:
                sa = _floats_at(pas, m * kt).view(kt, m).t()
                sb = _grid_at(pbs, n, k)
            strict_dense_wgrad(A, sa, B, sb, O)
            self.raw_calls += 1


@pytest.mark.parametrize("case", CUBLAS_OFFS)
@pytest.mark.parametrize("blocks", ["a", "b", "both"])
def test_cublas_wgrad_loop_reads_block_grids(case, blocks):
    """The cuBLAS loop with block scales (CPU stand-in that reads each call's grid from its
    address by cuBLAS's rule) gives the per-row loop's bits: in the aligned layout (raw
    offsets) and the plain one (unaligned groups through padded copies); both operands in
    blocks runs a's per row."""
    offs = torch.tensor(CUBLAS_OFFS[case], dtype=torch.int32)
    for o, align in [(offs, 1), (GR.pad_offsets(offs, 16), 16)]:
        aq, as_rows, as_blk = block_operand(160, o, 65) if align == 1 else \
            transposed_operand(256, offs, 65, align)
        bq, bs_rows, bs_blk = block_operand(64, o, 66) if align == 1 else \
            transposed_operand(128, offs, 66, align)
        sa = as_blk if blocks in ("a", "both") else as_rows
        sb = bs_blk if blocks in ("b", "both") else bs_rows
        kind = "wgrad_a" if blocks == "a" else "wgrad_b"
        raw = RawBlockCaller(kind)
        dw = CB.grouped_wgrad(aq, sa, bq, sb, o, F32, dense=raw)
        ref = CB.grouped_wgrad(aq, as_rows, bq, bs_rows, o, F32, dense=strict_dense_wgrad)
        assert torch.equal(dw, ref)
        nonempty = int((o.diff(prepend=o.new_zeros(1)) > 0).sum())
        assert raw.raw_calls + getattr(raw, "tensor_calls", 0) == nonempty
        if align == 16:
            assert raw.raw_calls == nonempty
    # dense, tokens a multiple of 16 as cuBLAS needs them
    aq, as_rows, as_blk = block_operand(160, None, 67, 208)  # 2 tiles: the grid padded
    bq, bs_rows, bs_blk = block_operand(64, None, 68, 208)
    raw = RawBlockCaller("wgrad_b")
    assert torch.equal(CB.gemm_wgrad(aq, as_blk, bq, bs_blk, BF16, dense=raw),
                       CB.gemm_wgrad(aq, as_rows, bq, bs_rows, BF16, dense=strict_dense_wgrad))


def test_cublas_wgrad_block_scales_fall_back_to_rows():
    """Without a cuBLASLt caller of the block kind (the torch call, or a refused call partway
    through) the loop runs per row on expanded scales: the same bits."""
    o = torch.tensor(CUBLAS_OFFS["small_and_unaligned"], dtype=torch.int32)
    offs = GR.pad_offsets(o, 16)  # the aligned layout: every group on raw offsets
    aq, as_rows, _ = block_operand(160, o, 69, align=16)
    bq, bs_rows, bs_blk = block_operand(64, o, 70, align=16)
    ref = CB.grouped_wgrad(aq, as_rows, bq, bs_rows, offs, F32, dense=strict_dense_wgrad)
    assert torch.equal(CB.grouped_wgrad(aq, as_rows, bq, bs_blk, offs, F32,
                                        dense=strict_dense_wgrad), ref)

    class FailingBlocks(RawBlockCaller):
        def many(self, a, b, out, calls, streams=1):
            super().many(a, b, out, calls[:1])
            raise LT.CublasLtError("cuBLASLt matmul: CUBLAS_STATUS_NOT_SUPPORTED (15)")

    import unittest.mock as mock
    with mock.patch.object(CB, "dense_wgrad", strict_dense_wgrad):
        dw = CB.grouped_wgrad(aq, as_rows, bq, bs_blk, offs, F32, dense=FailingBlocks("wgrad_b"))
    assert torch.equal(dw, ref)


@pytest.mark.parametrize("offs", [[5, 3, 9, 20], [0, 0, 0], [16, 48, 250], [300],
                                  [1, 6, 22, 38, 38, 166, 294], [3, 297, 299], [129, 260, 300]])
@pytest.mark.parametrize("rb", [1, 3])
def test_pack_block_grids_kernel_matches_the_loop(offs, rb):
    """The packing kernel the CUDA path uses (interpreter here) against the host loop, and both
    against the groups' tiles: group g's tiles at [RB, ld_g] after the earlier groups' grids,
    padding slots 1."""
    o = torch.tensor(offs, dtype=torch.int32)
    bounds = CB._host_bounds(o, P)
    tiles = [-(-(e - s) // TILE) for s, e in bounds]
    T = GR.max_tiles(P, o.numel())
    s = torch.rand(rb, T) + 0.5
    buf = CB.pack_block_grids(s, o, P, tiles)
    start, t0 = 0, 0
    for t in tiles:
        ld = -(-t // LT.GRID_LD) * LT.GRID_LD
        grid = buf[start:start + rb * ld].view(rb, ld)
        assert torch.equal(grid[:, :t], s[:, t0:t0 + t]) and (grid[:, t:] == 1).all()
        start, t0 = start + rb * ld, t0 + t
    if start:
        kbuf = torch.full((start,), -1.0)
        CB._pack_grids_kernel[(o.numel(), -(-rb // CB._GRID_ROWS))](
            s, o, kbuf, o.numel(), P, rb, s.stride(0), TILE_=TILE, LD_=LT.GRID_LD,
            BLOCK_R=CB._GRID_ROWS, BLOCK_J=CB._GRID_COLS, G_BLOCK=group_block(o.numel()))
        assert torch.equal(kbuf, buf[:start])


def test_wgrad_kind_falls_back_to_the_direct_per_row_call(monkeypatch):
    """Where the block kind's probe fails, the loop runs per row through the cuBLASLt caller
    of the per-row kind (when that one's probe passes), not through torch."""
    made = []

    def fake_dense(kind, device, out_dtype):
        made.append(kind)
        return RawCaller(kind) if kind == "wgrad" else CB.dense_wgrad  # wgrad_b's probe failed

    monkeypatch.setattr(CB, "_dense", fake_dense)
    _, as_rows, _ = block_operand(160, None, 73, 208)
    _, bs_rows, bs_blk = block_operand(64, None, 74, 208)
    kind, a_s, b_s, dense = CB._wgrad_kind(as_rows, 160, bs_blk, 64, None, torch.device("cpu"),
                                           F32)
    assert made == ["wgrad_b", "wgrad"] and kind == "wgrad"
    assert isinstance(dense, RawCaller) and dense.kind == "wgrad"
    assert torch.equal(b_s, bs_rows) and a_s is as_rows
    # a callable the caller chose stays: only its scales are expanded
    kind, _, b_s, dense = CB._wgrad_kind(as_rows, 160, bs_blk, 64, strict_dense_wgrad,
                                         torch.device("cpu"), F32)
    assert (kind, dense) == ("wgrad", strict_dense_wgrad) and torch.equal(b_s, bs_rows)


def test_wgrad_block_scales_checked():
    offs = torch.tensor([100, 300], dtype=torch.int32)
    aq, as_rows, as_blk = block_operand(200, offs, 71)
    bq, bs_rows, bs_blk = block_operand(256, offs, 72)
    ops = torch.ops.fp8flow
    assert torch.equal(ops.grouped_gemm_fp8_wgrad(aq, as_blk, bq, bs_blk, offs, F32),
                       ops.grouped_gemm_fp8_wgrad(aq, as_rows, bq, bs_rows, offs, F32))
    torch.library.opcheck(ops.grouped_gemm_fp8_wgrad, (aq, as_blk, bq, bs_blk, offs, F32),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    for bad in (bs_rows[:5].contiguous(), bs_blk[:1].contiguous(), bs_rows[:, :2].contiguous()):
        with pytest.raises(Fp8Unsupported, match=r"\(256, 5\).*\(2, 5\)"):
            ops.grouped_gemm_fp8_wgrad(aq, as_rows, bq, bad, offs, F32)


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", ["random", "small_and_unaligned", "balanced"])
def test_gpu_cublas_wgrad_block_scales_give_the_same_bits(sizes):
    """On cuBLAS: the pair 1x128 x 128x128 (either operand in blocks) against 1x128 x 1x128 on
    the same scales, grouped (aligned layout, as the flow runs it) and dense: the same bits,
    and within the float64 bound."""
    if CB.gemm_backend() == "triton":
        pytest.skip("FP8FLOW_GEMM=triton")
    before = CB.gemm_backend()
    CB.set_gemm_backend("cublas")  # these groups are below `auto`'s GROUP_WORK
    try:
        _gpu_block_scales_case(sizes)
    finally:
        CB.set_gemm_backend(before)


def _gpu_block_scales_case(sizes):
    Pg, E = 4096, 8
    if sizes == "random":
        offs = _gpu_offs(Pg, E)
    elif sizes == "balanced":
        offs = torch.arange(1, E + 1, dtype=torch.int32) * (Pg // E)
    else:
        offs = torch.tensor([1, 17, 20, 56, 56, 95, 130, 3000], dtype=torch.int32)
    pa = GR.pad_offsets(offs, 16)
    dy, x = rnd((Pg, 1024), 73), rnd((Pg, 768), 74)
    qa, sa = Q.quantize_1x128_ref(dy)
    qb, sb = Q.quantize_1x128_ref(x)
    cu = lambda *ts: [t.cuda() for t in ts]  # noqa: E731
    ops = torch.ops.fp8flow
    aT, saT = ops.scaling_aware_transpose(*cu(qa, sa, offs), 16)
    bT, sbT = ops.scaling_aware_transpose(*cu(qb, sb, offs), 16)
    pa = pa.cuda()
    sa_blk, sb_blk = saT[::TILE].contiguous(), sbT[::TILE].contiguous()
    assert torch.equal(expand_block_scales(sb_blk, 768), sbT)
    for kind in ("wgrad_a", "wgrad_b"):
        assert LT.probe(0, kind, F32) is None, LT.probe(0, kind, F32)
    for out_dtype in (F32, BF16):
        ref = ops.grouped_gemm_fp8_wgrad(aT, saT, bT, sbT, pa, out_dtype)
        for a_s, b_s in [(saT, sb_blk), (sa_blk, sbT), (sa_blk, sb_blk)]:
            assert torch.equal(ops.grouped_gemm_fp8_wgrad(aT, a_s, bT, b_s, pa, out_dtype), ref)
    a64, b64 = deq_rows(aT.cpu(), saT.cpu(), pa.cpu()), deq_rows(bT.cpu(), sbT.cpu(), pa.cpu())
    check_wgrad_gpu((ref,), a64, b64, pa.cpu())
    # dense: 2000 tokens (16 tiles, a partial last one) and 1040 (9 tiles: the grid padded)
    for n in (2000, 1040):
        qa, sa = Q.quantize_1x128_ref(dy[:n])
        qb, sb = Q.quantize_1x128_ref(x[:n])
        aT, saT = ops.scaling_aware_transpose(*cu(qa, sa), None)
        bT, sbT = ops.scaling_aware_transpose(*cu(qb, sb), None)
        ref = ops.gemm_fp8_wgrad(aT, saT, bT, sbT, F32)
        assert torch.equal(ops.gemm_fp8_wgrad(aT, saT, bT, sbT[::TILE].contiguous(), F32), ref)
        assert torch.equal(ops.gemm_fp8_wgrad(aT, saT[::TILE].contiguous(), bT, sbT, F32), ref)
