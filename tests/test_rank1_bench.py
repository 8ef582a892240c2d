"""The rank-1 benchmark's arithmetic and its CPU path (no CUDA here: eager timings only)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from kernels import bench

TINY_GRID = {"layers": [("tiny", 8, 12)], "members": [2], "rows": [4]}


def test_flops_count_one_gemm_forward_and_three_with_backward():
    assert bench.flops(2, 3, 5, 7, "fwd") == 2 * 2 * 3 * 5 * 7
    assert bench.flops(2, 3, 5, 7, "fwd+bwd") == 3 * 2 * 2 * 3 * 5 * 7


def test_compulsory_bytes_by_hand():
    # K=2, M=3, d_in=5, d_out=7: x 30, y 42, W 35, r+s+bias 2*(7+5+7) = 38 elements.
    forward = 30 + 35 + 38 + 42
    backward = 42 + 30 + 35 + 38 + 30 + 35 + 38
    assert bench.compulsory_bytes(2, 3, 5, 7, "fwd", 2) == 2 * forward
    assert bench.compulsory_bytes(2, 3, 5, 7, "fwd+bwd", 4) == 4 * (forward + backward)


def test_correctness_check_of_the_interpreted_kernel_is_tight():
    assert bench.correctness_check("cpu") < 1e-5


def test_cpu_grid_times_each_impl_and_relates_them():
    results = bench.run_grid(TINY_GRID, ["fp32"], "cpu", ["eager", "floor"])
    assert [(r.pass_, r.impl) for r in results] == [
        ("fwd", "eager"), ("fwd", "floor"), ("fwd+bwd", "eager"), ("fwd+bwd", "floor")
    ]
    by_key = {(r.pass_, r.impl): r for r in results}
    for pass_ in bench.PASSES:
        eager, floor = by_key[(pass_, "eager")], by_key[(pass_, "floor")]
        assert eager.ms > 0 and eager.speedup_vs_eager == 1.0 and floor.ratio_to_floor == 1.0
        assert eager.ratio_to_floor == pytest.approx(eager.ms / floor.ms)
        assert floor.speedup_vs_eager == pytest.approx(eager.ms / floor.ms)
        assert eager.tflops == pytest.approx(bench.flops(2, 4, 8, 12, pass_) / eager.ms / 1e9)


def test_main_without_cuda_writes_json_and_csv(tmp_path, monkeypatch, capsys):
    assert not torch.cuda.is_available()
    monkeypatch.setattr(bench, "CPU_QUICK", TINY_GRID)
    prefix = tmp_path / "out"
    assert bench.main(["--quick", "--dtype", "bf16", "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA device" in printed and "correctness" in printed
    records = json.loads((tmp_path / "out.json").read_text())
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["pass"], r["impl"], r["dtype"]) for r in records] == [("fwd", "eager", "bf16"), ("fwd+bwd", "eager", "bf16")]
    assert [float(r["ms"]) for r in rows] == pytest.approx([r["ms"] for r in records])
    assert not list(tmp_path.glob("*.tmp-*"))
