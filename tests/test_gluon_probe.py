"""The Gluon GEMM probe (benchmarks/gluon_gemm.py) builds for sm_90a without a GPU, and ptxas keeps
its wgmmas asynchronous only in the unrolled form: the claim its timings rest on."""

import os

import pytest
import triton

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(ptxas), reason="triton's ptxas is not bundled")

SERIALIZED = "C7514"  # ptxas: wgmma.mma_async instructions are serialized


def test_unrolled_form_keeps_wgmma_async():
    from benchmarks.gluon_gemm import compile_only
    notes = compile_only("pair")
    assert "Used" in notes and "registers" in notes, notes
    assert SERIALIZED not in notes, notes
    assert "0 bytes spill stores" in notes, notes


def test_rolled_form_is_serialized_by_ptxas():
    # the in-flight accumulator carried through the loop: what the unrolling avoids
    from benchmarks.gluon_gemm import compile_only
    assert SERIALIZED in compile_only("rolled")
