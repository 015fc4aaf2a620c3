"""The layer benchmark's interleaved timing (benchmarks/moe_layer.py): the round orders, which
step runs when, and what a failing variant leaves, on the CPU with stand-in steps."""

from __future__ import annotations

import torch

from benchmarks.moe_layer import Timed, interleaved_ms, round_orders, shared_compile


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
