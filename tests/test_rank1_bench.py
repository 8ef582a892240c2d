"""The rank-1 benchmark's arithmetic and its CPU path (no CUDA here: eager timings only)."""
from __future__ import annotations

import csv
import inspect
import json

import pytest
import torch

from kernels import bench, cli

# Triton on CPU tensors: runs only under TRITON_INTERPRET=1 (see conftest.py).
pytestmark = pytest.mark.interpreter

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


def test_bf16_correctness_check_measures_bf16_rounding_within_its_tolerance():
    error = bench.correctness_check("cpu", torch.bfloat16)
    assert 1e-4 < error < bench.tolerance(torch.bfloat16) / 2


def test_cpu_grid_times_each_impl_and_relates_them():
    results = bench.run_grid(TINY_GRID, ["fp32"], "cpu", ["eager", "floor"], bench._time_cpu)
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
    assert [(r["pass"], r["impl"], r["dtype"]) for r in records] == [
        ("fwd", "eager", "bf16"), ("fwd", "folded", "bf16"), ("fwd+bwd", "eager", "bf16"), ("fwd+bwd", "folded", "bf16")]
    assert [float(r["ms"]) for r in rows] == pytest.approx([r["ms"] for r in records])
    assert not list(tmp_path.glob("*.tmp-*"))


# The CUDA branch dry-run: stub timings per impl, in the order main() times them.
STUB_MS = {"fused": 2.0, "folded": 1.5, "eager": 3.0, "compiled": 4.0, "floor": 1.0}
GPU_IMPLS = ["fused", "folded", "eager", "compiled", "floor"]


@pytest.fixture
def fake_cuda(monkeypatch):
    """main()'s CUDA branch on CPU tensors: do_bench and the CUDA memory calls stubbed, the fused
    kernel interpreted, torch.compile without Inductor (dynamo and AOTAutograd still run)."""
    import triton.testing

    # triton 3.6 (the GPU image) has the same do_bench signature as the installed triton.
    do_bench_signature = inspect.signature(triton.testing.do_bench)
    log = {"bench": [], "compiles": 0, "peak_calls": 0}

    def do_bench(fn, *args, **kwargs):
        call = do_bench_signature.bind(fn, *args, **kwargs).arguments  # TypeError on a wrong keyword
        for _ in range(2):
            for t in call.get("grad_to_none") or []:
                t.grad = None
            fn()
        impl = GPU_IMPLS[len(log["bench"]) % len(GPU_IMPLS)]
        pass_index = len(log["bench"]) // len(GPU_IMPLS) % len(bench.PASSES)
        leaves = call.get("grad_to_none") or []
        log["bench"].append({**call, "impl": impl, "grads": [t.grad is not None for t in leaves]})
        return STUB_MS[impl] * (1 + pass_index)

    def max_memory_allocated():
        log["peak_calls"] += 1
        return (100 + log["peak_calls"]) * 2**20

    real_compile, real_is_available = torch.compile, torch.cuda.is_available

    def compile_without_inductor(fn, **kwargs):
        log["compiles"] += 1
        compiled = real_compile(fn, backend="aot_eager", **kwargs)

        def call(*args):  # dynamo itself probes CUDA when it says it is there: not while compiling
            torch.cuda.is_available = real_is_available
            try:
                return compiled(*args)
            finally:
                torch.cuda.is_available = lambda: True
        return call

    monkeypatch.setattr(bench, "CUDA_DEVICE", "cpu")
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch, "compile", compile_without_inductor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Stub GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: max_memory_allocated())
    return log


def test_cuda_branch_dry_run_tables_relates_and_writes_every_impl(tmp_path, monkeypatch, capsys, fake_cuda):
    grid = {"layers": [("tiny", 8, 12)], "members": [2], "rows": [4, 8]}
    monkeypatch.setattr(bench, "QUICK", grid)
    monkeypatch.setattr(bench, "COMPUTE_BOUND_ROWS", 8)
    prefix = tmp_path / "gpu"
    assert bench.main(["--quick", "--dtype", "bf16", "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out

    cases = [(rows, pass_) for rows in (4, 8) for pass_ in bench.PASSES]
    # do_bench: median, gradients reset between runs, backward run only in fwd+bwd.
    assert len(fake_cuda["bench"]) == len(cases) * len(GPU_IMPLS)
    for index, call in enumerate(fake_cuda["bench"]):
        assert call["return_mode"] == "median" and len(call["grad_to_none"]) == 5
        backward = index // len(GPU_IMPLS) % 2 == 1
        if call["impl"] == "floor":  # the plain matmul differentiates x and W only
            assert call["grads"] == [backward, backward, False, False, False]
        else:
            assert call["grads"] == [backward] * 5
    assert fake_cuda["compiles"] == 2  # one fresh torch.compile per case

    records = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["rows"], r["pass"], r["impl"]) for r in records] == [
        (rows, pass_, impl) for rows, pass_ in cases for impl in GPU_IMPLS
    ]
    for index, r in enumerate(records):
        scale = 1 + bench.PASSES.index(r["pass"])
        assert r["dtype"] == "bf16" and r["layer"] == "tiny" and r["members"] == 2
        assert r["ms"] == STUB_MS[r["impl"]] * scale
        assert r["speedup_vs_eager"] == pytest.approx(STUB_MS["eager"] / STUB_MS[r["impl"]])
        assert r["ratio_to_floor"] == pytest.approx(STUB_MS[r["impl"]] / STUB_MS["floor"])
        assert r["peak_mib"] == index + 1  # max_memory_allocated grows 1 MiB per call above the base
        work = 2 * 2 * r["rows"] * 8 * 12 * (1 if r["pass"] == "fwd" else 3)
        assert r["tflops"] == pytest.approx(work / (r["ms"] * 1e-3) / 1e12)
        assert r["gbps"] == pytest.approx(
            bench.compulsory_bytes(2, r["rows"], 8, 12, r["pass"], 2) / (r["ms"] * 1e-3) / 1e9)
    with open(tmp_path / "gpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["rows"]), r["pass"], r["impl"]) for r in rows] == [(r["rows"], r["pass"], r["impl"]) for r in records]
    assert [float(r["ratio_to_floor"]) for r in rows] == pytest.approx([r["ratio_to_floor"] for r in records])

    assert "Stub GPU" in printed and "No CUDA" not in printed
    assert "max relative error bf16 " in printed  # the dtype timed is the dtype checked
    assert sum(line.startswith("tiny ") for line in printed.splitlines()) == len(records)
    summary = {line.split(":")[0]: line for line in printed.splitlines() if line.startswith("bf16 ")}
    # Means over the grid: eager 3 / fused 2, compiled 4 / fused 2, fused 2 / floor 1 (rows 8 only),
    # folded 1.5 / fused 2 (a speed-up below 1: folded was faster);
    # the fused kernel's peak is below eager's in both cases (peaks grow in call order).
    # Only bf16 fwd+bwd is judged against issue 3's targets.
    assert summary["bf16 fwd+bwd"] == (
        "bf16 fwd+bwd: speed-up over eager 1.50x (meets target >= 1.5), over torch.compile 2.00x "
        "(meets target >= 1.2), ratio to floor (M >= 8) 2.00 (MISSES target <= 1.15), over folded 0.75x, "
        "peak memory above eager in 0/2 shapes (meets target <= 0)"
    )
    assert summary["bf16 fwd"] == (
        "bf16 fwd: speed-up over eager 1.50x, over torch.compile 2.00x, ratio to floor (M >= 8) 2.00, "
        "over folded 0.75x, peak memory above eager in 0/2 shapes"
    )


def test_cuda_branch_keeps_the_finished_cases_when_stopped(tmp_path, monkeypatch, capsys, fake_cuda):
    """A run stopped by Ctrl-C: the cases timed before it are already on disk, in a new directory."""
    import triton.testing

    grid = {"layers": [("tiny", 8, 12)], "members": [2], "rows": [4, 8]}
    monkeypatch.setattr(bench, "QUICK", grid)
    stub = triton.testing.do_bench
    per_case = len(GPU_IMPLS) * len(bench.PASSES)

    def stopped_in_second_case(fn, **kwargs):
        if len(fake_cuda["bench"]) == per_case:
            raise KeyboardInterrupt
        return stub(fn, **kwargs)

    monkeypatch.setattr(triton.testing, "do_bench", stopped_in_second_case)
    prefix = tmp_path / "not-yet" / "gpu"
    assert bench.main(["--quick", "--dtype", "fp32", "--out", str(prefix)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted; {prefix}.json and {prefix}.csv keep the 1 case(s) timed before it")
    records = json.loads((tmp_path / "not-yet" / "gpu.json").read_text())
    assert [(r["rows"], r["impl"]) for r in records] == [(4, impl) for _ in bench.PASSES for impl in GPU_IMPLS]
    with open(tmp_path / "not-yet" / "gpu.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == per_case


def test_cuda_branch_stops_before_timing_a_wrong_kernel(tmp_path, monkeypatch, capsys, fake_cuda):
    errors = {torch.float32: 1e-6, torch.bfloat16: 0.25}
    monkeypatch.setattr(bench, "correctness_check", lambda device, dtype: errors[dtype])
    assert bench.main(["--quick", "--out", str(tmp_path / "gpu")]) == 1
    assert "disagrees with the reference in bf16 (relative error 2.50e-01 > 3e-02)" in capsys.readouterr().err
    assert fake_cuda["bench"] == [] and not list(tmp_path.iterdir())


def test_layers_option_times_only_the_named_layers(tmp_path, monkeypatch, capsys, fake_cuda):
    layers = [("wide", 8, 12), ("narrow", 12, 8)]
    monkeypatch.setattr(bench, "LAYERS", layers)
    monkeypatch.setattr(bench, "QUICK", {"layers": layers, "members": [2], "rows": [4]})
    assert bench.main(["--quick", "--dtype", "fp32", "--layers", "narrow", "--out", str(tmp_path / "part")]) == 0
    records = json.loads((tmp_path / "part.json").read_text())
    assert {(r["layer"], r["d_in"], r["d_out"]) for r in records} == {("narrow", 12, 8)}
    assert len(records) == len(GPU_IMPLS) * len(bench.PASSES)
    with pytest.raises(SystemExit):
        bench.main(["--layers", "lstm-500"])
    assert "invalid choice: 'lstm-500'" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--rows", "-1"], "argument --rows: must be >= 1, got -1"),
    (["--members", "4", "0"], "argument --members: must be >= 1, got 0"),
    (["--rows", "many"], "argument --rows: invalid positive_int value: 'many'"),
])
def test_sizes_must_be_positive(tmp_path, capsys, monkeypatch, flags, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the arguments were accepted")

    monkeypatch.setattr(bench, "run_grid", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*flags, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m kernels.bench: error: {message}"
    assert not list(tmp_path.iterdir())


def must_not_run(*args, **kwargs):
    raise AssertionError("ran although the output cannot be written")


def tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("layout", ["parent is a file", "json is a directory", "csv is a directory"])
def test_unwritable_out_is_refused_before_checking_or_timing(tmp_path, capsys, monkeypatch, layout):
    monkeypatch.setattr(bench, "_interpreted_correctness_check", must_not_run)
    monkeypatch.setattr(bench, "run_grid", must_not_run)
    if layout == "parent is a file":
        (tmp_path / "f").write_text("a file, not a directory")
        prefix = tmp_path / "f" / "x"
        bad, reason = f"{prefix}.json", f"{tmp_path / 'f'} is not a directory"
    else:
        ext = layout.split()[0]
        (tmp_path / f"dd.{ext}").mkdir()
        prefix = tmp_path / "dd"
        bad, reason = f"{prefix}.{ext}", "it is a directory"
    before = tree(tmp_path)
    assert bench.main(["--quick", "--out", str(prefix)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {bad} ({reason}); pick another --out\n"
    assert tree(tmp_path) == before  # not even the probe file


def test_write_failure_mid_run_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """The paths passed the check, then something took the name of OUT.json while timing."""
    monkeypatch.setattr(bench, "CPU_QUICK", TINY_GRID)
    monkeypatch.setattr(bench, "_interpreted_correctness_check", lambda: 0.0)

    def timer(fn, leaves):
        (tmp_path / "out.json").mkdir(exist_ok=True)
        return 1.0, float("nan")

    monkeypatch.setattr(bench, "_time_cpu", timer)
    prefix = tmp_path / "out"
    assert bench.main(["--quick", "--dtype", "fp32", "--out", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: cannot write {prefix}.json (Is a directory); pick another --out"
    assert "Traceback" not in err
    assert tree(tmp_path) == ["out.json"]  # the directory only: no temporary file, no CSV


@pytest.mark.parametrize("stop_at_call,message", [
    (0, "error: interrupted before the first case was timed; nothing was written"),
    (4, "error: interrupted; {prefix}.json and {prefix}.csv keep the 1 case(s) timed before it"),  # 2nd case
    (12, "error: interrupted; {prefix}.json and {prefix}.csv keep the 3 case(s) timed before it"),  # 4th case
])
def test_ctrl_c_exits_130_with_one_line_saying_what_was_kept(tmp_path, capsys, monkeypatch, stop_at_call, message):
    monkeypatch.setattr(bench, "CPU_QUICK", {**TINY_GRID, "rows": [4, 8], "members": [1, 2]})
    monkeypatch.setattr(bench, "_interpreted_correctness_check", lambda: 0.0)
    calls = []

    def timer(fn, leaves):  # 4 calls a case on the CPU: eager and folded, forward and backward
        if len(calls) == stop_at_call:
            raise KeyboardInterrupt
        calls.append(fn)
        return 1.0, float("nan")

    monkeypatch.setattr(bench, "_time_cpu", timer)
    prefix = tmp_path / "out"
    assert bench.main(["--quick", "--dtype", "fp32", "--out", str(prefix)]) == 130
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == message.format(prefix=prefix)
    assert "Traceback" not in captured.err and "wrote" not in captured.out
    if stop_at_call == 0:
        assert tree(tmp_path) == []
    else:
        assert tree(tmp_path) == ["out.csv", "out.json"]  # no temporary file
        records = json.loads((tmp_path / "out.json").read_text())
        assert len(records) == stop_at_call and len({(r["members"], r["rows"]) for r in records}) == stop_at_call // 4


def test_ctrl_c_while_writing_leaves_the_previous_files_whole(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "CPU_QUICK", {**TINY_GRID, "rows": [4, 8]})
    monkeypatch.setattr(bench, "_interpreted_correctness_check", lambda: 0.0)
    monkeypatch.setattr(bench, "_time_cpu", lambda fn, leaves: (1.0, float("nan")))
    real_writer, writes = csv.DictWriter, []

    class StoppedOnSecondWrite(real_writer):
        def writerows(self, rows):
            writes.append(rows)
            if len(writes) == 2:
                super().writerows(rows[:1])  # a partial temporary file
                raise KeyboardInterrupt
            super().writerows(rows)

    monkeypatch.setattr(csv, "DictWriter", StoppedOnSecondWrite)
    prefix = tmp_path / "out"
    assert bench.main(["--quick", "--dtype", "fp32", "--out", str(prefix)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted; {prefix}.json and {prefix}.csv keep the 1 case(s) timed before it")
    assert tree(tmp_path) == ["out.csv", "out.json"]
    with open(tmp_path / "out.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # the first case's, whole
    assert len(json.loads((tmp_path / "out.json").read_text())) == 4  # not replaced alone: the two agree


def test_check_writable_names_the_problem_and_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    refused = {
        tmp_path / "dir": "(it is a directory); pick another --x",
        tmp_path / "file" / "a" / "b.json": f"({tmp_path / 'file'} is not a directory); pick another --x",
        tmp_path / "missing" / "b.json":
            f"(directory {tmp_path / 'missing'} does not exist); create it or pick another --x",
    }
    for path, reason in refused.items():
        with pytest.raises(cli.OutputError) as error:
            cli.check_writable(str(path), "--x")
        assert str(error.value) == f"cannot write {path} {reason}"
    assert tree(tmp_path) == ["dir", "file"]

    cli.check_writable(str(tmp_path / "new" / "deeper" / "b.json"), "--x", make_parent=True)
    assert tree(tmp_path) == ["dir", "file", "new", "new/deeper"]  # the directories only, as the tool would
    monkeypatch.chdir(tmp_path)
    cli.check_writable("relative.json", "--x")  # the default --out: a bare name in the working directory
    (tmp_path / "file").write_text("an existing output is replaced, not refused")
    cli.check_writable(str(tmp_path / "file"), "--x")
    assert tree(tmp_path) == ["dir", "file", "new", "new/deeper"]
