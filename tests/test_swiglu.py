"""SwiGLU (+probs) fused with 1x128 quantization, forward and backward: float64 bounds,
Triton == torch bytes wherever their fp32 values agree, the NaN rule, bad input, GPU."""

import pytest
import torch

from fp8flow_compile import Fp8Unsupported
from fp8flow_compile.kernels import swiglu as S
from fp8flow_compile.kernels.quantize import dequantize_1x128_ref, quantize_1x128_ref
from fp8flow_compile.recipe import TILE

FP8 = torch.float8_e4m3fn
# Shapes: h [P, 2N], N the SwiGLU width (the paper's I).
# E4M3 keeps 3 mantissa bits: round-to-nearest moves a normal value by at most 2^-4 of itself.
E4M3_REL = 2.0**-4
# Below 2^-6 (the smallest normal) the grid step is 2^-9, so the absolute error is <= 2^-10.
E4M3_ABS_SUB = 2.0**-10
# fp32 unit roundoff.
U = 2.0**-24
# sigmoid(g) for g < -87 is an fp32 subnormal that the GPU may flush to zero: an absolute error
# below 2^-126 in sigmoid, i.e. below 2^-120 * (1 + |g|) times the other factors of a term.
UNDERFLOW = 2.0**-120


def fp32_rel(g64: torch.Tensor) -> torch.Tensor:
    """Relative error bound of one fp32 evaluation of the kernels' silu / silu' expressions.

    32 ulps cover the handful of roundings (exp, add, div, the products; the GPU's approximate
    ex2 and div are within 2 ulps each), and |g| ulps cover the GPU evaluating exp(x) as
    ex2(x * log2 e), whose rounded argument costs |x| * 2^-24 relative.
    """
    return U * (g64.abs() + 32)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def heavy(shape, g):
    return torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))


def make_h(P, N, seed, kind, dtype=torch.bfloat16):
    g = gen(seed)
    up = heavy((P, N), g)
    if kind == "heavy":
        gate = heavy((P, N), g)
    elif kind == "large":  # saturated sigmoid both ways: exp(-g) overflows, or down to 2^-144
        gate = 3 * torch.randn(P, N, generator=g)
        mag = torch.tensor([30.0, 100.0])[torch.randint(0, 2, (P, N), generator=g)]
        sign = torch.randint(0, 2, (P, N), generator=g) * 2 - 1
        pick = torch.rand(P, N, generator=g) < 0.5
        gate = torch.where(pick, sign * mag * (1 + 0.1 * torch.rand(P, N, generator=g)), gate)
        gate[:, :4] = torch.tensor([30.0, -30.0, 100.0, -100.0])
    elif kind == "tiny":  # silu(g) ~ g / 2: values ~2^-80, scales far below 1
        gate = torch.randn(P, N, generator=g) * 2.0**-40
        up = up * 2.0**-40
    else:
        raise ValueError(kind)
    return torch.cat([gate, up], 1).to(dtype)


def make_probs(P, seed, pad=0):
    p = torch.rand(P, generator=gen(seed)) * 0.9 + 0.05
    if pad:
        p[-pad:] = 0.0  # rows a permute+pad added: zero weight
    return p


def make_dy(P, N, seed, dtype=torch.float32):
    return heavy((P, N), gen(seed)).to(dtype)


def backward_inputs(P, N, seed, kind, dtype, with_probs, pad):
    """(h, probs or None, dy) of a backward case, from seeds seed, seed + 1 and seed + 2."""
    h = make_h(P, N, seed, kind, dtype)
    probs = make_probs(P, seed + 1, pad=pad) if with_probs else None
    return h, probs, make_dy(P, N, seed + 2, dtype)


def same_bytes(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def scales_expanded(s, C):
    return s.double().repeat_interleave(TILE, 1)[:, :C]


# ---------------------------------------------------------------- float64 references


def forward64(h, probs):
    """(y, slack): exact SwiGLU in float64 and the fp32 evaluation error bound per element."""
    N = h.shape[1] // 2
    g, u = h[:, :N].double(), h[:, N:].double()
    p = torch.ones(h.shape[0], 1, dtype=torch.float64) if probs is None else probs.double()[:, None]
    sig = torch.sigmoid(g)
    y = g * sig * u * p
    slack = fp32_rel(g) * y.abs() + UNDERFLOW * (1 + g.abs()) * (u * p).abs()
    return y, slack


def backward64(dy, h, probs):
    """(dh, dprobs, dh_slack, dprobs_slack): float64 autograd of the reference, and the fp32
    evaluation error bounds."""
    N = h.shape[1] // 2
    h64 = h.double().requires_grad_()
    p64 = None if probs is None else probs.double().requires_grad_()
    g, u = h64[:, :N], h64[:, N:]
    y = torch.nn.functional.silu(g) * u
    if p64 is not None:
        y = y * p64[:, None]
    y.backward(dy.double())
    g, u, d = g.detach(), u.detach(), dy.double()
    p = torch.ones(h.shape[0], 1, dtype=torch.float64) if probs is None else probs.double()[:, None]
    sig, sig_c = torch.sigmoid(g), torch.sigmoid(-g)
    # Bounds scale with the magnitudes of the terms, not of the result: silu'(g) = sig * (1 +
    # g * (1 - sig)) cancels near g = -1.28, where only an absolute bound holds.
    gate_mag = (d * u * p).abs() * sig * (1 + g.abs() * sig_c)
    gate_slack = fp32_rel(g) * gate_mag + UNDERFLOW * (1 + g.abs()) * (d * u * p).abs()
    up_slack = fp32_rel(g) * (d * g * sig * p).abs() + UNDERFLOW * (1 + g.abs()) * (d * p).abs()
    dh_slack = torch.cat([gate_slack, up_slack], 1)
    dprobs = torch.empty(0, dtype=torch.float64) if p64 is None else p64.grad
    # Any order of an n-term fp32 sum is within (n - 1) * u * sum|t| of the exact sum; each term
    # adds its own evaluation error.
    terms = (d * g * sig * u).abs()
    dp_slack = ((U * N + fp32_rel(g)) * terms).sum(1) + (UNDERFLOW * (1 + g.abs()) * (d * u).abs()
                                                         ).sum(1)
    return h64.grad, dprobs, dh_slack, dp_slack


def check_fp8_bound(q, s, x64, slack):
    """Dequantized q within the E4M3 bound of the exact x64.

    The kernel quantizes its fp32 value v, |v - x| <= slack. The scale rule gives |v| / s <= 448,
    so nothing saturates, and round-to-nearest gives |deq - v| <= 2^-4 |v| + 2^-10 s; with
    |v| <= |x| + slack: |deq - x| <= 2^-4 |x| + 2^-10 s + (1 + 2^-4) slack.
    """
    deq = dequantize_1x128_ref(q, s).double()
    bound = (E4M3_REL * x64.abs() + E4M3_ABS_SUB * scales_expanded(s, x64.shape[1])
             + (1 + E4M3_REL) * slack)
    fin = torch.isfinite(x64)
    assert torch.equal(deq.isnan(), ~fin)
    err = (deq - x64).abs()
    assert (err[fin] <= bound[fin]).all(), (err - bound)[fin].max()
    # The bound must be a real test: most of the values are far from zero.
    assert (deq[fin] != 0).float().mean() > 0.3


def check_kernel_vs_torch(q, s, v, v_ref, slack):
    """q, s: the kernel's output; v: the fp32 values it quantized; v_ref: torch's fp32 values.

    1. The kernel's quantization of its own fp32 values is the recipe bit for bit.
    2. Its fp32 values differ from torch's only by the two evaluations' error bounds (exp is
       not correctly rounded in either: numpy's float32 exp, which the interpreter runs, is up to
       2 ulps from torch's; the GPU uses ex2.approx and may fuse a*b+c into an FMA).
    3. Hence: bytes and scale equal to quantizing torch's values in every 1x128 tile whose fp32
       values agree; elsewhere, with the same scale, E4M3 codes at most one step apart (the
       two values straddle a rounding midpoint), and with a different scale (amax straddles a
       power-of-two boundary) each side within its half-step of nearly the same number.
    """
    q1, s1 = quantize_1x128_ref(v)
    assert same_bytes(q, q1) and torch.equal(s, s1)

    nan, fin = v.isnan(), torch.isfinite(v)
    assert torch.equal(nan, v_ref.isnan()) and torch.equal(fin, torch.isfinite(v_ref))
    assert torch.equal(v[~fin & ~nan], v_ref[~fin & ~nan])  # the same infinities
    diff = torch.where(fin, v.double() - v_ref.double(), 0.0).abs()
    assert (diff <= 2 * slack)[fin].all()

    q2, s2 = quantize_1x128_ref(v_ref)
    P, C = v.shape
    T = C // TILE
    tile_same = ((v == v_ref) | nan).reshape(P, T, TILE).all(-1)
    bytes_same = (q.view(torch.uint8) == q2.view(torch.uint8)).reshape(P, T, TILE).all(-1)
    assert (bytes_same & (s == s2))[tile_same].all()

    b1, b2 = q.view(torch.uint8).long(), q2.view(torch.uint8).long()
    same_scale = scales_expanded(s == s2, C).bool()
    code_step = ((b1 & 0x7F) - (b2 & 0x7F)).abs()
    sign_same = (b1 >> 7) == (b2 >> 7)
    assert ((code_step <= 1) & sign_same)[same_scale].all()
    d1, d2 = dequantize_1x128_ref(q, s).double(), dequantize_1x128_ref(q2, s2).double()
    bound = (E4M3_REL * (v.double().abs() + v_ref.double().abs())
             + E4M3_ABS_SUB * (scales_expanded(s, C) + scales_expanded(s2, C)) + diff)
    assert ((d1 - d2).abs() <= bound)[fin].all()


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("kind", ["heavy", "large", "tiny"])
@pytest.mark.parametrize("with_probs", [True, False])
def test_swiglu_quant_vs_float64(impl, kind, with_probs):
    P, N = 37, 256
    h = make_h(P, N, 1, kind)
    probs = make_probs(P, 2, pad=3) if with_probs else None
    fn = S.swiglu_quant_ref if impl == "ref" else S.swiglu_quant_triton
    q, s = fn(h, probs)
    assert q.dtype == FP8 and q.shape == (P, N) and s.shape == (P, N // TILE)
    y64, slack = forward64(h, probs)
    check_fp8_bound(q, s, y64, slack)
    if with_probs:  # zero-weight pad rows quantize to exact zeros with scale 1
        assert (dequantize_1x128_ref(q, s)[-3:] == 0).all() and (s[-3:] == 1).all()


@pytest.mark.parametrize("kind, dtype, probs_dtype", [
    ("heavy", torch.bfloat16, torch.float32),
    ("large", torch.float32, torch.bfloat16),
    ("tiny", torch.float32, None),
])
def test_swiglu_quant_triton_matches_torch_bytes(kind, dtype, probs_dtype):
    P, N = 45, 384
    h = make_h(P, N, 3, kind, dtype)
    probs = None if probs_dtype is None else make_probs(P, 4, pad=5).to(probs_dtype)
    v = torch.empty(P, N)
    q, s = S.swiglu_quant_triton(h, probs, value_out=v)
    check_kernel_vs_torch(q, s, v, S.swiglu_ref(h, probs), forward64(h, probs)[1])
    # The launcher's debugging output does not change what it computes.
    q0, s0 = S.swiglu_quant_triton(h, probs)
    assert same_bytes(q, q0) and torch.equal(s, s0)


def test_saturated_sigmoid_gives_signed_zero_not_nan():
    N = TILE
    gate = torch.tensor([-1e30, -1e4, -200.0, -104.0, -89.0, -88.0, 1e4, 1e30])
    h = torch.ones(1, 2 * N)
    h[0, :gate.numel()] = gate
    h[0, N:] = 1.5
    p = torch.tensor([0.5])
    v = torch.empty(1, N)
    q, s = S.swiglu_quant_triton(h, p, value_out=v)
    for y in (v[0], S.swiglu_ref(h, p)[0]):
        # once exp(-g) overflows (g < -88.72) sigmoid is 0 and silu(g) is -0, before that a
        # tiny negative number; for large positive g silu(g) = g exactly.
        assert torch.equal(y[:5].view(torch.int32), torch.full((5,), -2**31, dtype=torch.int32))
        assert (y[5] < 0) & (y[5] > -1e-35)
        assert torch.equal(y[6:8], gate[6:] * 0.75)
        assert torch.isfinite(y).all()
    q2, s2 = S.swiglu_quant_ref(h, p)
    assert same_bytes(q, q2) and torch.equal(s, s2)
    assert (q.view(torch.uint8)[0, :6] == 0x80).all()  # -0 and tiny negatives: E4M3 -0
    for fn in (S.swiglu_quant_backward_ref, S.swiglu_quant_backward_triton):
        dh_q, dh_s, dp = fn(torch.ones(1, N), h, p)
        assert not dequantize_1x128_ref(dh_q, dh_s).isnan().any() and torch.isfinite(dp).all()


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("kind", ["heavy", "large", "tiny"])
@pytest.mark.parametrize("with_probs", [True, False])
def test_swiglu_quant_backward_vs_float64(impl, kind, with_probs):
    P, N = 37, 256
    h = make_h(P, N, 5, kind)
    probs = make_probs(P, 6, pad=3) if with_probs else None
    dy = make_dy(P, N, 7)
    fn = S.swiglu_quant_backward_ref if impl == "ref" else S.swiglu_quant_backward_triton
    q, s, dp = fn(dy, h, probs)
    assert q.dtype == FP8 and q.shape == (P, 2 * N) and s.shape == (P, 2 * N // TILE)
    dh64, dp64, dh_slack, dp_slack = backward64(dy, h, probs)
    check_fp8_bound(q, s, dh64, dh_slack)
    if with_probs:
        assert dp.dtype == torch.float32 and dp.shape == (P,)
        assert ((dp.double() - dp64).abs() <= dp_slack).all()
        # Zero-weight pad rows get zero dh but still a gradient for their weight.
        assert (dequantize_1x128_ref(q, s)[-3:] == 0).all()
        assert (dp[-3:] != 0).all()
    else:
        assert dp.shape == (0,)


# Backward kernel cases, the same on the interpreter and on the GPU.
BACKWARD_CASES = [("heavy", torch.bfloat16, True), ("large", torch.float32, True),
                  ("tiny", torch.bfloat16, False)]


@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_swiglu_quant_backward_triton_matches_torch_bytes(kind, dtype, with_probs):
    P, N = 45, 384
    h, probs, dy = backward_inputs(P, N, 8, kind, dtype, with_probs, pad=5)
    v = torch.empty(P, 2 * N)
    q, s, dp = S.swiglu_quant_backward_triton(dy, h, probs, value_out=v)
    dh_ref, dp_ref = S.swiglu_backward_ref(dy, h, probs)
    _, _, dh_slack, dp_slack = backward64(dy, h, probs)
    check_kernel_vs_torch(q, s, v, dh_ref, dh_slack)
    # dprobs is an fp32 sum in a different order than torch's: both are within dp_slack of
    # the exact value.
    if with_probs:
        assert ((dp.double() - dp_ref.double()).abs() <= 2 * dp_slack).all()
    else:
        assert dp.shape == dp_ref.shape == (0,)


# ---------------------------------------------------------------- h saved in FP8


def check_save(fn, h, probs):
    """swiglu_quant_save = swiglu_quant's (q, s) and quantize_1x128 of h, bit for bit."""
    if fn is S.swiglu_quant_triton:
        (q, s, hq, hs), (q0, s0) = fn(h, probs, save_h=True), fn(h, probs)
    else:
        (q, s, hq, hs), (q0, s0) = fn(h, probs), S.swiglu_quant_ref(h, probs)
    assert same_bytes(q, q0) and torch.equal(s, s0)
    hq1, hs1 = quantize_1x128_ref(h.float())
    assert hq.shape == h.shape and hs.shape == (h.shape[0], h.shape[1] // TILE)
    assert same_bytes(hq, hq1) and torch.equal(hs, hs1)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("kind, dtype", [("heavy", torch.bfloat16), ("large", torch.float32),
                                         ("tiny", torch.bfloat16)])
def test_swiglu_quant_save_is_swiglu_quant_plus_quantized_h(impl, kind, dtype):
    P, N = 45, 384
    h = make_h(P, N, 40, kind, dtype)
    probs = make_probs(P, 41, pad=5)
    check_save(S.swiglu_quant_save_ref if impl == "ref" else S.swiglu_quant_triton, h, probs)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_backward_from_fp8_h_is_the_backward_of_its_value(impl, kind, dtype, with_probs):
    """Decoding E4M3 and multiplying by a power-of-two scale is exact in fp32, so the backward
    read from the FP8 copy of h equals, bit for bit, the backward of the dequantized h (fp32);
    the float64 bound then holds against that h. What the copy costs is h's own rounding, at
    most 2^-4 relative per element (checked in the layer tests)."""
    P, N = 45, 384
    h, probs, dy = backward_inputs(P, N, 42, kind, dtype, with_probs, pad=5)
    hq, hs = quantize_1x128_ref(h.float())
    h_deq = dequantize_1x128_ref(hq, hs, None, torch.float32)
    if impl == "ref":
        got = S.swiglu_quant_backward_ref(dy, hq, probs, hs)
        want = S.swiglu_quant_backward_ref(dy, h_deq, probs)
    else:
        v, v0 = torch.empty(P, 2 * N), torch.empty(P, 2 * N)
        got = S.swiglu_quant_backward_triton(dy, hq, probs, hs, value_out=v)
        want = S.swiglu_quant_backward_triton(dy, h_deq, probs, value_out=v0)
        assert torch.equal(v, v0)
    assert same_bytes(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    dh64, _, dh_slack, _ = backward64(dy, h_deq, probs)
    check_fp8_bound(got[0], got[1], dh64, dh_slack)


# ---------------------------------------------------------------- NaN rule


# numpy warns on -inf * 0 inside the interpreter; that NaN is the point of the test.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_become_nan_in_place():
    P, N = 6, 256
    h = make_h(P, N, 11, "heavy", torch.float32)
    dy = make_dy(P, N, 12)
    probs = make_probs(P, 13)
    h[0, 5] = float("nan")  # gate
    h[1, N + 130] = float("inf")  # up
    h[2, 200] = -float("inf")  # gate: silu(-inf) = -inf * 0
    dy[3, 7] = float("nan")
    y64, slack = forward64(h, probs)
    dh64, dp64, dh_slack, _ = backward64(dy, h, probs)
    assert (~torch.isfinite(y64)).sum() == 3 and (~torch.isfinite(dh64)).sum() > 3

    v = torch.empty(P, N)
    q, s = S.swiglu_quant_triton(h, probs, value_out=v)
    check_fp8_bound(q, s, y64, slack)  # NaN exactly where float64 is not finite
    check_kernel_vs_torch(q, s, v, S.swiglu_ref(h, probs), slack)
    # The scales come from the finite values: the same as with the bad entries replaced by 0.
    y_clean = torch.where(torch.isfinite(y64), S.swiglu_ref(h, probs), 0.0)
    assert torch.equal(s, quantize_1x128_ref(y_clean)[1])

    vb = torch.empty(P, 2 * N)
    q, s, dp = S.swiglu_quant_backward_triton(dy, h, probs, value_out=vb)
    check_fp8_bound(q, s, dh64, dh_slack)
    dh_ref, dp_ref = S.swiglu_backward_ref(dy, h, probs)
    check_kernel_vs_torch(q, s, vb, dh_ref, dh_slack)
    # dprobs is not quantized: an infinite gradient stays infinite, NaN stays NaN.
    assert torch.equal(dp.isnan(), dp64.isnan()) and torch.equal(dp.isinf(), dp64.isinf())
    assert dp[[0, 2, 3]].isnan().all() and dp[1].isinf()


# ---------------------------------------------------------------- unfused ops, registration


def test_unfused_ops_vs_float64():
    P, N = 20, 256
    h = make_h(P, N, 14, "heavy")
    probs = make_probs(P, 15, pad=2)
    dy = make_dy(P, N, 16, torch.bfloat16)
    y = torch.ops.fp8flow.swiglu(h, probs)
    assert y.dtype == torch.bfloat16 and torch.equal(y, S.swiglu_ref(h, probs).bfloat16())
    y64, slack = forward64(h, probs)
    # One bf16 rounding (8 significant bits): at most 2^-8 relative, plus the fp32 slack.
    assert ((y.double() - y64).abs() <= 2.0**-8 * y64.abs() + 2 * slack).all()
    dh, dp = torch.ops.fp8flow.swiglu_backward(dy, h, probs)
    dh64, dp64, dh_slack, dp_slack = backward64(dy, h, probs)
    assert dh.dtype == torch.bfloat16 and dh.shape == h.shape and dp.dtype == torch.float32
    assert ((dh.double() - dh64).abs() <= 2.0**-8 * dh64.abs() + 2 * dh_slack).all()
    assert ((dp.double() - dp64).abs() <= dp_slack).all()
    dh, dp = torch.ops.fp8flow.swiglu_backward(dy, h, None)
    assert dp.shape == (0,) and torch.equal(dh, S.swiglu_backward_ref(dy, h)[0].bfloat16())
    # No tiles, so any even width: I = 48.
    h, dy = h[:, 104:200].contiguous(), dy[:, :48].contiguous()
    y64, slack = forward64(h, probs)
    y = torch.ops.fp8flow.swiglu(h, probs)
    assert ((y.double() - y64).abs() <= 2.0**-8 * y64.abs() + 2 * slack).all()
    dh64, _, dh_slack, _ = backward64(dy, h, probs)
    dh = torch.ops.fp8flow.swiglu_backward(dy, h, probs)[0]
    assert ((dh.double() - dh64).abs() <= 2.0**-8 * dh64.abs() + 2 * dh_slack).all()


def test_custom_ops_dispatch_and_fake():
    P, N = 16, 256
    h = make_h(P, N, 17, "heavy")
    probs = make_probs(P, 18)
    dy = make_dy(P, N, 19)
    q, s = torch.ops.fp8flow.swiglu_quant(h, probs)
    q2, s2 = S.swiglu_quant_ref(h, probs)
    assert same_bytes(q, q2) and torch.equal(s, s2)
    out = torch.ops.fp8flow.swiglu_quant_backward(dy, h, probs)
    ref = S.swiglu_quant_backward_ref(dy, h, probs)
    assert same_bytes(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(out[2], ref[2])
    # test_schema compares outputs with arithmetic torch lacks for float8 on CPU; the fake
    # functions are what compile relies on.
    fake = ("test_faketensor", "test_autograd_registration")
    for p in (probs, None):
        torch.library.opcheck(torch.ops.fp8flow.swiglu_quant.default, (h, p), test_utils=fake)
        torch.library.opcheck(torch.ops.fp8flow.swiglu_quant_backward.default, (dy, h, p),
                              test_utils=fake)
        torch.library.opcheck(torch.ops.fp8flow.swiglu_quant_save.default, (h, p),
                              test_utils=fake)
        hq, hs = quantize_1x128_ref(h.float())
        torch.library.opcheck(torch.ops.fp8flow.swiglu_quant_backward.default, (dy, hq, p, hs),
                              test_utils=fake)
        torch.library.opcheck(torch.ops.fp8flow.swiglu.default, (h, p))
        torch.library.opcheck(torch.ops.fp8flow.swiglu_backward.default, (dy, h, p))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fwd_bwd(h, probs, dy):
        q, s = torch.ops.fp8flow.swiglu_quant(h, probs)
        return q, s, *torch.ops.fp8flow.swiglu_quant_backward(dy, h, probs)

    got = fwd_bwd(h, probs, dy)
    assert same_bytes(got[0], q2) and torch.equal(got[1], s2)
    assert same_bytes(got[2], ref[0]) and torch.equal(got[3], ref[1])
    assert torch.equal(got[4], ref[2])


def _h(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 200)), "I = h.shape.* = 100 must be a multiple"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 257)), "must be even"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(512)), "2-D"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 256, dtype=torch.float64)), "dtype"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 256).to(FP8)), "dtype"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 512)[:, ::2]), "contiguous"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 256), torch.rand(5)), "probs must have shape"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 256), torch.ones(4, dtype=torch.int32)),
     "probs must have dtype"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 96), _h(4, 192)), "multiple of 128"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 256), _h(4, 256)),
     r"dy must have shape \(4, 128\)"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(128, 4).t(), _h(4, 256)), "contiguous"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 128), _h(4, 256).to(FP8)),
     "needs its 1x128 scales"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 128), _h(4, 256).to(FP8), None,
                                                     torch.ones(4, 1)), r"h_scales must be"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 128), _h(4, 256), None,
                                                     torch.ones(4, 2)), "only for an FP8 h"),
    (lambda: torch.ops.fp8flow.swiglu_quant_save(_h(4, 200)), "must be a multiple"),
    (lambda: torch.ops.fp8flow.swiglu(_h(4, 201)), "must be even"),
    (lambda: torch.ops.fp8flow.swiglu_backward(_h(4, 96), _h(4, 96)), r"dy must have shape"),
])
def test_bad_input_names_the_constraint(bad, match):
    with pytest.raises(Fp8Unsupported, match=match):
        bad()


# ---------------------------------------------------------------- GPU (compiled Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, with_probs", [
    ("heavy", torch.bfloat16, True), ("large", torch.bfloat16, True),
    ("tiny", torch.float32, False),
])
def test_gpu_swiglu_quant_matches_reference(kind, dtype, with_probs):
    P, N = 1000, 1024
    h = make_h(P, N, 20, kind, dtype)
    probs = make_probs(P, 21, pad=24) if with_probs else None
    pc = None if probs is None else probs.cuda()
    q, s = torch.ops.fp8flow.swiglu_quant(h.cuda(), pc)
    v = torch.empty(P, N, device="cuda")
    qv, sv = S.swiglu_quant_triton(h.cuda(), pc, value_out=v)
    assert same_bytes(q, qv) and torch.equal(s, sv)
    y64, slack = forward64(h, probs)
    check_fp8_bound(q.cpu(), s.cpu(), y64, slack)
    check_kernel_vs_torch(q.cpu(), s.cpu(), v.cpu(), S.swiglu_ref(h, probs), slack)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_gpu_swiglu_quant_backward_matches_reference(kind, dtype, with_probs):
    P, N = 1000, 1024
    h, probs, dy = backward_inputs(P, N, 22, kind, dtype, with_probs, pad=24)
    pc = None if probs is None else probs.cuda()
    q, s, dp = torch.ops.fp8flow.swiglu_quant_backward(dy.cuda(), h.cuda(), pc)
    v = torch.empty(P, 2 * N, device="cuda")
    qv, sv, dpv = S.swiglu_quant_backward_triton(dy.cuda(), h.cuda(), pc, value_out=v)
    # One program per row block sums dprobs in a fixed order: reruns are bit-identical.
    assert same_bytes(q, qv) and torch.equal(s, sv) and torch.equal(dp, dpv)
    dh64, dp64, dh_slack, dp_slack = backward64(dy, h, probs)
    check_fp8_bound(q.cpu(), s.cpu(), dh64, dh_slack)
    dh_ref, dp_ref = S.swiglu_backward_ref(dy, h, probs)
    check_kernel_vs_torch(q.cpu(), s.cpu(), v.cpu(), dh_ref, dh_slack)
    if with_probs:
        assert ((dp.cpu().double() - dp64).abs() <= dp_slack).all()
    else:
        assert dp.shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_gpu_fp8_h_save_and_backward(kind, dtype, with_probs):
    P, N = 1000, 1024
    h, probs, dy = backward_inputs(P, N, 45, kind, dtype, with_probs, pad=24)
    pc = None if probs is None else probs.cuda()
    q, s, hq, hs = torch.ops.fp8flow.swiglu_quant_save(h.cuda(), pc)
    q0, s0 = torch.ops.fp8flow.swiglu_quant(h.cuda(), pc)
    assert same_bytes(q, q0) and torch.equal(s, s0)
    hq1, hs1 = quantize_1x128_ref(h.float())
    assert same_bytes(hq.cpu(), hq1) and torch.equal(hs.cpu(), hs1)
    h_deq = dequantize_1x128_ref(hq1, hs1, None, torch.float32)
    got = torch.ops.fp8flow.swiglu_quant_backward(dy.cuda(), hq, pc, hs)
    want = torch.ops.fp8flow.swiglu_quant_backward(dy.cuda(), h_deq.cuda(), pc)
    assert same_bytes(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    dh64, _, dh_slack, _ = backward64(dy, h_deq, probs)
    check_fp8_bound(got[0].cpu(), got[1].cpu(), dh64, dh_slack)


@pytest.mark.gpu
def test_gpu_unfused_ops_match_cpu():
    P, N = 300, 512
    h = make_h(P, N, 25, "heavy")
    probs = make_probs(P, 26, pad=4)
    dy = make_dy(P, N, 27, torch.bfloat16)
    y = torch.ops.fp8flow.swiglu(h.cuda(), probs.cuda()).cpu()
    y64, slack = forward64(h, probs)
    assert ((y.double() - y64).abs() <= 2.0**-8 * y64.abs() + 2 * slack).all()
    dh, dp = torch.ops.fp8flow.swiglu_backward(dy.cuda(), h.cuda(), probs.cuda())
    dh64, dp64, dh_slack, dp_slack = backward64(dy, h, probs)
    assert ((dh.cpu().double() - dh64).abs() <= 2.0**-8 * dh64.abs() + 2 * dh_slack).all()
    assert ((dp.cpu().double() - dp64).abs() <= dp_slack).all()


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_swiglu_quant_backward_chunks_give_the_same_bytes(chunk):
    # I = 5 tiles: chunks of 1 (five programs per row block), 2 and 3 (the last chunk runs past
    # I) against one chunk of all five. dh is computed per element, so its bytes are the same;
    # dprobs is summed per chunk and then over chunks, another fp32 order: within dp_slack of
    # the exact value, as the one-chunk sum is.
    P, N = 21, 5 * TILE
    for fp8_h in (False, True):
        h, probs, dy = backward_inputs(P, N, 9, "heavy", torch.bfloat16, True, pad=2)
        hs = None
        if fp8_h:
            h, hs = S.swiglu_quant_save_ref(h, probs)[2:]
        q1, s1, dp1 = S.swiglu_quant_backward_triton(dy, h, probs, hs, chunk=5)
        qc, sc, dpc = S.swiglu_quant_backward_triton(dy, h, probs, hs, chunk=chunk)
        assert torch.equal(qc.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(sc, s1)
        _, dp64, _, dp_slack = backward64(dy, S._h_value(h, hs), probs)
        assert ((dpc.double() - dp64).abs() <= dp_slack).all()
        assert ((dp1.double() - dp64).abs() <= dp_slack).all()
        # without probs: no dprobs, the same dh bytes
        qn, sn, dpn = S.swiglu_quant_backward_triton(dy, h, None, hs, chunk=chunk)
        q0, s0, _ = S.swiglu_quant_backward_triton(dy, h, None, hs, chunk=5)
        assert torch.equal(qn.view(torch.uint8), q0.view(torch.uint8)) and dpn.shape == (0,)


@pytest.mark.gpu
def test_gpu_non_finite_inputs_quantize_by_the_recipe():
    """NaN and +-Inf in gate, up, dy and a whole NaN tile: the compiled kernels' quantization of
    their own fp32 values is the reference's bit for bit (NaN bytes, scales from the finite
    values only, scale 1 for a tile with nothing finite), forward and backward."""
    P, N = 300, 512
    h, probs, dy = backward_inputs(P, N, 61, "heavy", torch.float32, True, pad=4)
    h[3, 5] = float("nan")            # gate
    h[7, N + 9] = float("inf")        # up
    h[130, 200] = -float("inf")       # gate
    h[11, N + 300] = -float("nan")    # up
    h[20, :TILE] = float("nan")       # a gate tile with nothing finite
    dy[40, 7] = float("inf")
    dy[41, 130] = float("nan")
    hc, pc, dyc = h.cuda(), probs.cuda(), dy.cuda()
    v = torch.empty(P, N, device="cuda")
    q, s = S.swiglu_quant_triton(hc, pc, value_out=v)
    v = v.cpu()
    assert v.isnan().any() and not torch.isfinite(v).all()
    q1, s1 = quantize_1x128_ref(v)
    assert same_bytes(q.cpu(), q1) and torch.equal(s.cpu(), s1)
    assert s1[20, 0] == 1.0  # the all-NaN tile
    vb = torch.empty(P, 2 * N, device="cuda")
    qb, sb, _ = S.swiglu_quant_backward_triton(dyc, hc, pc, value_out=vb)
    vb = vb.cpu()
    assert not torch.isfinite(vb).all()
    qb1, sb1 = quantize_1x128_ref(vb)
    assert same_bytes(qb.cpu(), qb1) and torch.equal(sb.cpu(), sb1)


# ---------------------------------------------------------------- gate and up as two tensors


def halves(h):
    N = h.shape[1] // 2
    return h[:, :N].contiguous(), h[:, N:].contiguous()


@pytest.mark.parametrize("impl", ["ref", "triton", "op"])
@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_gate_and_up_as_two_tensors_give_the_bytes_of_one_h(impl, kind, dtype, with_probs):
    """Each element's SwiGLU reads one gate and one up value and no tile straddles the two, so
    passing them as two tensors (up=) gives the one-tensor form's bytes, forward, forward with
    h saved, and backward from high-precision or saved FP8 h; split puts d_gate and d_up in two
    planes of the same bytes. The one-tensor form is checked against float64 above; the bound
    is checked here again on the planes."""
    P, N = 45, 384
    h, probs, dy = backward_inputs(P, N, 70, kind, dtype, with_probs, pad=5)
    gate, up = halves(h)
    if impl == "ref":
        fwd, save = S.swiglu_quant_ref, S.swiglu_quant_save_ref
        bwd = S.swiglu_quant_backward_ref
    elif impl == "triton":
        fwd = S.swiglu_quant_triton
        def save(h, p, up=None):
            return S.swiglu_quant_triton(h, p, save_h=True, up=up)
        def bwd(dy, h, p, hs=None, up=None, split=False):
            return S.swiglu_quant_backward_triton(dy, h, p, hs, up=up, split=split)
    else:
        ops = torch.ops.fp8flow
        fwd, save, bwd = ops.swiglu_quant, ops.swiglu_quant_save, ops.swiglu_quant_backward
    q0, s0 = fwd(h, probs)
    q1, s1 = fwd(gate, probs, up=up)
    assert same_bytes(q0, q1) and torch.equal(s0, s1)
    saved0, saved1 = save(h, probs), save(gate, probs, up=up)
    for a, b in zip(saved0, saved1):
        assert a.shape == b.shape
        assert same_bytes(a, b) if a.dtype == FP8 else torch.equal(a, b)
    hq, hs = saved1[2:]
    dh64, dp64, dh_slack, _ = backward64(dy, h, probs)
    for args in ((h, probs), (hq, probs, hs)):
        dq0, ds0, dp0 = bwd(dy, *args)
        for kw in (dict(split=True), dict(up=up, split=True), dict(up=up)):
            if "up" in kw and len(args) == 3:
                continue  # the saved copy is one [P, 2I] tensor
            a = (gate, probs) if "up" in kw else args
            dq, ds, dp = bwd(dy, *a, **kw)
            if kw.get("split"):
                assert dq.shape == (2, P, N) and ds.shape == (2, P, N // TILE)
                assert dq.is_contiguous() and ds.is_contiguous()
                dq, ds = torch.cat([dq[0], dq[1]], 1), torch.cat([ds[0], ds[1]], 1)
            assert same_bytes(dq, dq0) and torch.equal(ds, ds0) and torch.equal(dp, dp0)
    dq, ds, _ = bwd(dy, gate, probs, up=up, split=True)
    for i in (0, 1):
        check_fp8_bound(dq[i], ds[i], dh64[:, i * N:(i + 1) * N],
                        dh_slack[:, i * N:(i + 1) * N])


def test_two_tensor_custom_ops_fake():
    P, N = 16, 256
    gate, up = halves(make_h(P, N, 71, "heavy"))
    probs, dy = make_probs(P, 72), make_dy(P, N, 73)
    fake = ("test_faketensor", "test_autograd_registration")
    ops = torch.ops.fp8flow
    for p in (probs, None):
        torch.library.opcheck(ops.swiglu_quant.default, (gate, p, up), test_utils=fake)
        torch.library.opcheck(ops.swiglu_quant_save.default, (gate, p, up), test_utils=fake)
        torch.library.opcheck(ops.swiglu_quant_backward.default, (dy, gate, p, None, up, True),
                              test_utils=fake)
        hq, hs = quantize_1x128_ref(torch.cat([gate, up], 1).float())
        torch.library.opcheck(ops.swiglu_quant_backward.default, (dy, hq, p, hs, None, True),
                              test_utils=fake)


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 128), None, _h(4, 256)), "up must have"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 96), None, _h(4, 96)), "multiple of 128"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 128), None, _h(4, 128).to(FP8)), "dtype"),
    (lambda: torch.ops.fp8flow.swiglu_quant(_h(4, 128), None, _h(128, 4).t()), "contiguous"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 256), _h(4, 128), None, None,
                                                     _h(4, 128)), r"dy must have shape \(4, 128\)"),
    (lambda: torch.ops.fp8flow.swiglu_quant_backward(_h(4, 128), _h(4, 128).to(FP8),
                                                     None, torch.ones(4, 1), _h(4, 128)), "dtype"),
])
def test_two_tensor_bad_input_names_the_constraint(bad, match):
    with pytest.raises(Fp8Unsupported, match=match):
        bad()


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype, with_probs", BACKWARD_CASES)
def test_gpu_gate_and_up_as_two_tensors(kind, dtype, with_probs):
    P, N = 1000, 1024
    h, probs, dy = backward_inputs(P, N, 74, kind, dtype, with_probs, pad=24)
    h, dy = h.cuda(), dy.cuda()
    pc = None if probs is None else probs.cuda()
    gate, up = halves(h)
    ops = torch.ops.fp8flow
    for a, b in zip(ops.swiglu_quant_save(h, pc), ops.swiglu_quant_save(gate, pc, up=up)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    hq, hs = ops.swiglu_quant_save(h, pc)[2:]
    for args, two in (((h, pc), (gate, pc, None, up)), ((hq, pc, hs), (hq, pc, hs))):
        dq0, ds0, dp0 = ops.swiglu_quant_backward(dy, *args)
        dq, ds, dp = ops.swiglu_quant_backward(dy, *two, split=True)
        assert same_bytes(torch.cat([dq[0], dq[1]], 1), dq0)
        assert torch.equal(torch.cat([ds[0], ds[1]], 1), ds0) and torch.equal(dp, dp0)
