"""E4M3 arithmetic shared by the Triton kernels, written with integer bit operations.

Why not only `x.to(tl.float8e4nv)`: the Triton interpreter (the CPU path CI runs) rounds that cast
wrongly (the rounding carry is lost, ties go away from zero, no saturation) and turns NaN into 384.
So under the interpreter every kernel rounds in fp32 here and writes the E4M3 byte itself. Compiled
kernels use the GPU's conversion instead (`cvt.rn.satfinite` on Hopper: round to nearest even,
saturating), which gives the same bytes (the GPU tests compare every byte with the torch
reference) for a fraction of the integer work. Kernels load and store E4M3 tensors through uint8
views.
"""

import triton
import triton.language as tl

#: True where kernels are compiled for a GPU, False under TRITON_INTERPRET=1 (read at import,
#: as Triton itself decides between compiling and interpreting when the kernels are defined).
HW_CAST = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def scale_exponent(amax):
    """e = ceil(log2(amax / 448)) computed exactly from the bits of amax (fp32 >= 0, finite).

    amax = (1 + m / 2**23) * 2**(ef - 127) and 448 = 1.75 * 2**8, so
    e = ef - 135 + (m > 0.75 * 2**23). amax == 0 gives e = 0 (scale 1); e is clamped to
    [-126, 126] so the scale and its inverse stays a normal fp32 number.
    """
    bits = amax.to(tl.int32, bitcast=True)
    ef = (bits >> 23) & 0xFF
    mf = bits & 0x7FFFFF
    e = ef - 135 + (mf > 0x600000).to(tl.int32)
    e = tl.where(amax == 0.0, 0, e)
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def exp2i(e):
    """2**e as fp32 for integer e in [-126, 127], exact."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_e4m3(x):
    """Round finite fp32 x to the nearest E4M3 value (ties to even), saturating at +-448.

    Returns fp32 holding an exactly representable E4M3 value.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range (|x| >= 2**-6): keep 3 mantissa bits, round half to even on bit 20.
    rb = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = rb.to(tl.float32, bitcast=True)
    # Subnormal range: the quantum is 2**-9; adding 1.5 * 2**14 (whose ulp is 2**-9) rounds
    # to nearest-even in one fp32 rounding.
    sub = (a + 24576.0) - 24576.0
    r = tl.where(a >= 0.015625, normal, sub)
    # Sign put back with bits: the interpreter's negation turns -0.0 into +0.0.
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits(r, nan_mask):
    """The E4M3FN byte (int32 in [0, 255]) of r, an fp32 value exactly representable in E4M3.

    Where nan_mask is set the byte is NaN (0x7F, sign kept).
    """
    bits = r.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(r)
    abits = a.to(tl.int32, bitcast=True)
    normal = ((((abits >> 23) & 0xFF) - 120) << 3) | ((abits >> 20) & 0x7)
    sub = (a * 512.0).to(tl.int32)
    mag = tl.where(a >= 0.015625, normal, sub)
    mag = tl.where(nan_mask, 0x7F, mag)
    return sign | mag


@triton.jit
def e4m3_to_f32(byte):
    """Decode E4M3FN bytes (any int type holding 0..255) to fp32 exactly; 0x7F/0xFF -> NaN."""
    b = byte.to(tl.int32) & 0xFF
    sign = b >> 7
    ex = (b >> 3) & 0xF
    man = b & 0x7
    normal = ((ex + 120) << 23 | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125
    v = tl.where(ex == 0, sub, normal)
    v = tl.where((ex == 15) & (man == 7), float("nan"), v)
    return (v.to(tl.int32, bitcast=True) | (sign << 31)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_tile(x, AXIS: tl.constexpr):
    """Quantize a tile of fp32 values with one power-of-two scale per slice along AXIS.

    Returns (bytes int32, scale fp32 reduced over AXIS). Non-finite values become NaN bytes and
    do not enter the amax.

    Compiled, x - (x - x) turns +-Inf into NaN (Inf - Inf is NaN) with two adds and keeps every
    finite x, -0 included (x + (x - x) would turn -0 into +0): the max (IEEE maxNum) skips NaN,
    the max with 0 makes a slice of NaNs scale 1, and the conversion writes NaN as 0x7F. That
    replaces a compare and three selects per element in kernels that are issue-bound (the
    SwiGLU ones). The interpreter, whose NaNs may carry a sign, keeps the mask.
    """
    if HW_CAST:
        xn = x - (x - x)
        amax = tl.maximum(tl.max(tl.abs(xn), axis=AXIS), 0.0)
        e = scale_exponent(amax)
        inv = tl.expand_dims(exp2i(-e), AXIS)
        return (xn * inv).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32), exp2i(e)
    finite = tl.abs(x) < float("inf")  # False for NaN and +-Inf
    amax = tl.max(tl.where(finite, tl.abs(x), 0.0), axis=AXIS)
    e = scale_exponent(amax)
    inv = tl.expand_dims(exp2i(-e), AXIS)
    return encode_e4m3(tl.where(finite, x, 0.0) * inv, finite), exp2i(e)


@triton.jit
def encode_e4m3(y, finite):
    """E4M3FN bytes (int32) of fp32 y rounded to nearest even and saturated at +-448; 0x7F
    (NaN) where `finite` is False. Compiled: the GPU's conversion; interpreted: the integer
    rounding above. Both give torch's bytes."""
    if HW_CAST:
        b = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
        return tl.where(finite, b, 0x7F)
    return e4m3_bits(round_e4m3(y), ~finite)


@triton.jit
def encode_e4m3x4(y0, y1, y2, y3, f0, f1, f2, f3):
    """encode_e4m3 of four fp32 tiles packed into int32 words, y0's byte lowest: y_i's byte is
    0x7F (NaN) where f_i is False. Compiled: two `cvt.rn.satfinite.e4m3x2.f32` give the four
    bytes (NaN converts to 0x7F); interpreted: encode_e4m3 per tile."""
    if HW_CAST:
        nan = float("nan")
        return tl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi;
            cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
            cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
            mov.b32 $0, {lo, hi};
            }""",
            "=r,f,f,f,f", [tl.where(f0, y0, nan), tl.where(f1, y1, nan), tl.where(f2, y2, nan),
                           tl.where(f3, y3, nan)],
            dtype=tl.int32, is_pure=True, pack=1)
    # encode_e4m3 reads the sign of y where `finite` is False: those lanes become +0 first
    word = encode_e4m3(tl.where(f0, y0, 0.0), f0)
    word |= encode_e4m3(tl.where(f1, y1, 0.0), f1) << 8
    word |= encode_e4m3(tl.where(f2, y2, 0.0), f2) << 16
    return word | (encode_e4m3(tl.where(f3, y3, 0.0), f3) << 24)


@triton.jit
def store_quantized_rows(x, q_ptrs, s_ptrs, mask, rmask):
    """Quantize an fp32 tile with one scale per row (1x128 along its columns) and store the
    bytes at q_ptrs (an E4M3 tensor seen as uint8) and the row scales at s_ptrs."""
    byte, scale = quantize_tile(x, 1)
    tl.store(q_ptrs, byte.to(tl.uint8), mask=mask)
    tl.store(s_ptrs, scale, mask=rmask)
