"""Without Triton (it ships for Linux only: macOS, Windows) the stack trains and evaluates on the
eager path, and asking for the kernels says what is missing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
sys.modules["triton.language"] = None
sys.path.insert(0, {repo!r})
import torch
import kernels
import train_lm

x, w, r, s = torch.randn(2, 5, 7), torch.randn(3, 7), torch.randn(2, 3), torch.randn(2, 7)
try:
    kernels.rank1_linear(x, w, r, s, impl="triton")
    sys.exit("impl='triton' ran without Triton")
except ValueError as e:
    print(e)
code = train_lm.main(sys.argv[1:])
assert sys.modules["triton"] is None  # nothing imported Triton some other way
sys.exit(code)
"""

TINY = ["data.synthetic_bytes=40000", "train.batch_size=4", "train.seq_len=16", "train.max_steps=4",
        "train.eval_every=4", "train.eval_bytes=400", "checkpoint.every=4", "late_phase.K=2", "late_phase.T0=2",
        "late_phase.schedule=parallel", "swa.enabled=false", "eval.batch_size=4"]


@pytest.mark.parametrize("model", [
    # the LSTM's fused all-members path: kernels.rank1_linear and kernels.rank1_lstm
    ["model.embed_dim=8", "model.hidden_size=16", "model.lstm_members=fused"],
    ["model.family=transformer", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16",
     "eval.context=16", "eval.stride=8"],
], ids=["lstm_fused", "transformer"])
def test_training_without_triton_takes_the_eager_path(tmp_path, model):
    # TRITON_INTERPRET=1 (set by conftest.py) stays set: without Triton it must not matter.
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON.format(repo=str(REPO)), "--config", str(REPO / "configs" / "smoke.yaml"),
         f"run.out_dir={out}", f"data.dir={tmp_path / 'data'}", *TINY, *model],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("rank1_linear: impl='triton' needs Triton, which is not installed")
    results = json.loads((out / "results.json").read_text())
    assert 0 < results["test"]["averaged"] < 9 and 0 < results["test"]["ensemble"] < 9


def test_the_compile_check_says_triton_is_missing():
    script = ('import sys, runpy; sys.modules["triton"] = None; sys.argv = ["kernels.compile_check"]; '
              'runpy.run_module("kernels.compile_check", run_name="__main__")')
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: Triton is not installed") and proc.stderr.count("\n") == 1
