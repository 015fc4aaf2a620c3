"""The layer benchmark's timing methods (benchmarks/moe_layer.py): sustained blocks and
interleaved rounds, their orders, which step runs when and which counts, and what a failing
variant leaves, on the CPU with stand-in steps (the sustained blocks on a stand-in clock)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.moe_layer import (
    Telemetry,
    Timed,
    interleaved_ms,
    parse_args,
    round_orders,
    shared_compile,
    sustained_ms,
)


def test_round_orders_put_every_variant_in_every_position_equally():
    keys = ["a", "b", "c"]
    orders = round_orders(keys, 6)
    assert all(sorted(o) == keys for o in orders)
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == ["a", "a", "b", "b", "c", "c"]
    assert orders[0] == keys and orders[1] == ["b", "c", "a"]
    assert round_orders([], 4) == []


def _stand_in(key, log, fail_at=None):
    calls = {"step": 0}

    def step():
        calls["step"] += 1
        if fail_at is not None and calls["step"] == fail_at:
            raise RuntimeError(f"{key} broke")
        log.append(("step", key))

    def clear():
        log.append(("clear", key))

    return Timed(key, step, clear)


def test_interleaved_ms_times_rounds_and_clears_before_each_step():
    log: list = []
    timed = [_stand_in(k, log) for k in "xyz"]
    got = interleaved_ms(timed, torch.device("cpu"), warmup=2, reps=4)
    assert set(got) == {"x", "y", "z"}
    assert all(isinstance(v, list) and len(v) == 4 and all(t >= 0 for t in v)
               for v in got.values())
    steps = [k for what, k in log if what == "step"]
    # 6 rounds, each one step of every variant in the rotated order
    assert steps == [k for o in round_orders(["x", "y", "z"], 6) for k in o]
    # every step follows a clear of the same variant
    for i, (what, k) in enumerate(log):
        if what == "step":
            assert log[i - 1] == ("clear", k)


def test_interleaved_ms_drops_a_failing_variant_and_keeps_the_others():
    log: list = []
    timed = [_stand_in("ok", log), _stand_in("bad", log, fail_at=3)]
    got = interleaved_ms(timed, torch.device("cpu"), warmup=1, reps=5)
    assert got["bad"] == "RuntimeError: bad broke"
    assert len(got["ok"]) == 5
    assert sum(1 for what, k in log if what == "step" and k == "bad") == 2


def test_shared_compile_names_the_earlier_variant_of_the_same_options():
    rows = [{"variant": "bf16_compiled"}, {"variant": "fp8_naive", "options": {"flow": False}},
            {"variant": "fp8flow", "options": {}}]
    assert shared_compile(rows) is None
    rows.append({"variant": "fp8flow_triton", "options": {}})
    assert shared_compile(rows) == "fp8flow"
    rows[2]["error"] = "RuntimeError: x"
    assert shared_compile(rows) is None


class _Clock:
    """A stand-in clock that only a step advances: each step takes exactly `dt` seconds."""

    def __init__(self, dt=1.0):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        return self.t


def _clocked(key, log, clock, fail_at=None):
    t = _stand_in(key, log, fail_at)
    inner = t.step

    def step():
        inner()
        clock.t += clock.dt

    return Timed(key, step, t.clear)


def test_sustained_ms_runs_blocks_in_rotated_rounds_and_drops_the_settling_steps():
    log: list = []
    clock = _Clock()
    timed = [_clocked(k, log, clock) for k in "xyz"]
    got, blocks = sustained_ms(timed, torch.device("cpu"), block_s=5, settle_s=2, rounds=2,
                               clock=clock)
    steps = [k for what, k in log if what == "step"]
    # a block is 5 one-second steps; rounds rotate the order like the interleaved rounds
    assert steps == [k for o in round_orders(["x", "y", "z"], 2) for k in o for _ in range(5)]
    for i, (what, k) in enumerate(log):
        if what == "step":
            assert log[i - 1] == ("clear", k)
    for k in "xyz":
        # steps started at 0 and 1 s settle; those at 2, 3, 4 s count: 3 per block, 2 blocks
        assert got[k] == [1000.0] * 6
        assert blocks[k] == [{"ms": 1000.0, "steps": 3}] * 2
    assert log[-3:] == [("clear", "x"), ("clear", "y"), ("clear", "z")]


def test_sustained_ms_counts_one_step_when_the_block_is_shorter_than_a_step():
    log: list = []
    clock = _Clock(dt=10.0)
    got, blocks = sustained_ms([_clocked("x", log, clock)], torch.device("cpu"), block_s=0.5,
                               settle_s=0.0, rounds=3, clock=clock)
    assert got["x"] == [10000.0] * 3 and [b["steps"] for b in blocks["x"]] == [1, 1, 1]


def test_sustained_ms_drops_a_failing_variant_and_keeps_the_others():
    log: list = []
    clock = _Clock()
    timed = [_clocked("ok", log, clock), _clocked("bad", log, clock, fail_at=2)]
    got, blocks = sustained_ms(timed, torch.device("cpu"), block_s=3, settle_s=1, rounds=3,
                               clock=clock)
    assert got["bad"] == "RuntimeError: bad broke" and blocks["bad"] == []
    assert len(got["ok"]) == 6 and len(blocks["ok"]) == 3
    assert sum(1 for what, k in log if what == "step" and k == "bad") == 1


def test_sustained_ms_reports_the_telemetry_of_the_counted_part_of_each_block():
    log: list = []
    clock = _Clock()
    tel = Telemetry.__new__(Telemetry)  # no sampler thread: samples set by hand
    # the block runs from 0 to 5 s on the stand-in clock; 2 s settle, so [2, 5] counts
    tel.samples = [(1.0, 1980, 300.0), (2.5, 1500, 690.0), (3.5, 1400, 700.0),
                   (4.5, 1450, 698.0), (6.0, 1000, 50.0)]
    got, blocks = sustained_ms([_clocked("x", log, clock)], torch.device("cpu"), block_s=5,
                               settle_s=2, rounds=1, clock=clock, telemetry=tel)
    assert blocks["x"] == [{"ms": 1000.0, "steps": 3, "sm_mhz": 1450, "power_w": 698.0,
                            "samples": 3}]


def test_telemetry_window_takes_medians_inside_the_spans_only():
    tel = Telemetry.__new__(Telemetry)  # no sampler thread: samples set by hand
    tel.samples = [(0.5, 1980, 100.0), (1.5, 1500, 690.0), (2.5, 1400, 700.0),
                   (3.5, 1600, 695.0), (9.0, 1000, 50.0)]
    assert tel.window([(1.0, 4.0)]) == {"sm_mhz": 1500, "power_w": 695.0}
    assert tel.window([(0.0, 1.0), (8.0, 10.0)]) == {"sm_mhz": 1490.0, "power_w": 75.0}
    assert tel.window([(4.0, 5.0)]) == {}
    assert [tel.count(s) for s in ([(1.0, 4.0)], [(0.0, 1.0), (8.0, 10.0)], [(4.0, 5.0)])] == \
        [3, 2, 0]


def test_timing_options():
    assert parse_args([]).timing == "sustained"
    assert parse_args(["--sequential"]).timing == "sequential"
    a = parse_args(["--timing", "interleaved", "--smoke"])
    assert a.timing == "interleaved" and a.block_s == 0.0 and a.reps == 1
    a = parse_args([])
    assert (a.block_s, a.settle_s, a.rounds) == (6.0, 2.0, 2)
    with pytest.raises(SystemExit):
        parse_args(["--block-s", "1", "--settle-s", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def test_separate_expert_layout_is_the_stacked_layer_with_two_fc1_gemms():
    """--experts separate: the same layer with w1, w3 for the halves of w13; fp8flow takes it
    to the same 2 casts as the stacked layer."""
    import fp8flow_compile as ff
    from benchmarks.moe_layer import (
        RoutedMoE,
        build,
        expert_params,
        grad_w13,
        make_routing,
        make_variant,
    )
    T, H, I, E, k = dims = (64, 256, 128, 4, 2)
    g = torch.Generator().manual_seed(0)
    topw, topi, loads = make_routing("skewed", T, E, k, 16, 0, "cpu")
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    x, dy = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    outs = {}
    for layout in ("stacked", "separate"):
        m = build(RoutedMoE, dims, w13, w2, topw, topi, torch.float32, layout)
        assert len(expert_params(m)) == (2 if layout == "stacked" else 3)
        out = m(x)
        out.backward(dy)
        outs[layout] = (out.detach(), grad_w13(m), m.w2.grad)
    for a, b in zip(outs["stacked"], outs["separate"]):
        # the same dot products, in float32; only the GEMM's blocking may differ
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fn, layer, _ = make_variant("fp8flow", dims, w13.bfloat16(), w2.bfloat16(), topw, topi,
                                loads, 16, smoke=True, layout="separate")
    y = fn(x.bfloat16().requires_grad_())  # with the input's gradient: all 9 expert GEMMs
    y.backward(dy.bfloat16())
    s = ff.last_report().summary()
    assert s["casts_after"] == 2 and s["gemms_fp8"] == 9, s

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    # FP8 tolerance as in the backend tests: ~0.07 for two chained E4M3 GEMMs, 0.12 with tails
    assert rel(y, outs["stacked"][0]) < 0.12
    assert rel(grad_w13(layer), outs["stacked"][1]) < 0.12
    with pytest.raises(ValueError, match="unknown expert layout"):
        build(RoutedMoE, dims, w13, w2, topw, topi, torch.float32, "interleaved")
