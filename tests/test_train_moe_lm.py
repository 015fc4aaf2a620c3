"""The convergence example's smoke preset, in-process: BF16 and fp8flow both learn, and agree.

One run of both variants (the module-scoped fixture: the smoke preset cut to 20 steps) backs
every assertion below; it takes about 15-25 s on 2 idle CPU cores (graphs run eagerly, the FP8
ops through their CPU paths).
"""

import csv
import math

import pytest
import torch

import examples.train_moe_lm as lm

# Mean of the last 5 steps against step 0. At initialisation the logits are near zero, so the
# first loss is ~ln(256) = 5.55 nats/byte; learning only the byte frequencies of English brings
# it to ~3.3. Batch noise: a batch averages 4 x 64 = 256 byte losses whose spread is ~1.5 nats,
# so one batch mean varies by ~0.1 and a 5-step mean by ~0.05; 1.0 nats is 20 of those, which
# noise does not give, while a variant that does not learn (or learns only a little) fails it.
MIN_DROP = 1.0
# Relative gap of the two variants' final losses. E4M3 rounds each GEMM operand by ~3.6% RMS
# (2^-4/sqrt(3)), but the errors are unbiased and the loss averages them over many products and
# steps: the measured gap of this preset is 0.2-0.6% (train and val). 3% is 5x that, and a
# tenth of the ~40% gap a broken FP8 path (a loss that stops falling at ~5.5) would show.
MAX_REL_GAP = 0.03


@pytest.fixture(scope="module")
def smoke():
    torch.manual_seed(0)
    cfg = lm.Config(**lm.SMOKE)
    cfg.device, cfg.steps, cfg.eval_every = "cpu", 20, 10
    return cfg, lm.run(cfg, out=None, progress=False)


def _tail(losses, n=5):
    return sum(losses[-n:]) / n


def test_both_variants_learn(smoke):
    _, res = smoke
    for name, r in res["variants"].items():
        loss = r["loss"]
        assert all(math.isfinite(x) for x in loss), name
        # Head weights of std 0.02 give logits of std 0.02 * sqrt(128) ~ 0.23 on unit-RMS
        # features: ~0.23^2 / 2 ~ 0.03 nats above the uniform ln(256) at step 0.
        assert abs(loss[0] - math.log(256)) < 0.15, (name, loss[0])
        assert _tail(loss) < loss[0] - MIN_DROP, (name, loss[0], _tail(loss))
        assert r["val"] and all(v < loss[0] - MIN_DROP for v in list(r["val"].values())[1:])


def test_fp8flow_stays_close_to_bf16(smoke):
    _, res = smoke
    v = res["variants"]
    s = res["summary"]
    assert s["rel_gap_train"] < MAX_REL_GAP, s
    assert s["rel_gap_val"] < MAX_REL_GAP, s
    last_b, last_f = _tail(v["bf16"]["loss"]), _tail(v["fp8flow"]["loss"])
    assert abs(last_f - last_b) / last_b < MAX_REL_GAP


def test_fp8flow_really_ran_in_fp8(smoke):
    # Without this, identical curves (the backend silently leaving every GEMM in BF16) would
    # pass the closeness test trivially.
    _, res = smoke
    rep = res["variants"]["fp8flow"]["report_summary"]
    # Per training step: qkv, proj, w13, w2 and head each have fprop, dgrad and wgrad GEMMs.
    assert rep["gemms_fp8"] >= 15, rep
    assert rep["casts_after"] < rep["casts_before"], rep
    assert res["variants"]["fp8flow"]["loss"] != res["variants"]["bf16"]["loss"]


def test_same_start_and_data_order(smoke):
    # Both variants start from one state and read one batch sequence, so their per-step losses
    # pair up: the step-to-step spread of the loss (different batches, ~0.1 nats here) is
    # several times the per-step gap between the variants (same batch, FP8 rounding only).
    # Two different data orders would give per-step gaps as large as that spread.
    _, res = smoke
    a, b = res["variants"]["bf16"]["loss"], res["variants"]["fp8flow"]["loss"]
    assert abs(a[0] - b[0]) / a[0] < 0.01, (a[0], b[0])  # same weights, same batch
    tail_a, tail_b = a[-10:], b[-10:]
    spread = torch.tensor(tail_a).std().item()
    gap = sum(abs(x - y) for x, y in zip(tail_a, tail_b)) / len(tail_a)
    assert gap < spread / 3, (gap, spread)


def test_outputs_written(smoke, tmp_path):
    cfg, res = smoke
    lm.write_outputs(str(tmp_path), cfg, res["variants"], res["summary"])
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["step", "loss_bf16", "loss_fp8flow"]
    assert len(rows) == cfg.steps + 1
    assert (tmp_path / "summary.json").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "losses.png").stat().st_size > 10_000


def test_rejects_dims_the_fp8_path_cannot_take():
    cfg = lm.Config(**lm.SMOKE)
    cfg.hidden = 192
    with pytest.raises(SystemExit, match="multiple of 128"):
        cfg.check()
