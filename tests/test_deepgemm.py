"""The optional DeepGEMM path of the grouped fprop/dgrad (kernels/deepgemm.py).

On the CPU a stand-in module plays DeepGEMM's m-grouped contiguous call by its documented
contract (every 128-row block in one group or in none, rows of group -1 not written) and
computes each row with the reference: the tests check which layouts go to it, what it is given,
and that the loop runs instead where it must. On a Hopper GPU with DeepGEMM installed the real
call is checked bit for bit against the cuBLAS loop.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_gemm import BF16, rnd, strict_dense_fwd

from fp8flow_compile.kernels import cublas as CB
from fp8flow_compile.kernels import deepgemm as DG
from fp8flow_compile.kernels import gemm as G
from fp8flow_compile.kernels import quantize as Q
from fp8flow_compile.recipe import TILE


class FakeDeepGEMM:
    """DeepGEMM's `m_grouped_fp8_gemm_nt_contiguous` as its contract reads, on the reference."""

    __version__ = "stand-in"

    def __init__(self, fail: str | None = None):
        self.calls = 0
        self.fail = fail
        self.rows = []  # the rows M of each call

    @staticmethod
    def get_mk_alignment_for_contiguous_layout():
        return TILE

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, grouped_layout, recipe=None):
        self.calls += 1
        self.rows.append(a[0].shape[0])
        if self.fail:
            raise RuntimeError(self.fail)
        (aq, as_), (bq, bs) = a, b
        M, K = aq.shape
        E, N, _ = bq.shape
        assert recipe == (1, TILE, TILE)
        assert aq.dtype == bq.dtype == torch.float8_e4m3fn and aq.stride(1) == 1
        assert as_.shape == (M, K // TILE) and as_.dtype == torch.float32
        assert bs.shape == (E, N // TILE, K // TILE) and bq.is_contiguous()
        assert d.shape == (M, N) and d.dtype == torch.bfloat16
        assert grouped_layout.dtype == torch.int32 and grouped_layout.shape == (M,)
        for r0 in range(0, M, TILE):  # the contiguous layout: a block is in one group or none
            ids = set(grouped_layout[r0:r0 + TILE].tolist()) - {-1}
            assert len(ids) <= 1, f"rows {r0}..{r0 + TILE} span groups {ids}"
        for g in range(E):
            rows = (grouped_layout == g).nonzero().flatten()
            if rows.numel():
                d[rows] = G.gemm_fp8_ref(aq[rows], as_[rows], bq[g], bs[g], True, d.dtype)


@pytest.fixture
def fake(monkeypatch):
    f = FakeDeepGEMM()
    monkeypatch.setattr(DG, "_module", lambda: f)
    monkeypatch.setattr(DG, "_probe", lambda index: None)
    monkeypatch.setattr(DG, "_enabled", True)
    # the loop's dense call, for where the path must fall back to it on the CPU
    monkeypatch.setattr(CB, "_dense", lambda kind, device, out_dtype: strict_dense_fwd)
    return f


def _operands(M, E, N=256, K=512, seed=0):
    aq, as_ = Q.quantize_1x128_ref(rnd((M, K), seed))
    bq, bs = Q.quantize_128x128_ref(rnd((E, N, K), seed + 1, "normal"))
    return aq, as_, bq, bs


def test_group_of_row():
    offs = torch.tensor([128, 128, 256, 300], dtype=torch.int32)
    g = DG.group_of_row(offs, 320)
    assert g.dtype == torch.int32
    want = torch.tensor([0] * 128 + [2] * 128 + [3] * 44 + [-1] * 20, dtype=torch.int32)
    assert torch.equal(g, want)  # the empty group 1 owns no row


@pytest.mark.parametrize("ends", [[128, 256, 256, 300], [256, 320], [0, 128, 256, 320]])
def test_aligned_groups_go_to_deepgemm(fake, ends):
    """Group starts on multiples of 128 (an empty group too; the last group may end anywhere,
    here also at M): one call over the rows up to the last group's end only (DeepGEMM would
    still load the operands of the blocks past it), the reference's bits, rows past the last
    group zero."""
    M = 320
    aq, as_, bq, bs = _operands(M, len(ends))
    offs = torch.tensor(ends, dtype=torch.int32)
    y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16)
    assert fake.calls == 1 and fake.rows == [ends[-1]]
    assert torch.equal(y, G.grouped_gemm_fp8_ref(aq, as_, bq, bs, offs, True, BF16))
    y2 = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16, offs_host=offs.clone())
    assert fake.calls == 2 and torch.equal(y2, y)


@pytest.mark.parametrize("ends", [[100, 256, 300], [128, 200, 300], [256, 128, 300],
                                  [128, 256, 400]])
def test_other_layouts_run_the_loop(fake, ends):
    """A group start off the 128 grid, decreasing ends, or ends past the rows: the cuBLAS loop
    (here its CPU stand-in), with its clamping, not DeepGEMM."""
    M = 300
    aq, as_, bq, bs = _operands(M, len(ends), seed=3)
    offs = torch.tensor(ends, dtype=torch.int32)
    y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16)
    assert fake.calls == 0
    assert torch.equal(y, G.grouped_gemm_fp8_ref(aq, as_, bq, bs, offs, True, BF16))


def test_shapes_and_settings_it_does_not_take(fake):
    aq, as_, bq, bs = _operands(256, 2)
    ends = [128, 256]
    assert DG.fits(aq, bq, bs, BF16, ends, 256)
    assert not DG.fits(aq, bq, bs, torch.float32, ends, 256)  # DeepGEMM writes bf16 only
    aq2, _, bq2, bs2 = _operands(256, 2, N=192)
    assert not DG.fits(aq2, bq2, bs2, BF16, ends, 256)  # N off the 128 grid
    assert not DG.fits(aq, bq.transpose(1, 2).contiguous().transpose(1, 2), bs, BF16, ends, 256)
    wide = torch.zeros(256, 1024, dtype=aq.dtype)
    assert not DG.fits(wide[:, :512], bq, bs, BF16, ends, 256)  # rows not packed
    DG.set_enabled(False)
    assert not DG.fits(aq, bq, bs, BF16, ends, 256)
    DG.set_enabled(True)


def test_an_error_from_deepgemm_falls_back_to_the_loop(fake, caplog):
    fake.fail = "stand-in failure for the fallback test"
    aq, as_, bq, bs = _operands(256, 2, seed=5)
    offs = torch.tensor([128, 256], dtype=torch.int32)
    with caplog.at_level(logging.WARNING, logger="fp8flow_compile"):
        y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16)
    assert fake.calls == 1
    assert torch.equal(y, G.grouped_gemm_fp8_ref(aq, as_, bq, bs, offs, True, BF16))
    assert "stand-in failure for the fallback test" in caplog.text


def test_without_deepgemm_nothing_changes(monkeypatch):
    monkeypatch.setattr(DG, "_module", lambda: None)
    aq, as_, bq, bs = _operands(256, 2)
    assert not DG.fits(aq, bq, bs, BF16, [128, 256], 256)


def _real_deepgemm() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    DG._module.cache_clear()
    return DG._module() is not None


@pytest.mark.gpu
def test_deepgemm_matches_the_cublas_loop_bit_for_bit():
    """The real call on Hopper: both accumulate the same products in fp32 per 128-wide K block
    and round once; on the H100 the outputs were the same bits (docs/benchmarks.md, round v)."""
    if not _real_deepgemm():
        pytest.skip("needs DeepGEMM and a Hopper GPU")
    assert DG._probe(torch.cuda.current_device()) is None
    torch.manual_seed(0)
    for M, E, N, K, ends in [(1024, 4, 512, 1024, [256, 512, 512, 1000]),
                             (4096, 8, 2048, 7168, [512 * (i + 1) for i in range(8)])]:
        aq, as_ = Q.quantize_1x128(torch.randn(M, K, device="cuda").bfloat16())
        bq, bs, _, _ = Q.quantize_128x128_dual(
            (torch.randn(E, N, K, device="cuda") * 0.05).bfloat16())
        offs = torch.tensor(ends, dtype=torch.int32, device="cuda")
        assert DG.fits(aq, bq, bs, BF16, ends, M)
        y = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16)
        DG.set_enabled(False)
        try:
            loop = CB.grouped_fwd(aq, as_, bq, bs, offs, BF16)
        finally:
            DG.set_enabled(True)
        assert torch.equal(y, loop), (M, N, K)
        assert y[ends[-1]:].eq(0).all()
