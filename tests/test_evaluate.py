"""lm.evaluate: coverage, exact totals against float64 references, ensembles, processes, CLI.

The core tests use small stand-in models that follow the model forward contract
(`model(inputs, state=None, member=0) -> (logits, state)`, member="all" -> (K, B, T, V)),
so evaluation is checked independently of lm.models.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.batches import stream_eval_batches, window_eval_batches
from lm.evaluate import EvalResult, evaluate_bpc

REPO = Path(__file__).resolve().parents[1]


class TinyLSTM(nn.Module):
    """K members, each with its own recurrent cell, so per-member state really matters."""

    def __init__(self, vocab: int, members: int = 1, dim: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cells = nn.ModuleList(nn.LSTM(dim, dim, batch_first=True) for _ in range(members))
        self.head = nn.Linear(dim, vocab)
        self.modes_seen: set[bool] = set()

    def forward(self, inputs, state=None, member=0):
        self.modes_seen.add(self.training)
        if member == "all":
            runs = [self.forward(inputs, None if state is None else state[k], k) for k in range(len(self.cells))]
            return torch.stack([logits for logits, _ in runs]), [s for _, s in runs]
        out, state = self.cells[member](self.embed(inputs), state)
        return self.head(out), state


class TinyCausal(nn.Module):
    """One causal attention layer with learned positions: each window's context changes the output."""

    def __init__(self, vocab: int, members: int = 1, dim: int = 12, max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = nn.ModuleList(nn.Linear(dim, vocab) for _ in range(members))

    def forward(self, inputs, state=None, member=0):
        T = inputs.shape[1]
        x = self.embed(inputs) + self.pos[:T]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()
        h = x + torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        if member == "all":
            return torch.stack([head(h) for head in self.heads]), None
        return self.heads[member](h), None


def unique_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    """A split whose token values are all different, so a value tells its position."""
    return np.random.default_rng(seed).permutation(vocab)[:n].astype(np.uint16)


def float64_nats(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, member, members: int = 1):
    """-log p(target) per position, from a float64 copy of the model on one sequence (1, T);
    member "ensemble": log of the mean of the `members` members' probabilities, each run on its own."""
    ref = copy.deepcopy(model).double()
    if member == "ensemble":
        log_ps = torch.stack([torch.log_softmax(ref(inputs, member=k)[0], -1) for k in range(members)])
        log_p = torch.logsumexp(log_ps, dim=0) - math.log(members)
    else:
        logits, _ = ref(inputs, member=member)
        log_p = torch.log_softmax(logits, -1)
    return -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def scored_positions(batches, data: np.ndarray):
    """(target position, context length in the row) of every scored target; checks each row's inputs
    are the contiguous tokens before its targets."""
    where = {int(v): i for i, v in enumerate(data)}
    seen = []
    for b in batches:
        for row in range(b.inputs.shape[0]):
            cols = torch.nonzero(b.mask[row]).flatten().tolist()
            if not cols:
                continue
            start = where[int(b.inputs[row, 0])]
            span = cols[-1] + 1
            assert b.inputs[row, :span].tolist() == data[start : start + span].tolist()
            assert b.targets[row, :span].tolist() == data[start + 1 : start + 1 + span].tolist()
            seen += [(start + 1 + c, c + 1) for c in cols]
    return seen


@pytest.mark.parametrize("n", [997, 50, 6])
def test_lstm_streams_score_every_target_once(n):
    data = unique_tokens(n, 1000, seed=n)
    positions = [p for p, _ in scored_positions(stream_eval_batches(data, 4, 16), data)]
    assert sorted(positions) == list(range(1, n))
    result = evaluate_bpc(TinyLSTM(1000), data, family="lstm", batch_size=4, seq_len=16, min_stream_tokens=1)
    assert result.n_targets == result.n_bytes == n - 1


@pytest.mark.parametrize("n,context,stride", [(997, 16, 5), (203, 16, 16), (9, 16, 4)])
def test_transformer_windows_score_every_target_once_with_context(n, context, stride):
    data = unique_tokens(n, 1000, seed=n)
    seen = scored_positions(window_eval_batches(data, 3, context, stride), data)
    assert sorted(p for p, _ in seen) == list(range(1, n))
    # Past the first window every target sees at least context - stride + 1 tokens.
    assert all(ctx >= min(p, context - stride + 1) for p, ctx in seen)
    result = evaluate_bpc(TinyCausal(1000), data, family="transformer", batch_size=3, context=context, stride=stride)
    assert result.n_targets == result.n_bytes == n - 1


def test_byte_split_counts_every_byte_but_the_first():
    data = np.random.default_rng(1).integers(0, 256, size=1234, dtype=np.uint8)
    result = evaluate_bpc(TinyLSTM(256), data, family="lstm", batch_size=5, seq_len=32)
    assert result.n_bytes == result.n_targets == 1233
    assert result.bpc == pytest.approx(result.nats / 1233 / math.log(2), rel=1e-12)


def test_lstm_single_stream_equals_one_full_pass_in_float64():
    torch.manual_seed(0)
    data = np.random.default_rng(2).integers(0, 256, size=701, dtype=np.uint8)
    model = TinyLSTM(256)
    result = evaluate_bpc(model, data, family="lstm", batch_size=1, seq_len=37)
    seq = torch.from_numpy(data.astype(np.int64))
    nats = float64_nats(model, seq[None, :-1], seq[None, 1:], member=0).sum().item()
    assert result.nats == pytest.approx(nats, rel=1e-6)
    assert result.bpc == pytest.approx(nats / 700 / math.log(2), rel=1e-6)


def test_lstm_streams_carry_state_like_independent_full_passes():
    torch.manual_seed(1)
    data = unique_tokens(611, 1000, seed=3)
    model = TinyLSTM(1000)
    where = {int(v): i for i, v in enumerate(data)}
    streams: dict[int, list[int]] = {}  # row -> scored target positions, in order
    for b in stream_eval_batches(data, 4, 16):
        for row in range(4):
            cols = torch.nonzero(b.mask[row]).flatten().tolist()
            streams.setdefault(row, []).extend(where[int(b.targets[row, c])] for c in cols)
    seq = torch.from_numpy(data.astype(np.int64))
    reference = 0.0
    for positions in streams.values():
        if positions:
            first, last = positions[0], positions[-1]
            assert positions == list(range(first, last + 1))  # a stream is one contiguous piece
            reference += float64_nats(model, seq[None, first - 1 : last], seq[None, first : last + 1], 0).sum().item()
    result = evaluate_bpc(model, data, family="lstm", batch_size=4, seq_len=16, min_stream_tokens=1)
    assert result.nats == pytest.approx(reference, rel=1e-6)


def float64_window_nats(model, data, context, stride):
    """The scored nats of every sliding window, one window at a time in float64."""
    reference = 0.0
    for b in window_eval_batches(data, 1, context, stride):
        reference += float64_nats(model, b.inputs, b.targets, 0)[0][b.mask[0]].sum().item()
    return reference


def test_transformer_equals_float64_on_the_same_windows():
    torch.manual_seed(2)
    data = np.random.default_rng(4).integers(0, 256, size=517, dtype=np.uint8)
    model = TinyCausal(256)
    reference = float64_window_nats(model, data, 24, 7)
    result = evaluate_bpc(model, data, family="transformer", batch_size=3, context=24, stride=7)
    assert result.n_bytes == 516
    assert result.nats == pytest.approx(reference, rel=1e-6)
    assert result.bpc == pytest.approx(reference / 516 / math.log(2), rel=1e-6)


def test_ensemble_is_log_of_mean_member_probabilities():
    torch.manual_seed(3)
    data = np.random.default_rng(5).integers(0, 256, size=300, dtype=np.uint8)
    model = TinyLSTM(256, members=3)
    seq = torch.from_numpy(data.astype(np.int64))
    ref = copy.deepcopy(model).double()
    probs = torch.stack([torch.softmax(ref(seq[None, :-1], member=k)[0], -1) for k in range(3)])
    picked = probs.mean(0).gather(-1, seq[None, 1:, None]).squeeze(-1)  # mean of probabilities, by hand
    reference = -torch.log(picked).sum().item()
    ensemble = evaluate_bpc(model, data, family="lstm", member="ensemble", batch_size=1, seq_len=29)
    assert ensemble.nats == pytest.approx(reference, rel=1e-6)
    members = [evaluate_bpc(model, data, family="lstm", member=k, batch_size=1, seq_len=29) for k in range(3)]
    # Jensen: the ensemble beats the members' mean log-likelihood, so averaging logs would be caught.
    assert ensemble.nats < sum(m.nats for m in members) / 3 - 1e-3
    for k, m in enumerate(members):
        assert m.nats == pytest.approx(float64_nats(model, seq[None, :-1], seq[None, 1:], k).sum().item(), rel=1e-6)


def test_real_late_phase_lstm_ensemble_carries_every_members_state(monkeypatch):
    """lm.models' LSTM with member="all": the streamed ensemble equals K independent full passes."""
    from lm.config import LatePhaseConfig, ModelConfig
    from lm.late_phase import spawn_members
    from lm.models import build_model

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # kernels are tested in test_rank1; this is about state
    torch.manual_seed(7)
    model = build_model(ModelConfig(family="lstm", embed_dim=8, hidden_size=16), LatePhaseConfig(mode="late_phase", K=3))
    spawn_members(model, 0.5, torch.Generator().manual_seed(8))
    data = np.random.default_rng(10).integers(0, 256, size=240, dtype=np.uint8)
    seq = torch.from_numpy(data.astype(np.int64))
    result = evaluate_bpc(model, data, family="lstm", member="ensemble", batch_size=1, seq_len=23)
    reference = float64_nats(model, seq[None, :-1], seq[None, 1:], "ensemble", members=3).sum().item()
    assert result.nats == pytest.approx(reference, rel=1e-6)


def test_transformer_ensemble_matches_reference_on_windows():
    torch.manual_seed(4)
    data = np.random.default_rng(6).integers(0, 256, size=200, dtype=np.uint8)
    model = TinyCausal(256, members=2)
    reference = 0.0
    for b in window_eval_batches(data, 2, 16, 6):
        for row in range(b.inputs.shape[0]):
            nats = float64_nats(model, b.inputs[row : row + 1], b.targets[row : row + 1], "ensemble", members=2)[0]
            reference += nats[b.mask[row]].sum().item()
    result = evaluate_bpc(model, data, family="transformer", member="ensemble", batch_size=2, context=16, stride=6)
    assert result.nats == pytest.approx(reference, rel=1e-6)


def test_byte_lengths_weight_tokens_and_max_tokens_truncates():
    torch.manual_seed(5)
    rng = np.random.default_rng(7)
    data = rng.integers(0, 300, size=400).astype(np.uint16)
    lengths = rng.integers(1, 5, size=300).astype(np.int64)
    model = TinyLSTM(300)
    result = evaluate_bpc(model, data, family="lstm", batch_size=2, seq_len=20, byte_lengths=lengths)
    assert result.n_targets == 399
    assert result.n_bytes == int(lengths[data[1:]].sum())
    assert result.bpc == pytest.approx(result.nats / result.n_bytes / math.log(2), rel=1e-12)
    head = evaluate_bpc(model, data, family="lstm", batch_size=2, seq_len=20, byte_lengths=lengths, max_tokens=150)
    assert head.n_targets == 149 and head.n_bytes == int(lengths[data[1:150]].sum())


def test_max_bytes_keeps_the_tokens_that_fit():
    from lm.evaluate import token_limit

    lengths = np.array([1, 3, 2, 5])
    data = np.array([1, 1, 2, 0, 3, 1])  # bytes 3, 3, 2, 1, 5, 3 -> running total 3, 6, 8, 9, 14, 17
    assert [token_limit(data, lengths, n) for n in (2, 3, 8, 13, 14, 100)] == [0, 1, 3, 4, 5, 6]
    assert token_limit(data, lengths, None) is None


def test_evaluation_runs_in_eval_mode_and_restores_train_mode():
    model = TinyLSTM(256)
    model.train()
    data = np.random.default_rng(8).integers(0, 256, size=100, dtype=np.uint8)
    evaluate_bpc(model, data, family="lstm", batch_size=2, seq_len=8)
    assert model.modes_seen == {False} and model.training
    model.eval()
    evaluate_bpc(model, data, family="lstm", batch_size=2, seq_len=8)
    assert not model.training


def test_eval_batch_size_caps_lstm_streams_and_transformer_windows():
    from lm.evaluate import MIN_STREAM_TOKENS, eval_batch_size

    assert MIN_STREAM_TOKENS == 4096
    assert eval_batch_size("lstm", 10_000, 64) == 2  # 9,999 targets: two streams of at least 4,096
    assert eval_batch_size("lstm", 10_000, 1) == 1
    assert eval_batch_size("lstm", 100, 64) == 1  # a split shorter than one stream is one stream
    assert eval_batch_size("lstm", 1001, 64, min_stream_tokens=100) == 10
    assert eval_batch_size("lstm", 1001, 8, min_stream_tokens=100) == 8  # fewer asked for: kept
    data = np.zeros(517, dtype=np.uint8)
    n_windows = sum(1 for _ in window_eval_batches(data, 1, 24, 7))  # one window per batch: counted
    assert n_windows == 72
    assert eval_batch_size("transformer", 517, 100_000, context=24, stride=7) == 72
    assert eval_batch_size("transformer", 517, 3, context=24, stride=7) == 3
    assert eval_batch_size("transformer", 517, 100_000, context=24, stride=7, min_stream_tokens=1) == 72


class RowCounter:
    """Records the rows of every batch a model is called on."""

    def __init__(self, model: nn.Module):
        self.rows: list[int] = []
        model.register_forward_pre_hook(lambda module, args: self.rows.append(args[0].shape[0]))


def test_lstm_huge_batch_runs_one_stream_per_min_stream_tokens():
    """--batch-size 100000 on a short split used to run 100,000 cold streams of under a byte each."""
    torch.manual_seed(8)
    data = np.random.default_rng(12).integers(0, 256, size=701, dtype=np.uint8)
    model = TinyLSTM(256)
    seq = torch.from_numpy(data.astype(np.int64))
    # 700 targets < MIN_STREAM_TOKENS: one stream, the exact sequential pass.
    rows = RowCounter(model).rows
    result = evaluate_bpc(model, data, family="lstm", batch_size=100_000, seq_len=37)
    assert set(rows) == {1}
    assert result.nats == pytest.approx(float64_nats(model, seq[None, :-1], seq[None, 1:], 0).sum().item(), rel=1e-6)
    # With streams of at least 70 targets: 10 streams of 70, each a full pass over its own piece.
    rows.clear()
    result = evaluate_bpc(model, data, family="lstm", batch_size=64, seq_len=37, min_stream_tokens=70)
    assert set(rows) == {10}
    reference = sum(float64_nats(model, seq[None, 70 * j : 70 * j + 70], seq[None, 70 * j + 1 : 70 * j + 71], 0)
                    .sum().item() for j in range(10))
    assert result.n_targets == 700
    assert result.nats == pytest.approx(reference, rel=1e-6)


def test_transformer_batch_is_capped_at_the_windows_there_are():
    """A batch larger than the split's windows used to be padded to its full size (100 GB at 100000)."""
    torch.manual_seed(9)
    data = np.random.default_rng(13).integers(0, 256, size=517, dtype=np.uint8)
    model = TinyCausal(256)
    reference = float64_window_nats(model, data, 24, 7)
    rows = RowCounter(model).rows
    result = evaluate_bpc(model, data, family="transformer", batch_size=1000, context=24, stride=7)
    assert rows == [72]  # 1 + ceil((516 - 24) / 7) windows, in one batch
    assert result.n_bytes == 516
    assert result.nats == pytest.approx(reference, rel=1e-6)


DISTRIBUTED_SCRIPT = """
import json, sys
import numpy as np, torch
from accelerate import Accelerator
from lm.cli import exit_process
from lm.evaluate import evaluate_bpc
from tests.test_evaluate import TinyCausal, TinyLSTM, distributed_cases

accelerator = Accelerator(cpu=True)
out = {name: evaluate_bpc(model, data, accelerator=accelerator, **kw).__dict__ for name, (model, data, kw) in distributed_cases().items()}
if accelerator.is_main_process:
    json.dump({"world": accelerator.num_processes, "results": out}, open(sys.argv[1], "w"))
accelerator.end_training()
exit_process(0)  # as the CLIs do: no interpreter finalisation after a multi-process run
"""


def distributed_cases():
    torch.manual_seed(6)
    rng = np.random.default_rng(9)
    lstm, causal = TinyLSTM(256, members=3), TinyCausal(256, members=2)
    text = rng.integers(0, 256, size=1501, dtype=np.uint8)
    lengths = rng.integers(1, 4, size=256).astype(np.int64)
    return {
        # min_stream_tokens=1: the streams asked for, although this split is shorter than MIN_STREAM_TOKENS.
        "lstm_member": (lstm, text, dict(family="lstm", member=1, batch_size=4, seq_len=33, min_stream_tokens=1)),
        "lstm_ensemble": (lstm, text, dict(family="lstm", member="ensemble", batch_size=6, seq_len=20,
                                           min_stream_tokens=1)),
        # Capped at 1500 // 300 = 5 streams: 3 on one process, 2 on the other.
        "lstm_capped_streams": (lstm, text, dict(family="lstm", member=0, batch_size=64, seq_len=33,
                                                 min_stream_tokens=300)),
        "transformer": (causal, text, dict(family="transformer", member=0, batch_size=4, context=20, stride=7,
                                           byte_lengths=lengths)),
        "transformer_ensemble": (causal, text[:333], dict(family="transformer", member="ensemble", batch_size=2,
                                                          context=20, stride=9)),
        # Capped at the 36 windows there are.
        "transformer_capped_batch": (causal, text[:333], dict(family="transformer", member=0, batch_size=1000,
                                                              context=20, stride=9)),
    }


def test_two_processes_give_the_same_totals_as_one(tmp_path):
    script = tmp_path / "distributed_eval.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world"] == 2
    for name, (model, data, kw) in distributed_cases().items():
        single = evaluate_bpc(model, data, **kw)
        multi = EvalResult(**report["results"][name])
        assert (multi.n_bytes, multi.n_targets) == (single.n_bytes, single.n_targets), name
        assert multi.bpc == pytest.approx(single.bpc, abs=1e-6), name


# --------------------------------------------------------------------------- CLI on run / exported dirs


def make_run_dir(root: Path, *, swa: bool = True, family: str = "lstm",
                 overrides: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A finished run as train_lm.py leaves it (config.yaml, final/ with averaged, members, swa),
    built from lm.models directly with random member factors; returns the models by kind too."""
    import yaml
    from safetensors.torch import save_model

    from data.synthetic import prepare_synthetic
    from lm.config import config_to_dict, load_config
    from lm.late_phase import average_members, spawn_members
    from lm.models import build_model, export

    data_dir = prepare_synthetic(root / "data", 24_000, seed=11)
    # One LSTM stream: the 1,200-byte valid split is shorter than MIN_STREAM_TOKENS, so more would be capped (a note).
    batch = 1 if family == "lstm" else 4
    settings = [f"data.dir={data_dir}", "late_phase.K=3", f"swa.enabled={str(swa).lower()}", f"eval.batch_size={batch}",
                f"model.family={family}", "model.d_model=16", "model.n_heads=2", "model.n_layers=1",
                "model.max_seq_len=64", "train.seq_len=32", "eval.context=32", "eval.stride=16", *overrides]
    cfg = load_config(REPO / "configs" / "smoke.yaml", settings)
    run = root / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    torch.manual_seed(12)
    model = build_model(cfg.model, cfg.late_phase)
    spawn_members(model, 0.5, torch.Generator().manual_seed(13))  # members really differ
    save_model(model, str(run / "final" / "members.safetensors"))
    export(model, cfg, run / "final" / "averaged")
    models = {"members": model, "averaged": average_members(model)}
    if swa:
        models["swa"] = build_model(cfg.model, type(cfg.late_phase)(mode="plain"))
        export(models["swa"], cfg, run / "final" / "swa")
    return run, models


@pytest.fixture(autouse=True)
def eager_rank1(request, monkeypatch):
    """Members run through kernels.rank1_linear; its Triton kernels are tested in test_rank1, and the
    CPU interpreter would only make these whole-split passes slow, so the CLI tests use its eager path."""
    if "cli" in request.node.name:
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"))


def direct(run: Path, model: nn.Module, member, split: str = "valid", max_tokens=None) -> EvalResult:
    from data.tokenizer import load_split, load_tokenizer
    from lm.config import load_config

    cfg = load_config(run / "config.yaml")
    data = load_split(cfg.data.dir, split, load_tokenizer(cfg.data.dir))
    return evaluate_bpc(model, data, family=cfg.model.family, member=member, batch_size=cfg.eval.batch_size,
                        seq_len=cfg.train.seq_len, context=cfg.eval.context, stride=cfg.eval.stride,
                        max_tokens=max_tokens)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from lm.evaluate import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_scores_each_kind_of_a_run_with_its_own_model(run_dir, capsys):
    run, models = run_dir
    code, out, _ = run_cli(["--run", str(run), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["notes"] == []
    report = report["results"]
    assert list(report) == ["averaged", "ensemble", "swa"]
    expected = {"averaged": direct(run, models["averaged"], 0), "ensemble": direct(run, models["members"], "ensemble"),
                "swa": direct(run, models["swa"], 0)}
    n_valid = len(np.fromfile(run.parent / "data" / "valid.bin", dtype=np.uint8))
    for kind, result in expected.items():
        assert report[kind]["bpc"] == pytest.approx(result.bpc, abs=1e-9)
        assert report[kind]["n_bytes"] == n_valid - 1
    assert len({round(r["bpc"], 6) for r in report.values()}) == 3  # three different models

    code, out, _ = run_cli(["--run", str(run), "--models", "members", "--split", "test", "--max-bytes", "700"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "test split: 699 of 700 bytes scored (every byte but the first, which has no context)"
    assert [line.split()[0] for line in lines[2:]] == ["member_0", "member_1", "member_2"]
    for k, line in enumerate(lines[2:]):
        bpc, scored = line.split()[1:]
        assert float(bpc) == pytest.approx(direct(run, models["members"], k, "test", 700).bpc, abs=1e-4)
        assert scored == "699"


def test_cli_on_an_exported_directory(run_dir, capsys):
    run, models = run_dir
    exported = run / "final" / "averaged"
    code, out, err = run_cli(["--run", str(exported), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["results"].keys() == {"averaged"}
    assert report["results"]["averaged"]["bpc"] == pytest.approx(direct(run, models["averaged"], 0).bpc, abs=1e-9)
    # An exported directory holds one model: the other kinds are not missing, so no notes.
    assert report["notes"] == [] and err == ""


def test_cli_notes_only_the_kinds_a_run_should_have(tmp_path, capsys):
    # A run trained without SWA has no SWA model to miss; one whose SWA model is gone does.
    run, models = make_run_dir(tmp_path, swa=False, family="transformer")
    code, out, err = run_cli(["--run", str(run), "--max-bytes", "500"], capsys)
    assert code == 0 and err == ""
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("enabled: false", "enabled: true"))
    code, out, err = run_cli(["--run", str(run), "--max-bytes", "500"], capsys)
    assert code == 0 and err == f"note: no swa model in {run}; skipped\n"
    rows = {line.split()[0]: float(line.split()[1]) for line in out.strip().splitlines()[2:]}
    assert rows.keys() == {"averaged", "ensemble"}
    assert rows["ensemble"] == pytest.approx(direct(run, models["members"], "ensemble", max_tokens=500).bpc, abs=1e-4)
    code, _, err = run_cli(["--run", str(run), "--models", "averaged,swa"], capsys)
    assert code == 2 and err.startswith("error: --models swa") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["missing", "not_a_run", "bad_kind", "no_kind", "bad_data_dir", "corrupt_weights",
                                  "config_not_a_mapping", "config_not_json"])
def test_cli_errors_are_one_line(run_dir, tmp_path, capsys, case):
    run, _ = run_dir
    if case in ("corrupt_weights", "config_not_a_mapping", "config_not_json"):
        config = {"corrupt_weights": (run / "final" / "averaged" / "config.json").read_text(),
                  "config_not_a_mapping": "[1, 2]", "config_not_json": "{model:"}[case]
        (tmp_path / "config.json").write_text(config)
        (tmp_path / "model.safetensors").write_bytes(os.urandom(64))
    args = {"missing": ["--run", str(tmp_path / "nope")],
            "not_a_run": ["--run", str(tmp_path)],
            "bad_kind": ["--run", str(run), "--models", "averaged,best"],
            "no_kind": ["--run", str(run), "--models", ","],
            "bad_data_dir": ["--run", str(run), "--data-dir", str(tmp_path)],
            "corrupt_weights": ["--run", str(tmp_path)]}.get(case, ["--run", str(tmp_path)])
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    if case.startswith("config_"):  # the message names the file it is about
        assert err.startswith(f"error: {tmp_path / 'config.json'} is not a valid run config ("), err


def test_cli_notes_when_it_runs_fewer_lstm_streams_than_asked(run_dir, capsys):
    run, models = run_dir
    code, out, _ = run_cli(["--run", str(run), "--models", "averaged", "--batch-size", "100000", "--max-bytes", "700",
                            "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["notes"] == ["--batch-size 100000: ran 1 LSTM stream instead, so that each has at least 4,096 "
                               "tokens (a stream starts without context, and shorter ones inflate the bpc)"]
    # The figure of one stream: the exact sequential pass.
    seq = torch.from_numpy(np.fromfile(run.parent / "data" / "valid.bin", dtype=np.uint8)[:700].astype(np.int64))
    reference = float64_nats(models["averaged"], seq[None, :-1], seq[None, 1:], 0).sum().item()
    assert report["results"]["averaged"]["nats"] == pytest.approx(reference, rel=1e-6)
    assert report["results"]["averaged"]["n_bytes"] == 699
    code, _, err = run_cli(["--run", str(run), "--models", "averaged", "--batch-size", "2", "--max-bytes", "700"],
                           capsys)
    assert code == 0 and err == ("note: --batch-size 2: ran 1 LSTM stream instead, so that each has at least 4,096 "
                                 "tokens (a stream starts without context, and shorter ones inflate the bpc)\n")
    code, out, _ = run_cli(["--run", str(run), "--models", "averaged", "--batch-size", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["notes"] == []


@pytest.mark.parametrize("change,problem", [("hidden_size", "size mismatch for "),
                                            ("num_layers", "Missing key(s) in state_dict: ")])
def test_cli_members_that_do_not_match_the_config_say_so_and_what_to_do(run_dir, tmp_path, capsys, change, problem):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir[0], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"][change] *= 2
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["--run", str(run), "--models", "ensemble"], capsys)
    assert code == 2 and out == ""
    members = run / "final" / "members.safetensors"
    assert err.startswith(f"error: cannot load the ensemble model from {members}: it does not match "
                          f"{run / 'config.yaml'} ({problem}")
    assert err.endswith("); restore the run's own final/ and config.yaml, or re-run training\n")
    assert err.count("\n") == 1 and "Error(s) in loading" not in err and "re-export" not in err


def test_cli_ctrl_c_is_one_line_and_exit_code_130(run_dir, capsys, monkeypatch):
    import signal

    import lm.evaluate

    target_nats = lm.evaluate._target_nats

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the pass
        return target_nats(*args, **kwargs)

    monkeypatch.setattr(lm.evaluate, "_target_nats", interrupted)
    try:
        code, out, err = run_cli(["--run", str(run_dir[0]), "--models", "averaged"], capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped lm.evaluate.main (a traceback for the user)")
    assert (code, out, err) == (130, "", "error: interrupted\n")


def test_cli_sentencepiece_run_claims_only_the_bytes_it_scored(tmp_path, capsys):
    from data.tokenizer import load_split, load_tokenizer

    run, _ = make_run_dir(tmp_path, overrides=("data.tokenizer=sentencepiece", "data.sp_vocab_size=400",
                                               "model.vocab_size=400"))
    data_dir = tmp_path / "data"
    tokenizer = load_tokenizer(data_dir, "sentencepiece", 400)  # trained by the run, as train_lm.py does
    first_token_bytes = int(tokenizer.byte_lengths[load_split(data_dir, "valid", tokenizer)[0]])
    assert first_token_bytes > 1  # so not every byte but the first is scored
    split_bytes = (data_dir / "valid.bin").stat().st_size
    capsys.readouterr()

    code, out, _ = run_cli(["--run", str(run), "--models", "averaged"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    scored = split_bytes - first_token_bytes
    assert lines[0] == (f"valid split: {scored:,} of {split_bytes:,} bytes scored "
                        "(not the first token, which has no context)")
    assert lines[2].split()[2] == f"{scored:,}"
    code, out, _ = run_cli(["--run", str(run), "--models", "averaged", "--max-bytes", "500", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["split_bytes"] == 500
    assert report["results"]["averaged"]["n_bytes"] <= 500 - first_token_bytes


@pytest.mark.parametrize("flags,message", [
    (["--stride", "100", "--context", "50"], "--stride 100 is longer than --context 50"),
    (["--stride", "40"], "--stride 40 is longer than eval.context 32"),
    (["--context", "8"], "eval.stride 16 is longer than --context 8"),
])
def test_cli_window_errors_name_the_flags_the_user_passed(tmp_path, capsys, flags, message):
    run, _ = make_run_dir(tmp_path, swa=False, family="transformer")
    code, out, err = run_cli(["--run", str(run), *flags], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}, ") and err.count("\n") == 1
    assert "pass --stride" in err and "change eval.stride" not in err


@pytest.mark.parametrize("flags", [["--context", "64"], ["--stride", "8", "--context", "16"]])
def test_cli_refuses_window_flags_for_an_lstm_run(run_dir, capsys, flags):
    code, out, err = run_cli(["--run", str(run_dir[0]), *flags], capsys)
    named = "/".join(flag for flag in ("--context", "--stride") if flag in flags)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {named}: an LSTM is scored as stateful streams") and err.count("\n") == 1


def test_cli_unfinished_run_says_how_to_finish_it(run_dir, tmp_path, capsys):
    run = tmp_path / "unfinished run"
    (run / "checkpoints" / "step_0000040").mkdir(parents=True)
    (run / "config.yaml").write_text((run_dir[0] / "config.yaml").read_text())
    code, out, err = run_cli(["--run", str(run)], capsys)
    assert code == 2 and out == ""
    # The directory's name has a space: the command quotes it for the shell.
    assert err == (f"error: {run} is an unfinished run (it has checkpoints/ but no final/): finish it with "
                   f"python train_lm.py --config '{run}/config.yaml' run.out_dir='{run}' --resume\n")
    (run / "checkpoints" / "step_0000040").rmdir()
    (run / "checkpoints").rmdir()  # no checkpoints: not a run that can be resumed
    code, _, err = run_cli(["--run", str(run)], capsys)
    assert code == 2 and "has no final/ directory" in err


def test_progress_bar_counts_bytes_and_stays_off_outside_a_terminal(monkeypatch):
    import io
    from functools import partial

    from tqdm import tqdm

    import lm.evaluate

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    rng = np.random.default_rng(11)
    data = rng.integers(0, 50, size=120).astype(np.uint16)
    lengths = rng.integers(1, 4, size=50).astype(np.int64)
    n_bytes = int(lengths[data[1:]].sum())
    assert n_bytes != 119  # bytes, not the 119 target tokens
    for stream in (Terminal(), io.StringIO()):
        # mininterval=0, miniters=1: every update is drawn (not every few, as tqdm adapts to the
        # rate by default), so the bar's last count is in the stream.
        monkeypatch.setattr(lm.evaluate, "tqdm", partial(tqdm, file=stream, mininterval=0, miniters=1))
        result = evaluate_bpc(TinyLSTM(50), data, family="lstm", batch_size=2, seq_len=16, byte_lengths=lengths,
                              progress="averaged")
        assert result.n_bytes == n_bytes
        if isinstance(stream, Terminal):
            assert f"{n_bytes}/{n_bytes} [" in stream.getvalue() and "B/s]" in stream.getvalue()
        else:
            assert stream.getvalue() == ""  # a log or pipe gets no redraws and no erased lines


def test_progress_bar_counts_to_this_process_share(monkeypatch):
    import io
    import re
    from functools import partial
    from types import SimpleNamespace

    from tqdm import tqdm

    import lm.evaluate

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    # Process 0 of 2: the bar's total is half the split, and this process scores more than half.
    first_of_two = SimpleNamespace(process_index=0, num_processes=2, unwrap_model=lambda model: model,
                                   gather_for_metrics=lambda totals: totals)  # its own totals only
    data = np.random.default_rng().integers(0, 50, size=101).astype(np.uint16)
    stream = Terminal()
    monkeypatch.setattr(lm.evaluate, "tqdm", partial(tqdm, file=stream, mininterval=0, miniters=1))
    share = evaluate_bpc(TinyLSTM(50), data, family="lstm", batch_size=3, seq_len=8, accelerator=first_of_two,
                         progress="averaged", min_stream_tokens=1).n_bytes
    assert share > 100 // 2
    # (unit_scale writes counts under 100 with one decimal, e.g. 16.0/50.0)
    counts = [(float(n), float(total)) for n, total in re.findall(r"([\d.]+)/([\d.]+) \[", stream.getvalue())]
    assert counts[-1] == (share, share) and {total for _, total in counts} == {share}  # its share from the start
