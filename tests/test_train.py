"""Training end to end on the synthetic corpus with tiny models: outputs, resume, crash safety,
two processes, bad input. One reference run (through the CLI) is shared by most tests."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file

import train_lm
from data.tokenizer import ByteTokenizer, load_split
from lm.checkpoint import latest_checkpoint, list_checkpoints
from lm.config import load_config
from lm.evaluate import evaluate_bpc
from lm.late_phase import average_members, late_phase_parameters
from lm.models import load_exported
from lm.trainer import Trainer, TrainingError, lr_factor

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
# 12 steps; K=3 members spawn at T0=6; checkpoints every 4 steps, so step 4 is tied and step 8
# is in the middle of a member cycle (two shared-weight gradients pending); SWA from step 8.
TINY = [
    "data.synthetic_bytes=40000", "model.embed_dim=8", "model.hidden_size=16",
    "train.batch_size=4", "train.seq_len=16", "train.max_steps=12", "train.log_every=4",
    "train.eval_every=6", "train.eval_bytes=400", "checkpoint.every=4", "checkpoint.keep=10",
    "late_phase.K=3", "late_phase.T0=6", "swa.start=8", "swa.every=2", "eval.batch_size=4",
]


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process Trainer builds its own Accelerator; Accelerate's state is a process-wide
    singleton, so it is reset before and after every test (other modules must not inherit bf16)."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


def tiny_args(out_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [f"run.out_dir={out_dir}", f"data.dir={data_dir}", *TINY, *extra]


def tiny_config(out_dir: Path, data_dir: Path, *extra: str):
    return load_config(SMOKE, tiny_args(out_dir, data_dir, *extra))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir) -> Path:
    """The tiny late-phase + SWA run through the CLI, one process."""
    reset_accelerate()
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert train_lm.main(["--config", str(SMOKE), *tiny_args(out, data_dir)]) == 0
    return out


def test_run_writes_config_metrics_checkpoints_final_and_results(reference_run, data_dir):
    out = reference_run
    assert load_config(out / "config.yaml").late_phase.K == 3

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 6, 8, 12]
    for r in records:
        if "train_bpc" in r:
            assert math.isfinite(r["train_bpc"]) and r["chars_per_s"] > 0 and r["lr"] == pytest.approx(1e-2)
    assert set(records[1]["valid_bpc"]) == {"averaged", "ensemble"}  # step 6: members exist
    assert set(records[3]["valid_bpc"]) == {"averaged", "ensemble", "swa"}

    assert [p.name for p in list_checkpoints(out)] == ["step_0000004", "step_0000008", "step_0000012"]
    assert not list((out / "checkpoints").glob(".tmp-*"))

    results = json.loads((out / "results.json").read_text())
    kinds = {"averaged", "ensemble", "member_0", "member_1", "member_2", "swa"}
    for split in ("valid", "test"):
        assert set(results[split]) == kinds
        assert all(0 < bpc < 9 for bpc in results[split].values())
        tokens = load_split(data_dir, split, ByteTokenizer())
        assert results["n_bytes"][split] == len(tokens) - 1  # every byte but the first is scored

    # The exported plain models rebuild without late-phase code and give the reported numbers.
    valid = load_split(data_dir, "valid", ByteTokenizer())
    for kind in ("averaged", "swa"):
        model = load_exported(out / "final" / kind)
        assert not any("factors" in name for name, _ in model.named_parameters())
        result = evaluate_bpc(model, valid, family="lstm", batch_size=4, seq_len=16)
        assert result.bpc == pytest.approx(results["valid"][kind], abs=1e-9)
    assert (out / "final" / "members.safetensors").is_file()


def _resume_from(reference_run: Path, tmp_path: Path, data_dir: Path, step: int, *extra: str) -> Path:
    """A copy of `reference_run` (made with the overrides `extra`) that stopped at `step`, resumed to the end."""
    out = tmp_path / f"resumed_from_{step}"
    shutil.copytree(reference_run, out)
    for path in list_checkpoints(out):
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    shutil.rmtree(out / "final")
    (out / "results.json").unlink()
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    Trainer(tiny_config(out, data_dir, *extra), resume=True).fit()
    return out


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("checkpoints/step_0000012/model.safetensors", "final/averaged/model.safetensors",
                 "final/swa/model.safetensors", "final/members.safetensors"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key} differs"
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())


@pytest.mark.parametrize("step", [4, 8], ids=["before_T0", "mid_member_cycle"])
def test_resume_is_bitwise_identical(reference_run, tmp_path, data_dir, step):
    resumed = _resume_from(reference_run, tmp_path, data_dir, step)
    assert_same_run(reference_run, resumed)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 6, 8, 12]  # lines past the checkpoint were dropped and written again


TINY_TRANSFORMER = ("model.family=transformer", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
                    "model.max_seq_len=16", "eval.context=16", "eval.stride=8")


@pytest.mark.parametrize("extra", [
    # (folded: the Triton kernels' interpreter would take a minute)
    (*TINY_TRANSFORMER, "model.dropout=0.1", "late_phase.schedule=parallel", "late_phase.K=2", "train.grad_accum=2",
     "model.linear_members=folded"),
    ("model.num_layers=2", "late_phase.schedule=parallel", "train.batch_size=6"),
], ids=["transformer_parallel_dropout_accumulating", "lstm_parallel_two_layers"])
def test_resume_in_parallel_is_bitwise_identical(tmp_path, data_dir, extra):
    # Resumed at step 8, past T0; the Transformer's dropout masks after it come from the restored RNG states.
    reference = tmp_path / "reference"
    assert train_lm.main(["--config", str(SMOKE), *tiny_args(reference, data_dir, *extra)]) == 0
    reset_accelerate()
    assert_same_run(reference, _resume_from(reference, tmp_path, data_dir, 8, *extra))


CRASHING_RUN = """
import os, sys
from accelerate import Accelerator
sys.path.insert(0, {repo!r})
import train_lm

save_state = Accelerator.save_state
calls = []

def save_state_then_die(self, output_dir, **kwargs):
    calls.append(output_dir)
    save_state(self, output_dir, **kwargs)
    if len(calls) == 2:  # the second checkpoint: Accelerate's files are written, ours are not
        os._exit(3)

Accelerator.save_state = save_state_then_die
sys.exit(train_lm.main(sys.argv[1:]))
"""


def test_killed_during_checkpoint_write_leaves_previous_checkpoint_resumable(reference_run, tmp_path, data_dir):
    out = tmp_path / "crashed"
    script = tmp_path / "crashing_run.py"
    script.write_text(CRASHING_RUN.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), "--config", str(SMOKE), *tiny_args(out, data_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert latest_checkpoint(out).name == "step_0000004"
    assert [p.name for p in (out / "checkpoints").iterdir()] != ["step_0000004"]  # the torn write is there
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_b')  # a metrics line torn by the kill
    Trainer(tiny_config(out, data_dir), resume=True).fit()
    assert_same_run(reference_run, out)
    ours, reference = ([{k: v for k, v in json.loads(line).items() if k != "chars_per_s"}
                        for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, reference_run))
    assert ours == reference  # the same records, throughput aside
    assert not list((out / "checkpoints").glob(".tmp-*"))


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    # --standalone: a free rendezvous port, so concurrent test runs on one machine do not collide.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_lm.py"), *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["data_on_the_main_process", "checkpoint_file_of_process_1"])
def test_an_error_met_by_one_process_is_one_line_from_every_process(reference_run, tmp_path, data_dir, case):
    # The main process prepares the data alone, and each process reads its own checkpoint file:
    # an error there used to leave the other process to die at its next collective with a gloo
    # traceback, or (met by process 1, which does not print) to print no error at all.
    out = tmp_path / "run"
    if case == "data_on_the_main_process":
        (tmp_path / "empty").mkdir()
        argv = ["--config", str(SMOKE), *tiny_args(out, tmp_path / "empty"), "data.corpus=prepared"]
        expected = f"error: data.corpus=prepared but {tmp_path / 'empty'} holds no prepared splits"
    else:
        proc = torchrun("--config", str(SMOKE), *tiny_args(out, data_dir, "train.max_steps=10"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        latest = latest_checkpoint(out)
        (latest / "process_1.pt").unlink()
        argv = ["--config", str(SMOKE), *tiny_args(out, data_dir, "train.max_steps=10"), "--resume"]
        expected = f"error: {latest}: damaged ("
    proc = torchrun(*argv)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-3000:]
    assert "[rank" not in proc.stderr, proc.stderr[-3000:]  # no process's traceback (torchrun's own summary aside)


PARALLEL = ("late_phase.schedule=parallel", "late_phase.K=2")  # each process's 2 rows = K members


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_two_processes_match_one(reference_run, tmp_path, data_dir, schedule):
    extra = PARALLEL if schedule == "parallel" else ()
    if schedule == "parallel":
        one_process = tmp_path / "one_process"
        Trainer(tiny_config(one_process, data_dir, *extra)).fit()
    else:
        one_process = reference_run
    out = tmp_path / "two_processes"
    proc = torchrun("--config", str(SMOKE), *tiny_args(out, data_dir, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints" / "step_0000012").glob("process_*.pt")) == [
        "process_0.pt", "process_1.pt"]
    for name in ("final/averaged/model.safetensors", "final/swa/model.safetensors", "final/members.safetensors"):
        one, two = weights(one_process / name), weights(out / name)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_process, out))
    for split in ("valid", "test"):
        assert two[split].keys() == one[split].keys()
        for kind, bpc in one[split].items():
            assert two[split][kind] == pytest.approx(bpc, abs=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_plain_training_equals_a_hand_written_loop(tmp_path, data_dir, optimizer):
    """Plain mode, warmup and weight decay through the trainer == a minimal PyTorch loop on the
    same streams: Adam with clipping (on every step), and SGD with momentum and no clipping, whose
    update is proportional to the gradient, so a mis-scaled loss cannot hide."""
    from data.batches import StreamBatches
    from lm.config import LatePhaseConfig
    from lm.models import build_model

    steps, clip = 5, (0.05 if optimizer == "adam" else 0.0)
    cfg = tiny_config(tmp_path / "plain", data_dir, "late_phase.mode=plain", "swa.enabled=false",
                      f"train.max_steps={steps}", f"train.grad_clip={clip}", "train.warmup_steps=3",
                      "train.weight_decay=0.01", f"train.optimizer={optimizer}", "train.betas=[0.9,0.999]")
    trainer = Trainer(cfg)
    for _ in range(steps):
        trainer.train_step()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, LatePhaseConfig(mode="plain")).double()
    if optimizer == "adam":
        reference_opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01)
    else:
        reference_opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=0.01)
    batches = StreamBatches(load_split(data_dir, "train", ByteTokenizer()), 4, 16)
    state = None
    for step in range(steps):
        inputs, targets, reset = next(batches)
        state = None if reset else state
        logits, state = model(inputs, state)
        state = tuple(s.detach() for s in state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in reference_opt.param_groups:
            group["lr"] = cfg.train.lr * min(1.0, (step + 1) / 3)
        reference_opt.step()
        reference_opt.zero_grad()
    for (name, ours), reference in zip(trainer.unwrapped.named_parameters(), model.parameters()):
        torch.testing.assert_close(ours.double(), reference, rtol=0, atol=2e-5, msg=name)


def test_tied_phase_average_is_row_zero(tmp_path, data_dir):
    # Before T0 only member row 0 trains; the other rows still hold their initial values, so the
    # averaged model must be row 0 alone, not the mean over every stored row.
    trainer = Trainer(tiny_config(tmp_path / "run", data_dir))
    for _ in range(3):  # T0 = 6
        trainer.train_step()
    inputs = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        row_zero, _ = trainer.unwrapped(inputs, None, member=0)
        averaged, _ = trainer.averaged_model()(inputs, None, member=0)
        every_row, _ = average_members(trainer.unwrapped)(inputs, None, member=0)
    torch.testing.assert_close(averaged, row_zero, rtol=0, atol=1e-5)
    assert (every_row - row_zero).abs().max() > 1e-3


def test_swa_is_the_mean_of_the_averaged_models_at_its_steps(tmp_path, data_dir):
    # swa.start=8, swa.every=2, 12 steps: snapshots of the member-averaged model at steps 8, 10, 12.
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, data_dir))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    update = trainer.swa.update

    def recording_update(state_dict):
        averaged = {k: v.double() for k, v in average_members(trainer.unwrapped).state_dict().items()}
        snapshots[trainer.step] = averaged
        update(state_dict)

    trainer.swa.update = recording_update
    trainer.fit()
    assert sorted(snapshots) == [8, 10, 12]
    swa = weights(out / "final" / "swa" / "model.safetensors")
    assert swa.keys() == snapshots[8].keys()
    for name, value in swa.items():
        mean = sum(s[name] for s in snapshots.values()) / 3
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-6, msg=name)
        assert (snapshots[12][name] - snapshots[8][name]).abs().max() > 1e-4, name  # the snapshots differ


def test_learning_rate_schedule_by_hand():
    cosine = load_config(None, ["train.max_steps=110", "train.warmup_steps=10", "train.lr_schedule=cosine"])
    constant = load_config(None, ["train.max_steps=110", "train.warmup_steps=10"])
    # warmup: step s (0-based) trains at (s + 1) / 10 of train.lr, then cosine from 1 at step 10 to 0 at step 110
    for step, expected in ((0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (35, (1 + math.sqrt(0.5)) / 2), (60, 0.5),
                           (85, (1 - math.sqrt(0.5)) / 2), (110, 0.0)):
        assert lr_factor(step, cosine) == pytest.approx(expected, abs=1e-12), step
    assert [lr_factor(s, constant) for s in (0, 9, 10, 60, 109)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0])


def test_gradient_accumulation_matches_the_full_batch(tmp_path, data_dir):
    runs = {}
    for accum in (1, 2):
        reset_accelerate()
        cfg = tiny_config(tmp_path / f"accum{accum}", data_dir, f"train.grad_accum={accum}")
        trainer = Trainer(cfg)
        for _ in range(8):  # crosses T0=6: tied steps, spawn, sequential member steps
            trainer.train_step()
        runs[accum] = dict(trainer.unwrapped.named_parameters())
    for name, p in runs[1].items():
        torch.testing.assert_close(runs[2][name], p, rtol=0, atol=1e-5, msg=name)


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path, data_dir):
    out = tmp_path / "diverged"
    trainer = Trainer(tiny_config(out, data_dir))
    # From step 6 on the decoder emits NaN, as a diverged model would.
    trainer.unwrapped.decoder.register_forward_hook(lambda module, args, output: output * math.nan if trainer.step >= 5 else None)
    with pytest.raises(TrainingError, match=r"non-finite between steps 5 and 8.*step_0000004.*--resume"):
        trainer.fit()
    assert latest_checkpoint(out).name == "step_0000004"
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints/step_0000004/model.safetensors").values())
    assert not (out / "final").exists()


@pytest.mark.parametrize("poisoned", ["member", "shared"])
def test_non_finite_gradient_is_never_checkpointed(tmp_path, data_dir, poisoned):
    # Step 8 (the 8th update) gets an infinite gradient, in a late-phase factor (the active
    # member's row is stepped at once) or in a shared weight (pending until the member cycle
    # ends at step 9). The loss of step 8 is still finite, but its checkpoint would hold NaN
    # weights or gradients.
    out = tmp_path / poisoned
    trainer = Trainer(tiny_config(out, data_dir))
    target = next(iter(late_phase_parameters(trainer.unwrapped))) if poisoned == "member" else \
        trainer.unwrapped.decoder.weight
    assert target.requires_grad
    after_backward = trainer.stepper.after_backward

    def poison(step):
        if step == 7:
            target.grad.fill_(math.inf)
        after_backward(step)

    trainer.stepper.after_backward = poison
    with pytest.raises(TrainingError, match=r"non-finite .* by step 8 .*step_0000004.*--resume"):
        trainer.fit()
    assert latest_checkpoint(out).name == "step_0000004"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = train_lm.main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("late_phase.K=0", "late_phase.K"),
    ("late_phase.T0=12", "late_phase.T0"),
    ("train.batch_size=5", "train.batch_size"),  # 5 streams cannot be split in 2 accumulation steps
    ("train.learning_rate=0.1", "train.learning_rate"),
    ("train.max_steps=many", "train.max_steps"),
    ("model.dropout=0.1", "model.dropout"),  # the smoke config's LSTM has none
])
def test_bad_config_is_rejected_before_any_work(capsys, tmp_path, data_dir, override, key):
    out = tmp_path / "never"
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, tmp_path / "no_data"), "train.grad_accum=2", override)
    assert code == 2
    assert err.startswith(f"error: {key}") and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "no_data").exists()


def test_missing_data_and_checkpoint_problems_are_one_line_errors(capsys, tmp_path, data_dir, reference_run, monkeypatch):
    out = tmp_path / "never"
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, tmp_path / "empty"), "data.corpus=prepared")
    assert code == 2 and "data.prepare" in err and err.count("\n") == 1 and not out.exists()

    from data.enwik8 import SourceError

    def unreachable(out_dir, source=None):
        raise SourceError("cannot reach http://mattmahoney.net/dc/enwik8.zip (no network)")

    monkeypatch.setattr("lm.trainer.prepare_enwik8", unreachable)
    code, err = run_cli(capsys, f"run.out_dir={out}", f"data.dir={tmp_path / 'enwik8'}")
    assert code == 2 and "data.source=PATH" in err and "configs/smoke.yaml" in err and not out.exists()

    code, err = run_cli(capsys, f"run.out_dir={out}", f"data.source={tmp_path / 'missing.zip'}")
    assert code == 2 and err.startswith("error: data.source=") and not out.exists()

    import zipfile
    monkeypatch.undo()  # the real data.enwik8 from here on
    notes = tmp_path / "not_data"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, f"run.out_dir={out}", f"data.dir={notes}")  # not a download problem
    assert code == 2 and err == (f"error: {notes} holds files that are not prepared data (notes.txt); pick a new "
                                 f"or empty directory (--out, or data.dir when training)\n"), err

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:  # a zip, but not enwik8's
        archive.writestr("enwik8", b"not the real thing\n" * 100)
    code, err = run_cli(capsys, f"run.out_dir={out}", f"data.dir={tmp_path / 'enwik8'}", f"data.source={tmp_path / 'other.zip'}")
    assert code == 2 and err.count("\n") == 1 and "sha256 mismatch" in err and "data.source=PATH" in err, err
    assert "--" not in err and not out.exists()  # no flag of data.enwik8's command line

    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data_dir), "--resume")
    assert code == 2 and "no checkpoint" in err and not out.exists()

    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(reference_run, data_dir))
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("overrides, message", [
    (["late_phase.K=4"], r"written with late_phase.K=3, now 4; resume with late_phase.K=3"),
    (["model.hidden_size=32"], r"written with model.hidden_size=16, now 32"),
    (["train.grad_accum=2"], r"written with train.grad_accum=1, now 2"),
    # T0 = 0.5 is step 6 of 12 (as the run had it), but step 12 of 24: the members spawned at 6.
    (["late_phase.T0=0.5", "train.max_steps=24"], r"step 8, and late_phase.T0 was step 6 but is now step 12.*"
                                                  r"late_phase.T0=6"),
    (["train.max_steps=7", "swa.start=6"], r"at step 8, past train.max_steps=7; give train.max_steps >= 8"),
])
def test_resume_refuses_settings_the_checkpoint_cannot_continue_with(capsys, tmp_path, data_dir, reference_run,
                                                                     overrides, message):
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data_dir), *overrides, "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # nothing written


def test_an_unwritable_out_dir_is_one_line_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    data = tmp_path / "data"
    for out in (blocker, blocker / "run"):
        code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data))
        assert code == 2 and err == f"error: cannot write run.out_dir={out} ({blocker} is a file, not a directory); " \
                                    f"give another run.out_dir\n"
    assert not data.exists()


def test_resume_checks_the_config_before_preparing_data(capsys, tmp_path, data_dir, reference_run):
    # Resuming with the wrong data (say, without the run's own --config) must not download or
    # write a corpus first.
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")
    new_data = tmp_path / "other_data"
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, new_data), "data.synthetic_bytes=200000",
                        "--resume")
    assert code == 2 and "written with data.synthetic_bytes=40000, now 200000" in err, err
    assert f"--config {out / 'config.yaml'}" in err and not new_data.exists()


@pytest.mark.parametrize("damage, detail", [
    (lambda c: (c / "trainer.pt").write_bytes((c / "trainer.pt").read_bytes()[:50]), "PytorchStreamReader"),
    (lambda c: (c / "model.safetensors").unlink(), "No such file"),
    (lambda c: (c / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{"), "header"),
    (lambda c: (c / "process_0.pt").unlink(), "No such file"),
    (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json: Expecting value"),
])
def test_a_damaged_checkpoint_names_the_one_to_resume_from(capsys, tmp_path, data_dir, reference_run, damage, detail):
    out = tmp_path / "run"
    for step in ("step_0000004", "step_0000008"):
        shutil.copytree(reference_run / "checkpoints" / step, out / "checkpoints" / step)
    latest = out / "checkpoints" / "step_0000008"
    damage(latest)
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data_dir), "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {latest}: damaged (") and detail in err, err
    assert err.endswith(f"delete {latest} to resume from step_0000004\n"), err
    shutil.rmtree(latest)  # the advice works
    assert train_lm.main(["--config", str(SMOKE), *tiny_args(out, data_dir), "--resume"]) == 0


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_says_whether_there_is_a_checkpoint_to_resume(capsys, tmp_path, data_dir, reference_run, monkeypatch,
                                                             checkpointed):
    out = tmp_path / "run"
    if checkpointed:
        shutil.copytree(reference_run / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data_dir), *(["--resume"] if checkpointed else []))
    assert code == 130
    if checkpointed:
        assert err == "error: interrupted; the last checkpoint (step_0000008) is intact, continue with --resume\n"
    else:
        assert err == ("error: interrupted; no checkpoint was written yet, so run the same command again "
                       "(without --resume) to start over\n")


def test_the_final_evaluation_labels_a_bar_per_split_and_model_kind(tmp_path, data_dir, reference_run, monkeypatch):
    out = tmp_path / "finished"
    shutil.copytree(reference_run, out)
    labels = []
    real = evaluate_bpc

    def spy(*args, progress=None, **kwargs):
        labels.append(progress)
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr("lm.trainer.evaluate_bpc", spy)
    Trainer(tiny_config(out, data_dir), resume=True).fit()
    kinds = ["averaged", "ensemble", "member_0", "member_1", "member_2", "swa"]
    assert labels == [f"{split} {kind}" for split in ("valid", "test") for kind in kinds]


def test_resume_drops_a_metrics_line_that_is_not_utf8(tmp_path, data_dir, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")
    lines = (reference_run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (out / "metrics.jsonl").write_bytes(lines[0] + b"\xff\xfe garbage\n" + b"".join(lines[1:]))
    Trainer(tiny_config(out, data_dir), resume=True)
    kept = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert kept == [line for line in lines if json.loads(line)["step"] <= 8]


def test_resume_trains_with_the_new_optimiser_settings(tmp_path, data_dir, reference_run):
    # The checkpoint's optimiser state carries its param groups (lr 1e-2, betas (0.9, 0.999)):
    # the moments must come back, the hyperparameters must be the resumed config's.
    out = tmp_path / "run"
    shutil.copytree(reference_run / "checkpoints" / "step_0000008", out / "checkpoints" / "step_0000008")
    trainer = Trainer(tiny_config(out, data_dir, "train.lr=3e-3", "late_phase.lr=4e-3", "train.betas=[0.8,0.95]"),
                      resume=True)
    shared_opt, member_opt = trainer.optimizers
    for opt, lr in ((shared_opt, 3e-3), (member_opt, 4e-3)):
        assert [(g["base_lr"], g["betas"]) for g in opt.param_groups] == [(lr, (0.8, 0.95))] * len(opt.param_groups)
        assert opt.state  # the moments were restored, not dropped with the old groups
    trainer.fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in logged if "lr" in r] == [(12, 3e-3)]


def test_resume_of_a_checkpoint_that_does_not_fit_the_model_is_one_line(capsys, tmp_path, data_dir, reference_run):
    # A checkpoint whose recorded config disagrees with its tensors (edited by hand, or written
    # by an older version): the loader's error becomes one line.
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "step_0000008"
    shutil.copytree(reference_run / "checkpoints" / "step_0000008", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["model"]["hidden_size"] = 32
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    code, err = run_cli(capsys, "--config", str(SMOKE), *tiny_args(out, data_dir), "model.hidden_size=32", "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "does not fit this model" in err and "size mismatch" in err


def test_cli_prints_valid_and_test_bpc_with_the_bytes_scored(capsys, tmp_path, data_dir, reference_run):
    # Resuming a finished run exports and scores it again, and says so.
    out = tmp_path / "finished"
    shutil.copytree(reference_run, out)
    for stale in ("final.tmp-999999", "final.old-999999"):  # an export killed half-way
        (out / stale / "averaged").mkdir(parents=True)
    assert train_lm.main(["--config", str(SMOKE), *tiny_args(out, data_dir), "--resume"]) == 0
    assert not list(out.glob("final.*"))
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert "is the run's last step" in printed
    for split in ("valid", "test"):
        kinds = ", ".join(f"{kind} {bpc:.4f}" for kind, bpc in results[split].items())
        assert f"{split} bpc ({results['n_bytes'][split]:,} bytes): {kinds}\n" in printed


def test_periodic_validation_is_printed_as_logged(capsys, tmp_path, data_dir):
    out = tmp_path / "run"
    Trainer(tiny_config(out, data_dir)).fit()
    printed = capsys.readouterr().out
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "valid_bpc" in record:
            kinds = ", ".join(f"{kind} {bpc:.4f}" for kind, bpc in record["valid_bpc"].items())
            assert f"step {record['step']}: valid bpc ({record['valid_bytes']:,} bytes) {kinds}\n" in printed


@pytest.mark.parametrize("mode", ["late_phase", "rank1"])
def test_the_run_is_described_before_training(capsys, tmp_path, data_dir, mode):
    out = tmp_path / "run"
    Trainer(tiny_config(out, data_dir, f"late_phase.mode={mode}", "train.max_steps=8", "swa.enabled=false")).fit()
    # By hand: embedding 256 x 8; LSTM 4·16 x (8 + 16) weights and two 4·16 biases; decoder 16 x 256 + 256.
    # Per member: r and s of both matrices (64 + 8, 64 + 16) and both member biases (64 + 64).
    late = ("; from step 6, K=3 late-phase members of 280 parameters each (rank-1 factors, biases; sequential "
            "schedule), averaged at the end" if mode == "late_phase"
            else ", trained in rank-1 form (280 parameters of rank-1 factors, biases)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # 36,000 training bytes (90% of 40,000); 8 steps x 4 x 16 tokens are 0.0142 of an epoch.
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"model: 1 x 16 LSTM, embedding 8: {2048 + 1536 + 128 + 4352:,} parameters" + late,
        f"data: 36,000 training bytes in {data_dir}; 8 steps of 4 x 16 tokens (0.0142 epochs) on 1 process ({device}), "
        "mixed precision no",
    ]


class FakeClock:
    """lm.trainer's `time`: a clock that moves only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float, fn):
        def timed(*args, **kwargs):
            self.now += seconds
            return fn(*args, **kwargs)
        return timed


def test_chars_per_second_counts_training_time_only(monkeypatch, tmp_path, data_dir):
    # Each step takes 1 s and trains on 4 x 16 target bytes; validation, SWA updates, checkpoints
    # and loading a checkpoint take far longer and must not count, in a fresh run or a resumed one
    # (its checkpoint at step 8 is mid-window: log lines at steps 6 and 12).
    import lm.trainer
    clock = FakeClock()
    monkeypatch.setattr(lm.trainer, "time", clock)
    monkeypatch.setattr(Trainer, "train_step", clock.advance(1.0, Trainer.train_step))
    for name, seconds in (("evaluate", 100.0), ("save", 50.0), ("_restore", 1000.0)):
        monkeypatch.setattr(Trainer, name, clock.advance(seconds, getattr(Trainer, name)))
    monkeypatch.setattr(lm.trainer.WeightAverage, "update", clock.advance(10.0, lm.trainer.WeightAverage.update))
    extra = ("train.log_every=6", "train.eval_every=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(tiny_config(straight, data_dir, *extra)).fit()
    shutil.copytree(straight / "checkpoints" / "step_0000008", resumed / "checkpoints" / "step_0000008")
    clock.now += 500.0  # time between the two processes
    Trainer(tiny_config(resumed, data_dir, *extra), resume=True).fit()
    for run, steps in ((straight, [6, 12]), (resumed, [12])):
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["chars_per_s"]) for r in logged if "chars_per_s" in r and r["step"] in steps] == \
            [(step, 64.0) for step in steps]


def test_help_lists_usage(capsys):
    with pytest.raises(SystemExit) as info:
        train_lm.main(["--help"])
    assert info.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_overrides_may_come_before_and_after_the_flags():
    args = train_lm.parse_args(["train.max_steps=20", "--resume", "run.out_dir=x", "--config", "c.yaml", "late_phase.K=2"])
    assert args.resume and args.config == Path("c.yaml")
    assert args.overrides == ["train.max_steps=20", "run.out_dir=x", "late_phase.K=2"]


def test_mixed_precision_stays_on_after_evaluation_and_export(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "bf16", data_dir, "train.mixed_precision=bf16", "model.family=transformer",
                      "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32",
                      "eval.context=32", "eval.stride=16")
    trainer = Trainer(cfg)
    dtypes = []
    trainer.unwrapped.head.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    trainer.train_step()
    trainer.evaluate("valid", 200)  # before T0: unwraps, copies and averages the model
    trainer.swa_model()
    dtypes.clear()
    trainer.train_step()
    assert dtypes == [torch.bfloat16]


def test_every_kind_is_scored_in_float32_after_mixed_precision_training(tmp_path, data_dir, capsys):
    # The members and the ensemble are scored through the trained model, the averaged and SWA
    # models through fresh copies; all in float32, as `lm.evaluate` scores the exported ones.
    from lm import evaluate

    out = tmp_path / "bf16"
    trainer = Trainer(tiny_config(out, data_dir, "train.mixed_precision=bf16", "model.family=transformer",
                                  "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32",
                                  "eval.context=32", "eval.stride=16", "eval.members=true"))
    scored = []
    trainer.unwrapped.head.register_forward_hook(
        lambda module, args, output: scored.append(output.dtype) if not module.training else None)
    reported = trainer.fit()["test"]
    assert set(scored) == {torch.float32}
    reset_accelerate()  # the evaluation CLI builds its own Accelerator, in float32
    capsys.readouterr()  # training's own lines
    assert evaluate.main(["--run", str(out), "--split", "test", "--models", "averaged,ensemble,members,swa",
                          "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["results"]
    assert set(printed) == set(reported) == {"averaged", "ensemble", "member_0", "member_1", "member_2", "swa"}
    for kind, result in printed.items():
        assert result["bpc"] == pytest.approx(reported[kind], abs=1e-9), kind


def test_readme_path_after_training_evaluate_and_plot(reference_run, tmp_path, capsys):
    """The README's steps after `train_lm.py`: the evaluation CLI reproduces results.json's test
    bpc for every kind, and the plot CLI writes a PNG."""
    from lm import evaluate, plot

    assert evaluate.main(["--run", str(reference_run), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["results"]
    reported = json.loads((reference_run / "results.json").read_text())["test"]
    assert set(printed) == {"averaged", "ensemble", "swa"}
    for kind, result in printed.items():
        assert result["bpc"] == pytest.approx(reported[kind], abs=1e-9)
    png = tmp_path / "bpc.png"
    assert plot.main(["--run", str(reference_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class RecordingTracker(GeneralTracker):
    """An in-memory Accelerate tracker."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logs, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self.logs.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_trackers_get_the_config_every_metrics_line_and_the_final_bpc(tmp_path, data_dir):
    tracker = RecordingTracker()
    cfg = tiny_config(tmp_path / "run", data_dir)
    results = Trainer(cfg, Accelerator(log_with=[tracker])).fit()

    assert tracker.config["late_phase/K"] == 3 and tracker.config["late_phase/mode"] == "late_phase"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in tracker.logs[:-1]] == [r["step"] for r in records]
    for (_, logged), record in zip(tracker.logs, records):
        for kind, bpc in record.get("valid_bpc", {}).items():
            assert logged[f"valid_bpc/{kind}"] == bpc
        if "train_bpc" in record:
            assert logged["train_bpc"] == record["train_bpc"] and logged["phase"] == record["phase"]
    final_step, final = tracker.logs[-1]
    assert final_step == 12 and final["test_bpc/averaged"] == results["test"]["averaged"]
    assert tracker.finished


@pytest.mark.parametrize("distributed_type", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_setups_are_refused_with_one_line(distributed_type):
    # FSDP and friends need GPUs, so the check itself is what runs here.
    from accelerate.utils import DistributedType

    from lm.accelerator import check_distributed_type
    from lm.config import ConfigError

    with pytest.raises(ConfigError, match=r"not supported: .*accelerate launch --multi_gpu") as info:
        check_distributed_type(DistributedType[distributed_type])
    assert "\n" not in str(info.value)
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_distributed_type(DistributedType[fine])


def test_without_cuda_the_run_is_on_the_cpu_even_where_accelerate_would_pick_mps(monkeypatch):
    import accelerate.state

    from lm.accelerator import make_accelerator

    monkeypatch.setattr(accelerate.state, "is_mps_available", lambda *args, **kwargs: True)  # an Apple-silicon Mac
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (which has no CUDA)
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)  # Accelerate sets it when it picks MPS
    assert make_accelerator().device == torch.device("cpu")


@pytest.mark.parametrize("tf32", [False, True])
def test_train_tf32_sets_torch_matmul_precision(tf32, tmp_path, data_dir):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        Trainer(load_config(str(SMOKE), tiny_args(tmp_path / "run", data_dir, f"train.tf32={str(tf32).lower()}")))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
