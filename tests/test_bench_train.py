"""lm.bench_train: runs both loops and reports both numbers (no timing assertions)."""
from __future__ import annotations

import re
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

import lm.bench_train as bench_train
from lm.config import Config, ModelConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")


def tiny_overrides(tmp_path: Path) -> list[str]:
    return [f"data.dir={tmp_path / 'data'}", "data.synthetic_bytes=60000", "train.batch_size=8",
            "train.seq_len=16", "model.embed_dim=8", "model.hidden_size=16", "late_phase.K=3"]


def test_cli_prints_minimal_loop_ours_and_late_phase_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels are tested in test_rank1; here only the loop runs
    code = bench_train.main(["--config", SMOKE, "--steps", "2", "--warmup", "2", "--repeats", "1",
                             "--profile", "1", *tiny_overrides(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = dict(re.findall(r"^(.+?)\s+([\d,]+) chars/s", out, flags=re.M))
    assert set(rows) == {"minimal loop (plain)", "ours: plain", "ours: late_phase sequential (K=3)",
                         "ours: late_phase parallel (K=3), fused, batch 6",
                         "ours: late_phase parallel (K=3), folded, batch 6"}
    assert all(int(v.replace(",", "")) > 0 for v in rows.values())
    assert re.search(r"ours: plain .* [\d.]+x the minimal loop", out)
    assert re.search(r"sequential .* [\d.]+x plain", out)
    assert re.search(r"parallel .* cost per byte [\d.]+x plain", out)
    assert "note: model.lstm_members=auto takes folded for the parallel schedule here (16 hidden units on cpu)" in out
    # --profile: one operator table per variant, after the figures
    assert len(re.findall(r"^note: profile of .+, 1 steps:$", out, flags=re.M)) == len(rows)
    assert "Self CPU" in out


def test_measured_chars_per_second_is_bytes_over_wall_time(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: next(clock))
    sizes = iter([300, 200, 500])
    assert bench_train.measure_chars_per_second(lambda: next(sizes), 3, bench_train.torch.device("cpu")) == 1000 / 2.5


def test_rounds_far_apart_are_flagged():
    assert bench_train.spread_note({"plain": [100.0, 95.0, 91.0], "sequential": [80.0]}) is None  # 9% apart
    note = bench_train.spread_note({"plain": [100.0, 95.0], "parallel": [50.0, 40.0, 49.0]})
    assert note.startswith("rounds of parallel differ by 20% (slowest vs fastest)")


def test_variants_time_the_late_phase_itself(tmp_path):
    cfg = load_config(SMOKE, tiny_overrides(tmp_path) + ["train.batch_size=10", "swa.enabled=true"])
    variants = bench_train.variants(cfg)
    assert list(variants) == ["plain", "late_phase sequential (K=3)", "late_phase parallel (K=3), fused, batch 9",
                              "late_phase parallel (K=3), folded, batch 9"]
    assert variants["plain"].late_phase.mode == "plain"
    assert [v.model.lstm_members for v in variants.values()] == ["auto", "auto", "fused", "folded"]
    for name, variant in variants.items():
        assert not variant.swa.enabled
        if name != "plain":
            assert variant.late_phase.T0 == 1 and variant.late_phase.schedule in name
    assert cfg.late_phase.mode == "late_phase" and cfg.train.batch_size == 10  # the input is not changed
    # On CUDA the fused way is also timed without its CUDA graphs.
    on_cuda = bench_train.variants(cfg, "cuda")
    assert list(on_cuda)[-1] == "late_phase parallel (K=3), fused, no CUDA graphs, batch 9"
    assert [(v.model.lstm_members, v.model.lstm_cuda_graphs) for v in on_cuda.values()][2:] == [
        ("fused", True), ("folded", True), ("fused", False)]
    # The Transformer's linear layers: one parallel way on the CPU, fused and folded on CUDA.
    tf = load_config(str(REPO / "configs" / "enwik8_transformer_late_phase_parallel.yaml"),
                     tiny_overrides(tmp_path) + ["train.batch_size=6"])
    assert [v.model.linear_members for v in bench_train.variants(tf).values()] == ["auto"] * 3
    assert {name: v.model.linear_members for name, v in bench_train.variants(tf, "cuda").items()} == {
        "plain": "auto", "late_phase sequential (K=3)": "auto",
        "late_phase parallel (K=3), fused": "fused", "late_phase parallel (K=3), folded": "folded"}


def test_minimal_loop_is_the_trainers_plain_step_written_by_hand(tmp_path, monkeypatch):
    """Same model, batches and update: after a few steps both hold the same weights, so the
    benchmark compares the same work."""
    from lm.trainer import Trainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = bench_train.variants(load_config(SMOKE, tiny_overrides(tmp_path)))["plain"]
    cfg.run.out_dir = str(tmp_path / "run")
    trainer = Trainer(cfg)
    minimal = bench_train.MinimalLoop(cfg, trainer.splits["train"], trainer.byte_lengths, trainer.accelerator.device)
    initial = {name: w.clone() for name, w in minimal.model.state_dict().items()}
    assert [minimal() for _ in range(4)] == [trainer.train_step() for _ in range(4)] == [8 * 16] * 4
    ours = trainer.unwrapped.state_dict()
    for name, weight in minimal.model.state_dict().items():
        assert not torch.equal(weight, initial[name]), name
        torch.testing.assert_close(weight, ours[name], msg=name)


def test_bad_config_is_one_line_error(tmp_path, capsys):
    assert bench_train.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        bench_train.main([])


def test_transformer_flops_per_token_by_hand():
    cfg = Config()
    cfg.model = ModelConfig(family="transformer", vocab_size=256, d_model=16, n_layers=1, n_heads=2, mlp_ratio=4)
    cfg.train.seq_len = 8
    # weights: qkv 16x48 + out 16x16 + fc 16x64 + proj 64x16 + head 16x256 = 7168; attention 12 x 1 x 16 x 8
    assert bench_train.transformer_flops_per_token(cfg) == 6 * 7168 + 12 * 16 * 8


def test_report_gives_ratios_and_mfu():
    results = {"minimal loop (plain)": 2000.0, "plain": 1800.0, "late_phase sequential (K=4)": 1620.0,
               "late_phase parallel (K=4)": 1500.0}
    lines = bench_train.format_report(results, flops_per_byte=1e9, peak=100.0).splitlines()
    assert "0.900x the minimal loop" in lines[1] and "MFU 1.8%" in lines[1]  # 1800 x 1e9 / 1e14
    assert "0.900x plain" in lines[2] and "cost per byte 1.200x plain" in lines[3]
    assert "MFU" not in bench_train.format_report(results)


def test_launched_on_several_processes_is_one_line_error(capsys, monkeypatch):
    # Under torchrun each process would time its share of the batch against a whole-batch minimal loop.
    monkeypatch.setattr(bench_train, "make_accelerator", lambda *args: SimpleNamespace(num_processes=2))
    assert bench_train.main(["--config", SMOKE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 were launched" in err and "without torchrun" in err


@pytest.mark.parametrize("flag", ["--steps", "--repeats"])
def test_counts_must_be_positive(capsys, flag):
    with pytest.raises(SystemExit) as info:
        bench_train.main(["--config", SMOKE, flag, "0"])
    assert info.value.code == 2 and f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def not_run(*args, **kwargs):
    raise AssertionError("the benchmark ran despite a bad flag")


@pytest.mark.parametrize("flags,message", [
    (["--warmup", "1"], "--warmup must be >= 2 (the late phase starts at step 1), got 1"),
    (["--profile", "-1"], "--profile must be >= 0 (0: no profile), got -1"),
])
def test_a_bad_warmup_or_profile_names_only_that_flag(capsys, monkeypatch, flags, message):
    monkeypatch.setattr(bench_train, "bench", not_run)
    assert bench_train.main(["--config", SMOKE, *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf"])
def test_peak_tflops_must_be_a_positive_number(capsys, monkeypatch, value):
    monkeypatch.setattr(bench_train, "bench", not_run)
    with pytest.raises(SystemExit) as info:
        bench_train.main(["--config", SMOKE, "--peak-tflops", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument --peak-tflops: must be a finite number > 0, got {value}\n" in err
    assert bench_train.positive_float("989.4") == 989.4


def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch):
    import os
    import signal
    import time

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while timing
        time.sleep(5)  # the KeyboardInterrupt ends this
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(bench_train, "bench", interrupted)
    try:
        code = bench_train.main(["--config", SMOKE])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped lm.bench_train.main (a traceback for the user)")
    out, err = capsys.readouterr()
    assert (code, out, err) == (130, "", "error: interrupted\n")
