"""benchmarks/power.py: refuses cleanly without a GPU; on one, every workload gives a row."""

import json

import pytest
import torch

from benchmarks import power


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_needs_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        power.main([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rows(tmp_path):
    # 1.5 s counted per workload: about 70 NVML samples at one per 20 ms
    pytest.importorskip("pynvml")
    out = tmp_path / "power.jsonl"
    power.main(["--tokens", "512", "--hidden", "1024", "--inter", "512", "--experts", "4",
                "--topk", "2", "--block-s", "2.0", "--settle-s", "0.5", "--rest-s", "0.1",
                "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 17
    for r in rows:
        assert r["ms"] > 0 and r["calls"] > 0 and r["rate"] > 0
        assert r["samples"] > 0, r
        assert r["sm_mhz"] > 0 and r["power_w"] > 0
        assert r["mj_per_call"] == pytest.approx(r["power_w"] * r["ms"])
