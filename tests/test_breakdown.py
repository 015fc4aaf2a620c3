"""The per-op breakdown's accounting (benchmarks/breakdown.py) on a hand-made profiler trace:
which op each kernel is charged to, and the byte / FLOP counts behind the floors."""

from __future__ import annotations

import json

import pytest

from benchmarks.breakdown import attribute, gemm_problem, op_bytes, table
from benchmarks.common import idle_gaps

BF16, FP8, F32, I32 = "c10::BFloat16", "c10::Float8_e4m3fn", "float", "int"


def _op(name, ts, dur, dims, types, concrete=None, tid=1):
    args = {"Input Dims": dims, "Input type": types}
    if concrete is not None:
        args["Concrete Inputs"] = concrete
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid,
            "args": args}


def _launch(corr, ts, tid=1, cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
            "args": {"correlation": corr}}


def _kernel(corr, dur, name="k", cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": 1000 + corr, "dur": dur, "tid": 7,
            "args": {"correlation": corr}}


def test_attribute_charges_kernels_to_the_outermost_op():
    tq = [[64, 256], [64, 2], [16], []]
    ev = [
        _op("fp8flow::scaling_aware_transpose", 0, 100, tq, [FP8, F32, I32, "Scalar"]),
        # nested in the transpose (as if it called another op): charged to the outer one
        _op("fp8flow::quantize_1x128", 10, 20, [[64, 256]], [BF16]),
        _launch(1, 5), _kernel(1, 30.0),
        _launch(2, 15), _kernel(2, 4.0),
        # a second call of the same op with the same shapes, on the backward's thread
        _op("fp8flow::scaling_aware_transpose", 200, 50, tq, [FP8, F32, I32, "Scalar"], tid=2),
        _launch(3, 210, tid=2, cat="cuda_driver"), _kernel(3, 20.0),
        # launched outside every tracked op
        _op("aten::sort", 300, 10, [[16]], [I32]),
        _launch(4, 305), _kernel(4, 6.0, name="triton_poi_fused_add_0"),
        _launch(5, 306), _kernel(5, 2.0, name="Memset (Device)", cat="gpu_memset"),
        _launch(6, 307), _kernel(6, 3.0, name="void cub::DeviceRadixSortOnesweepKernel<x>"),
    ]
    ops, other, busy = attribute({"traceEvents": ev})
    # kernels at 1000 + corr: [1001, 1031), [1002, 1006), [1003, 1023), [1004, 1010), ...: all
    # inside [1001, 1031) but the last two, [1005, 1007) and [1006, 1009), also inside it
    assert busy == pytest.approx(30.0)
    key = ("fp8flow::scaling_aware_transpose", json.dumps(tq))
    assert set(ops) == {key}
    count, us, _ = ops[key]
    # per call the span of its kernels: [1001, 1031) for the first, [1003, 1023) the second
    assert (count, us) == (2, pytest.approx(50.0))
    assert other == {"Inductor kernels (triton_*)": [1, 6.0], "memsets": [1, 2.0],
                     "sorts": [1, 3.0]}


def test_op_bytes_formulas():
    P, T, H, I = 512, 128, 256, 128
    # the transpose moves q and its scales in and the same amounts out
    assert op_bytes("fp8flow::scaling_aware_transpose",
                    {"Input Dims": [[P, H], [P, H // 128], [4], []],
                     "Input type": [FP8, F32, I32, "Scalar"]}) == 2 * (P * H + P * H // 128 * 4)
    # with src_row, like a gather: the T source rows and the index read once, P rows written
    assert op_bytes("fp8flow::scaling_aware_transpose",
                    {"Input Dims": [[T, H], [T, H // 128], [4], [], [P]],
                     "Input type": [FP8, F32, I32, "Scalar", I32]}
                    ) == (T + P) * (H + H // 128 * 4) + 4 * P
    # a gather: its inputs read once, each of its P output rows written once
    assert op_bytes("fp8flow::permute_pad_fp8",
                    {"Input Dims": [[T, H], [T, H // 128], [P]], "Input type": [FP8, F32, I32]}
                    ) == (T + P) * (H + H // 128 * 4) + 4 * P
    # the dual weight quantization: bf16 in, two E4M3 copies and their block scales out
    E, N, K = 4, 256, 384
    n = E * N * K
    assert op_bytes("fp8flow::quantize_128x128_dual",
                    {"Input Dims": [[E, N, K]], "Input type": [BF16]}
                    ) == 2 * n + 2 * n + 2 * 4 * n // (128 * 128)
    # SwiGLU with h kept: h in (bf16) and probs, a and h out in FP8 with 1x128 scales
    assert op_bytes("fp8flow::swiglu_quant_save",
                    {"Input Dims": [[P, 2 * I], [P]], "Input type": [BF16, F32]}
                    ) == P * 2 * I * 2 + 4 * P + P * I + P * I // 32 + P * 2 * I + P * 2 * I // 32
    # the combine: src rows in, num_rows (a concrete input) rows out
    assert op_bytes("fp8flow::index_add_rows",
                    {"Input Dims": [[], [P], [P, H], [P], [], []],
                     "Input type": ["", "long int", BF16, F32, "Scalar", "Scalar"],
                     "Concrete Inputs": ["", "", "", "", str(T), "False"]}
                    ) == 8 * P + 2 * P * H + 4 * P + 2 * T * H
    assert op_bytes("fp8flow::offsets_to_host", {"Input Dims": [[4]], "Input type": [I32]}) is None


def test_gemm_problem_shapes():
    fwd = {"Input Dims": [[512, 256], [512, 2], [4, 384, 256], [4, 3, 2], [4]]}
    assert gemm_problem("fp8flow::grouped_gemm_fp8", fwd) == ("fwd", 512, 384, 256)
    wg = {"Input Dims": [[384, 520], [384, 8], [256, 520], [256, 8], [4]]}
    assert gemm_problem("fp8flow::grouped_gemm_fp8_wgrad", wg) == ("wgrad", 384, 256, 520)
    for i in (1, 3):  # a's or b's scales in 128x128 blocks (passes/block_scales.py)
        blk = {"Input Dims": [list(d) for d in wg["Input Dims"]]}
        blk["Input Dims"][i][0] //= 128
        assert gemm_problem("fp8flow::grouped_gemm_fp8_wgrad", blk) == \
            ("wgrad_blk", 384, 256, 520)
    bf = {"Input Dims": [[512, 256], [4, 256, 384], [4]]}
    assert gemm_problem("aten::_grouped_mm", bf) == ("bf16", 512, 384, 256)
    bw = {"Input Dims": [[384, 512], [512, 256], [4]]}
    assert gemm_problem("aten::_grouped_mm", bw) == ("bf16", 384, 256, 512)


def test_attribute_spans_overlapping_streams():
    # one grouped GEMM whose two kernels overlap on two streams: its time is the span, 15 us,
    # not the 20 us of summed durations; a gap on the GPU is not busy
    ev = [_op("fp8flow::grouped_gemm_fp8", 0, 50, [[64, 128]], [FP8]),
          _launch(1, 1), _launch(2, 2), _launch(3, 60)]
    ev += [{"ph": "X", "cat": "kernel", "name": "nvjet", "ts": ts, "dur": d, "tid": tid,
            "args": {"correlation": c}}
           for c, ts, d, tid in ((1, 100, 10, 7), (2, 105, 10, 8), (3, 200, 5, 7))]
    ops, other, busy = attribute({"traceEvents": ev})
    assert [v[:2] for v in ops.values()] == [[1, 15.0]]
    assert other == {"kernel nvjet": [1, 5.0]}
    assert busy == pytest.approx(20.0)


def test_table_adds_floors_and_measured_rest():
    ops = {("fp8flow::scaling_aware_transpose", json.dumps([[1000, 128], [1000, 1]])):
           [2, 4000.0, {"Input Dims": [[1000, 128], [1000, 1]], "Input type": [FP8, F32]}]}
    other = {"Inductor kernels (triton_*)": [2, 1000.0]}
    rows, measured, at_floor = table(ops, other, steps=2, bw_gbs=1.0, dense={})
    nb = 2 * (1000 * 128 + 1000 * 4)
    assert measured == pytest.approx(2.5)  # (4000 + 1000) us over 2 steps
    # one call per step at 1 GB/s, plus the Inductor kernels as measured (0.5 ms per step)
    assert at_floor == pytest.approx(nb / 1e6 + 0.5)
    assert rows[0][0] == "scaling_aware_transpose" and rows[0][5] == pytest.approx(nb / 1e6)


def test_idle_gaps_merge_streams():
    # kernel b runs inside the long kernel a on another stream: the only idle time is between
    # the end of a and the start of c, during the host op that launched c
    k = [("a", 0, 100), ("b", 10, 20), ("c", 130, 10), ("d", 145, 5)]
    ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d, "tid": 7, "args": {}}
          for n, ts, d in k]
    ev.append(_op("fp8flow::grouped_gemm_fp8", 90, 50, [[1]], [FP8]))
    total, gaps = idle_gaps({"traceEvents": ev})
    assert total == pytest.approx(35.0)
    assert gaps[0] == (30, "a", "c", ["fp8flow::grouped_gemm_fp8"])
    assert gaps[1][:3] == (5, "c", "d")


def test_moe_layer_gap_report_reads_the_same_gaps(tmp_path):
    from benchmarks.moe_layer import gpu_gaps
    k = [("a", 0, 100), ("b", 10, 20), ("c", 130, 10)]
    ev = [{"ph": "X", "cat": "kernel", "name": n, "ts": ts, "dur": d, "tid": 7, "args": {}}
          for n, ts, d in k]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    text = gpu_gaps(str(path))
    # span 140 us, idle 30 us (b runs inside a on another stream)
    assert "GPU busy 0.11 ms of a 0.14 ms span (idle 0.03 ms)" in text
    assert "30 us: a -> c" in text
