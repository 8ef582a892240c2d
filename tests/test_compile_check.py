"""Every kernel (rank-1 linear, LSTM step) and autotune config compiles for the H100 (sm_90) and A100 (sm_80).

The CPU interpreter runs kernels the GPU compiler would reject, so the interpreted tests
alone cannot show that the kernels build on a GPU. `kernels.compile_check` compiles them
ahead of time with `triton.compile(..., target=GPUTarget(...))`, which needs no GPU. It runs
in a subprocess because under TRITON_INTERPRET=1 (set for this process by conftest.py)
`triton.jit` yields interpreter functions that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import compile_check, lstm, rank1
from kernels.compile_check import MATMUL_KERNELS
from kernels.optional_triton import TRITON_INSTALLED

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="compiles Triton kernels, and Triton is not installed")


def test_every_kernel_and_config_compiles_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--jobs", "2", "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(report.read_text())

    n_configs = (len(rank1.FORWARD_CONFIGS) + len(rank1.DX_CONFIGS) + len(rank1.DW_CONFIGS)
                 + len(lstm.STEP_FWD_CONFIGS) + len(lstm.STEP_BWD_CONFIGS))
    # Every config x (fp32, bf16) x (sm_90, sm_80), plus the first config of each of the five
    # kernels with sizes that are multiples of 4 only (bf16, both archs), and with the other
    # value of every launch flag (fp32, both archs).
    assert len(results) == n_configs * 2 * 2 + 5 * 2 + 5 * 2
    assert {r["kernel"] for r in results} == MATMUL_KERNELS
    assert all(r["ok"] for r in results)
    assert len([r for r in results if r["flags"] == "other"]) == 5 * 2
    # Every matmul main loop is software-pipelined (cp.async copies), also when the sizes are
    # not multiples of 16 (the LSTM's d_in = 500), thanks to the kernels' ALIGN hints.
    assert all(r["pipelined"] for r in results if r["kernel"] in MATMUL_KERNELS and r["flags"] == "main")
    forward_bf16_sm90 = [r for r in results if (r["kernel"], r["dtype"], r["arch"]) == ("forward", "bf16", 90)]
    assert len(forward_bf16_sm90) == len(rank1.FORWARD_CONFIGS) + 1
    assert all(r["wgmma"] for r in forward_bf16_sm90)
    # Ampere has no wgmma: the check really reads the generated PTX.
    assert not any(r["wgmma"] for r in results if r["arch"] == 80)


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_jobs_must_be_positive(capsys, monkeypatch, jobs):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the arguments were accepted")

    monkeypatch.setattr(compile_check, "run_checks", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        compile_check.main(["--jobs", jobs])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m kernels.compile_check: error: argument --jobs: must be >= 1, got {jobs}")


def must_not_run(*args, **kwargs):
    raise AssertionError("compiled although the report cannot be written")


@pytest.mark.parametrize("layout", ["missing directory", "directory"])
def test_unwritable_json_is_refused_before_compiling(tmp_path, capsys, monkeypatch, layout):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set for this process by conftest.py
    monkeypatch.setattr(compile_check, "run_checks", must_not_run)
    if layout == "missing directory":
        report = tmp_path / "missing" / "x.json"
        reason = f"directory {tmp_path / 'missing'} does not exist); create it or pick another --json"
    else:
        report = tmp_path / "x.json"
        report.mkdir()
        reason = "it is a directory); pick another --json"
    assert compile_check.main(["--json", str(report)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {report} ({reason}\n"
    assert [p.name for p in tmp_path.iterdir()] == ([] if layout == "missing directory" else ["x.json"])


def test_write_failure_after_compiling_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """The path passed the check, then something took its name during the compile."""
    report = tmp_path / "x.json"

    def run_checks(archs, jobs):
        report.mkdir()
        return [compile_check.CompileResult("forward", "M64-N64-K32-w4-s3", "bf16", 80, "aligned16", "main",
                                            ok=True, fits=True, pipelined=True)]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(compile_check, "run_checks", run_checks)
    assert compile_check.main(["--arch", "80", "--json", str(report)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: cannot write {report} (Is a directory); pick another --json\n"
    assert "M64-N64-K32-w4-s3" in captured.out  # the table was printed before the write
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file


def test_ctrl_c_while_compiling_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(archs, jobs):
        raise KeyboardInterrupt

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(compile_check, "run_checks", interrupted)
    assert compile_check.main(["--json", str(tmp_path / "x.json")]) == 130
    assert capsys.readouterr().err == "error: interrupted while compiling; nothing was written\n"
    assert not list(tmp_path.iterdir())
