"""The Gluon GEMM probe (benchmarks/gluon_gemm.py) builds for sm_90a without a GPU, and ptxas keeps
its wgmmas asynchronous only in the unrolled form: the claim its timings rest on.

The build runs in a child process without TRITON_INTERPRET: compiling for a GPU target needs
Triton's compiler, which the interpreter mode of the rest of the suite replaces."""

import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = pytest.mark.skipif(not os.path.exists(ptxas), reason="triton's ptxas is not bundled")

SERIALIZED = "C7514"  # ptxas: wgmma.mma_async instructions are serialized


@pytest.fixture(scope="module")
def notes() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gluon_gemm.py"),
                          "--compile-only"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    forms, cur = {}, None
    for line in out.stdout.splitlines():
        if line and not line.startswith(" "):
            cur = line.rstrip(":")
            forms[cur] = ""
        elif cur is not None:
            forms[cur] += line + "\n"
    assert set(forms) == {"pair", "wait", "rolled"}, out.stdout
    return forms


def test_unrolled_form_keeps_wgmma_async(notes):
    assert "registers" in notes["pair"], notes
    assert SERIALIZED not in notes["pair"], notes["pair"]
    assert "0 bytes spill stores" in notes["pair"], notes["pair"]


def test_waiting_form_keeps_wgmma_async(notes):
    assert SERIALIZED not in notes["wait"], notes["wait"]


def test_rolled_form_is_serialized_by_ptxas(notes):
    # the in-flight accumulator carried through the loop: what the unrolling avoids
    assert SERIALIZED in notes["rolled"], notes["rolled"]
