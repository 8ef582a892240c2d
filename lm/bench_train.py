"""Training throughput: our step against a minimal PyTorch loop (`python -m lm.bench_train`).

For one config, in one process, on one device, times
- the minimal loop a reader would write by hand for the PLAIN model: forward, cross-entropy,
  backward, gradient clipping (when configured), optimiser step (torch's AdamW or SGD), on the
  same batches (it makes the same update as our step, which the tests check);
- `Trainer.train_step` on the plain model (the stack's overhead over the minimal loop);
- for a rank1 / late_phase config, `Trainer.train_step` in that mode, with the late phase already
  running (T0 moved inside the warm-up), for late_phase in both schedules (the LSTM's parallel
  schedule both ways, model.lstm_members fused and folded).
chars/s = bytes of the targets consumed / wall seconds, over the timed steps only (warm-up
steps excluded); the best of `--repeats` rounds is reported, the variants taking turns so
that load from elsewhere on the machine hits them alike. For a byte-level Transformer trained
in bf16/fp16 on a GPU it also prints the model-FLOPs utilisation (`transformer_flops_per_token`
over the device's dense 16-bit peak; the late-phase variants count the plain model's FLOPs, so
their MFU is useful work only).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.batches import StreamBatches, WindowBatches
from data.prepare import DataError
from kernels.cli import positive_int
from lm.accelerator import make_accelerator
from lm.config import Config, ConfigError, load_config
from lm.late_phase import LatePhaseLinear
from lm.models import build_model, detach_state
from lm.models.lstm import all_members_way

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, datasheets, without sparsity), matched in order
# against torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_16BIT_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]


def transformer_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token, forward and backward, of cfg's plain Transformer (PaLM's count,
    appendix B): 6 per weight of every matrix product, plus 12 x layers x d_model x context for
    the attention scores and their weighted sums (causal masking not discounted)."""
    with torch.device("meta"):
        model = build_model(cfg.model, type(cfg.late_phase)(mode="plain"))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, LatePhaseLinear)))
    m = cfg.model
    return 6.0 * weights + 12.0 * m.n_layers * m.d_model * cfg.train.seq_len


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_16BIT_TFLOPS if key in name), None)


def measure_chars_per_second(step: Callable[[], int], steps: int, device: torch.device) -> float:
    """Throughput over `steps` calls of `step` (each returns the bytes it trained on)."""
    from lm.trainer import chars_per_second

    _synchronize(device)
    start = time.perf_counter()
    n_bytes = sum(step() for _ in range(steps))
    _synchronize(device)
    return chars_per_second(n_bytes, time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MinimalLoop:
    """The hand-written reference loop for cfg's model in plain mode; each call is one step."""

    def __init__(self, cfg: Config, train_split: np.ndarray, byte_lengths: np.ndarray, device: torch.device):
        t = cfg.train
        self.cfg, self.device, self.byte_lengths = cfg, device, byte_lengths
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, type(cfg.late_phase)(mode="plain")).to(device)
        params = self.model.parameters()
        if t.optimizer == "adam":  # decoupled weight decay, as the stack's "adam"
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.betas[0], weight_decay=t.weight_decay)
        if cfg.model.family == "lstm":
            self.batches = StreamBatches(train_split, t.batch_size, t.seq_len)
        else:
            self.batches = WindowBatches(train_split, t.batch_size, t.seq_len, t.seed)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
        self.state = None

    def __call__(self) -> int:
        batch = next(self.batches)
        if batch.reset:
            self.state = None
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits, state = self.model(inputs, self.state)
        self.state = detach_state(state)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        return int(self.byte_lengths[batch.targets.numpy()].sum())


def variants(cfg: Config, device_type: str = "cpu") -> dict[str, Config]:
    """The configs to time with Trainer.train_step: plain, and the config's own mode/schedules.

    The parallel schedule needs batches of a multiple of K sequences: when the config's batch is
    not, it runs on the largest batch that is (its cost is compared per byte, so that stays fair)."""
    plain = copy.deepcopy(cfg)
    plain.late_phase.mode = "plain"
    out = {"plain": plain}
    lp = cfg.late_phase
    if lp.mode == "rank1":
        out["rank1"] = copy.deepcopy(cfg)
    elif lp.mode == "late_phase":
        # The parallel schedule, timed each way the model can run all members at once: the
        # LSTM's model.lstm_members (on CUDA fused also without its CUDA graphs), and on CUDA
        # the Transformer's model.linear_members (folded is not yet measured there).
        ways: dict[str | None, dict] = {None: {}}
        if cfg.model.family == "lstm":
            ways = {"fused": {"lstm_members": "fused"}, "folded": {"lstm_members": "folded"}}
            if device_type == "cuda":
                ways["fused, no CUDA graphs"] = {"lstm_members": "fused", "lstm_cuda_graphs": False}
        elif device_type == "cuda":
            ways = {"fused": {"linear_members": "fused"}, "folded": {"linear_members": "folded"}}
        for schedule, way in [("sequential", None)] + [("parallel", way) for way in ways]:
            late = copy.deepcopy(cfg)
            late.late_phase.schedule = schedule
            late.late_phase.T0 = 1  # members spawn during the warm-up: the late phase is what gets timed
            label = f"late_phase {schedule} (K={lp.K})"
            if way is not None:
                for key, value in ways[way].items():
                    setattr(late.model, key, value)
                label += f", {way}"
            multiple = lp.K * cfg.train.grad_accum
            if schedule == "parallel" and cfg.train.batch_size % multiple and cfg.train.batch_size > multiple:
                late.train.batch_size -= cfg.train.batch_size % multiple
                label += f", batch {late.train.batch_size}"
            out[label] = late
    for variant in out.values():
        variant.swa.enabled = False  # SWA snapshots are taken by fit(), not by train_step
    return out


def bench(cfg: Config, steps: int, warmup: int, repeats: int,
          profile_steps: int = 0) -> tuple[dict[str, float], list[str], torch.device]:
    """chars/s of the minimal loop and of every variant (best of `repeats` rounds), notes, the device.

    With profile_steps, each variant then runs that many steps under torch.profiler and the notes
    get its most expensive operators (device time on CUDA, CPU time otherwise)."""
    from lm.trainer import Trainer

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum)
    if accelerator.num_processes > 1:  # each process would time its own share against a whole-batch minimal loop
        raise ConfigError(f"lm.bench_train times one process, but {accelerator.num_processes} were launched; "
                          f"run it as python -m lm.bench_train, without torchrun or accelerate launch")
    notes = []
    steppers: dict[str, Callable[[], int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for i, (name, variant) in enumerate(variants(cfg, accelerator.device.type).items()):
            variant.run.out_dir = str(Path(tmp) / f"run{i}")
            try:
                trainer = Trainer(variant, accelerator)
            except ConfigError as e:
                notes.append(f"{name} skipped: {e}")
                continue
            if name == "plain":
                steppers["minimal loop (plain)"] = MinimalLoop(
                    variant, trainer.splits["train"], trainer.byte_lengths, accelerator.device)
            steppers[name] = trainer.train_step
        for step in steppers.values():
            for _ in range(warmup):
                step()
        rounds: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(repeats):
            for name, step in steppers.items():
                rounds[name].append(measure_chars_per_second(step, steps, accelerator.device))
        best = {name: max(speeds) for name, speeds in rounds.items()}
        note = spread_note(rounds)
        if note:
            notes.append(note)
        if profile_steps:
            notes.extend(profile(name, step, profile_steps, accelerator.device) for name, step in steppers.items())
    if cfg.model.family == "lstm" and cfg.late_phase.mode == "late_phase":
        way = all_members_way("auto", "parallel", cfg.model.hidden_size, accelerator.device.type)
        notes.insert(0, f"model.lstm_members=auto takes {way} for the parallel schedule here "
                        f"({cfg.model.hidden_size} hidden units on {accelerator.device.type})")
    return best, notes, accelerator.device


# Rounds of one variant further apart than this mean the machine was busy while timing.
SPREAD_WARNING = 0.1


def spread_note(rounds: dict[str, list[float]]) -> str | None:
    """A warning when some variant's slowest round is more than SPREAD_WARNING below its fastest."""
    spreads = {name: 1 - min(speeds) / max(speeds) for name, speeds in rounds.items() if len(speeds) > 1}
    if not spreads or max(spreads.values()) <= SPREAD_WARNING:
        return None
    name = max(spreads, key=spreads.get)
    return (f"rounds of {name} differ by {100 * spreads[name]:.0f}% (slowest vs fastest): something else may "
            f"have been running; the best round is reported, rerun with more --repeats on an idle machine")


def profile(name: str, step: Callable[[], int], steps: int, device: torch.device) -> str:
    """The top operators of `steps` calls of `step` by self time, as torch.profiler tables them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _synchronize(device)
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=15, max_name_column_width=60)
    return f"profile of {name}, {steps} steps:\n{table}"


def format_report(results: dict[str, float], flops_per_byte: float | None = None,
                  peak: float | None = None) -> str:
    """One line per variant with its ratio; with flops_per_byte and a peak (TFLOP/s), its MFU."""
    minimal, plain = results.get("minimal loop (plain)"), results.get("plain")
    width = max(len(name) for name in results) + len("ours: ")
    lines = []
    for name, speed in results.items():
        label, ratio = name, ""
        if name == "plain":
            label, ratio = "ours: plain", f"{speed / minimal:.3f}x the minimal loop"
        elif name != "minimal loop (plain)":
            label = f"ours: {name}"
            if "parallel" in name:
                ratio = f"cost per byte {plain / speed:.3f}x plain"
            else:
                ratio = f"{speed / plain:.3f}x plain"
        if flops_per_byte and peak:
            ratio += f"{'  ' if ratio else ''}MFU {100 * speed * flops_per_byte / (peak * 1e12):.1f}%"
        lines.append(f"{label:<{width}}  {speed:>12,.0f} chars/s  {ratio}".rstrip())
    return "\n".join(lines)


def positive_float(text: str) -> float:
    """argparse type for rates: a finite number > 0, else argparse's one-line error naming the flag."""
    value = float(text)  # a ValueError reads "argument --peak-tflops: invalid positive_float value: 'x'"
    if not 0 < value < math.inf:  # also refuses nan, for which every comparison is false
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lm.bench_train",
        description="chars/s of our training step (Trainer.train_step) next to a minimal hand-written PyTorch "
        "loop for the same plain model and batches, in the same process; for rank1/late_phase configs also "
        "that mode's chars/s against plain (late_phase: sequential ratio, parallel cost per byte).",
    )
    parser.add_argument("--config", required=True, help="configs/NAME.yaml")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per round (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first, at least 2: the late-phase variants spawn their members at "
                             "step 1 (default 5)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds; the fastest is reported (default 3)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="afterwards, profile STEPS steps of each variant and print its top operators")
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="the device's dense bf16 peak for the MFU (default: known GPUs' datasheet figure)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    try:
        if args.warmup < 2:
            raise ConfigError(f"--warmup must be >= 2 (the late phase starts at step 1), got {args.warmup}")
        if args.profile < 0:
            raise ConfigError(f"--profile must be >= 0 (0: no profile), got {args.profile}")
        cfg = load_config(args.config, args.overrides)
        results, notes, device = bench(cfg, args.steps, args.warmup, args.repeats, args.profile)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, as train_lm.py says it, and the shell's code for SIGINT
        print("error: interrupted", file=sys.stderr)
        return 130
    t = cfg.train
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.config}: {cfg.model.family}, batch {t.batch_size} x {t.seq_len} tokens, {name}, "
          f"torch {torch.__version__}; {args.warmup} warm-up steps, best of {args.repeats} x {args.steps} steps")
    flops_per_byte = peak = None
    if cfg.model.family == "transformer" and cfg.data.tokenizer == "bytes" and t.mixed_precision != "no":
        flops_per_byte = transformer_flops_per_token(cfg)
        peak = args.peak_tflops or peak_tflops(device)
        if peak:
            print(f"model FLOPs: {flops_per_byte / 1e6:.1f} MFLOP per byte (6 per weight + attention); "
                  f"MFU against a {peak:g} TFLOP/s dense 16-bit peak")
    print(format_report(results, flops_per_byte, peak))
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
