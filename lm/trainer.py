"""The training loop, on Accelerate: read `Trainer.train_step` and `Trainer.fit` top to bottom.

One code path for every mode (plain, rank1, late_phase) and schedule: the member schedule says
which member runs each minibatch and `LatePhaseStepper` applies the gradients accordingly.
One code path for one and many processes: Accelerate decides (DDP over NCCL or gloo), every
process runs the same schedule, `train.batch_size` is global and each process takes its rows.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_model
from torch import nn
from tqdm.auto import tqdm

from data.batches import StreamBatches, WindowBatches
from data.enwik8 import SourceError, prepare_enwik8
from data.prepare import DataError, is_prepared, prepare_corpus
from data.synthetic import prepare_synthetic
from data.tokenizer import bits_per_byte, load_split, load_tokenizer
from lm.checkpoint import (
    CheckpointError,
    check_process_count,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from lm.config import Config, ConfigError, LatePhaseConfig, check_new_run, config_to_dict, resolve_step, validate
from lm.accelerator import main_process_first, make_accelerator, raise_everywhere, use_tf32
from lm.evaluate import evaluate_bpc, token_limit
from lm.files import replace_directory, writable_directory_problem, write_text_atomically
from lm.late_phase import (
    LatePhaseStepper,
    MemberSchedule,
    average_members,
    build_optimizers,
    is_plain,
    late_phase_parameters,
    num_members,
    spawn_members,
)
from lm.models import build_model, detach_state, export, plain_like
from lm.swa import WeightAverage


def chars_per_second(n_bytes: float, seconds: float) -> float:
    """Training throughput: target bytes consumed per wall-clock second (the one definition)."""
    return n_bytes / seconds


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became non-finite); one line saying what to do."""


def prepare_data(cfg: Config) -> Path:
    """Make sure cfg.data.dir holds train/valid/test splits, preparing them when missing."""
    data_dir = Path(cfg.data.dir).expanduser()
    corpus = cfg.data.corpus
    source = None if cfg.data.source is None else Path(cfg.data.source).expanduser()
    if source is not None and not source.is_file():  # named here by its config key, not data's CLI flag
        raise DataError(f"data.source={cfg.data.source} is not a file; give the path of the corpus (e.g. enwik8.zip)")
    if corpus == "synthetic":
        # The corpus is data, not part of the run: a fixed generator seed lets runs with
        # different train.seed share one data.dir.
        return prepare_synthetic(data_dir, cfg.data.synthetic_bytes)
    if corpus == "enwik8":
        try:
            return prepare_enwik8(data_dir, source=source)
        except SourceError as e:
            # data.enwik8's messages end in a fix naming its CLI's flags; here the fix is a config key.
            cause = str(e).split(";")[0]
            if source is not None:
                raise DataError(f"{cause}; give data.source=PATH of an undamaged enwik8.zip or extracted "
                                f"enwik8, or leave data.source out to download it") from None
            raise DataError(
                f"enwik8 is not prepared in {data_dir} and could not be downloaded ({cause}); pass a local copy "
                f"with data.source=PATH (enwik8.zip or the extracted file), or train offline on the synthetic "
                f"corpus: python train_lm.py --config configs/smoke.yaml"
            ) from None
    if source is not None:
        return prepare_corpus(source, data_dir)
    if not is_prepared(data_dir):
        raise DataError(
            f"data.corpus=prepared but {data_dir} holds no prepared splits; run python -m data.prepare "
            f"--source FILE --out {data_dir}, or give data.source=FILE"
        )
    return data_dir


def describe_run(cfg: Config, model: nn.Module, data_dir: Path, train_tokens: int,
                 accelerator: Accelerator) -> list[str]:
    """What the config resolved to, in two lines printed before training, so that a setting
    that does not do what was meant shows before hours of training rather than after."""
    m, lp, t = cfg.model, cfg.late_phase, cfg.train
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no draws from the seed
        final = sum(p.numel() for p in build_model(m, LatePhaseConfig(mode="plain")).parameters())
    shape = (f"{m.num_layers} x {m.hidden_size} LSTM, embedding {m.embed_dim}" if m.family == "lstm"
             else f"{m.n_layers}-layer Transformer, d_model {m.d_model}, {m.n_heads} heads")
    model_line = f"model: {shape}: {final:,} parameters"
    if not is_plain(model):
        K = num_members(model)
        own = sum(p.numel() for p in late_phase_parameters(model)) // K
        kinds = "rank-1 factors, biases" + (", LayerNorm gains" if m.family == "transformer" and m.layernorm_factors else "")
        if lp.mode == "rank1":
            model_line += f", trained in rank-1 form ({own:,} parameters of {kinds})"
        else:
            T0 = resolve_step(lp.T0, t.max_steps, "late_phase.T0")
            model_line += (f"; from step {T0:,}, K={K} late-phase members of {own:,} parameters each ({kinds}; "
                           f"{lp.schedule} schedule), averaged at the end")
    train_bytes = (data_dir / "train.bin").stat().st_size
    tokens = (f"{train_bytes:,} training bytes" if cfg.data.tokenizer == "bytes"
              else f"{train_tokens:,} training tokens ({train_bytes:,} bytes)")
    epochs = t.max_steps * t.batch_size * t.seq_len / train_tokens
    processes = f"{accelerator.num_processes} process" + ("es" if accelerator.num_processes > 1 else "")
    data_line = (f"data: {tokens} in {data_dir}; {t.max_steps:,} steps of {t.batch_size} x {t.seq_len} tokens "
                 f"({epochs:.3g} epochs) on {processes} ({accelerator.device.type}), "
                 f"mixed precision {accelerator.mixed_precision}")
    return [model_line, data_line]


def lr_factor(step: int, cfg: Config) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then constant or cosine decay to zero."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return 1.0
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"valid_bpc": {"averaged": 1.6}} -> {"valid_bpc/averaged": 1.6}: the flat scalars and text
    that trackers accept (lists become text; None is dropped)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat[name] = str(list(value))
        elif value is not None:
            flat[name] = value
    return flat


# What a checkpoint's weights, optimiser state and data position mean: a resume must not change
# these (nor any model.* key but how the members are computed, _MODEL_HOW).
_FIXED_ON_RESUME = ("data.corpus", "data.synthetic_bytes", "data.tokenizer", "data.sp_vocab_size",
                    "late_phase.mode", "late_phase.K", "late_phase.schedule",
                    "train.batch_size", "train.seq_len", "train.optimizer")
_MODEL_HOW = {"vocab_size", "lstm_members", "lstm_cuda_graphs", "linear_members"}


class Trainer:
    """Trains `cfg` into cfg.run.out_dir. `resume=True` continues from the latest checkpoint there."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None, *, resume: bool = False):
        self.cfg = cfg
        self.accelerator = accelerator = accelerator or make_accelerator(
            cfg.train.mixed_precision, cfg.train.grad_accum, cfg.run.trackers, cfg.run.out_dir)
        if accelerator.gradient_accumulation_steps != cfg.train.grad_accum:
            raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} but the Accelerator accumulates "
                              f"{accelerator.gradient_accumulation_steps} steps; make them equal")
        cfg.train.mixed_precision = str(accelerator.mixed_precision)  # the launcher's choice, if it made one
        use_tf32(cfg.train.tf32)
        validate(cfg, accelerator.num_processes)  # before any work: no out_dir for a bad config
        self.out_dir = Path(cfg.run.out_dir).expanduser()
        # One process tries the directory: several making and removing it at once would race.
        problem = writable_directory_problem(self.out_dir) if accelerator.is_main_process else None
        raise_everywhere(None if problem is None else
                         TrainingError(f"cannot write run.out_dir={self.out_dir} ({problem}); give another run.out_dir"),
                         (TrainingError,))
        if resume:
            checkpoint = latest_checkpoint(self.out_dir)
            if checkpoint is None:
                raise CheckpointError(f"--resume: no checkpoint in {self.out_dir}/checkpoints; run without --resume to start")
            # Before the data is prepared: a resume with the wrong config must not download or write anything.
            self._check_resumable(checkpoint, read_checkpoint_state(checkpoint))
        else:
            check_new_run(cfg)
            checkpoint = None
            if latest_checkpoint(self.out_dir) is not None:
                raise CheckpointError(f"{self.out_dir} already holds checkpoints: pass --resume to continue that run, "
                                      f"or choose another run.out_dir")
        self.is_main = accelerator.is_main_process
        rank, world = accelerator.process_index, accelerator.num_processes
        t = cfg.train

        # Data: the main process prepares (downloads, splits, trains a tokenizer) while the others wait.
        def load_data():
            data_dir = prepare_data(cfg)
            tokenizer = load_tokenizer(data_dir, cfg.data.tokenizer, cfg.data.sp_vocab_size)
            return data_dir, tokenizer, {name: load_split(data_dir, name, tokenizer) for name in ("train", "valid", "test")}

        data_dir, tokenizer, self.splits = main_process_first(accelerator, load_data, (DataError, ConfigError))
        self.byte_lengths = np.asarray(tokenizer.byte_lengths)
        cfg.model.vocab_size = tokenizer.vocab_size
        if cfg.model.family == "lstm":  # stateful: contiguous streams, hidden state carried across windows
            self.batches = StreamBatches(self.splits["train"], t.batch_size, t.seq_len, rank, world)
        else:
            self.batches = WindowBatches(self.splits["train"], t.batch_size, t.seq_len, t.seed, rank, world)

        # Model and optimisers: the same seed everywhere gives every process the same initial weights.
        set_seed(t.seed)
        model = build_model(cfg.model, cfg.late_phase)
        T0 = resolve_step(cfg.late_phase.T0, t.max_steps, "late_phase.T0") if cfg.late_phase.mode == "late_phase" else None
        self.schedule = MemberSchedule.from_config(cfg.late_phase, T0)
        shared_opt, member_opt = build_optimizers(model, t, cfg.late_phase)
        optimizers = [opt for opt in (shared_opt, member_opt) if opt is not None]
        self.model, *self.optimizers = accelerator.prepare(model, *optimizers)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        clip = None if t.grad_clip == 0 else (lambda params: accelerator.clip_grad_norm_(params, t.grad_clip))
        self.stepper = LatePhaseStepper(
            self.unwrapped, self.schedule, self.optimizers[0], self.optimizers[1] if member_opt else None,
            clip, sigma0=cfg.late_phase.sigma0, seed=t.seed,
        )
        set_seed(t.seed, device_specific=True)  # dropout differs between processes (they see different rows)
        self.description = describe_run(cfg, model, data_dir, len(self.splits["train"]), accelerator)

        self.swa = WeightAverage() if cfg.swa.enabled else None
        self.swa_start = resolve_step(cfg.swa.start, t.max_steps, "swa.start") if cfg.swa.enabled else None
        self.step = 0  # optimisation steps done
        self.states: list[Any] = [None] * t.grad_accum  # LSTM state of each micro-batch's streams
        # The log window: train nats and bytes since the last log line, and the seconds spent
        # training in it (banked at each evaluation, SWA update or checkpoint, which do not count).
        self.window = {"nats": torch.zeros((), dtype=torch.float64, device=accelerator.device), "bytes": 0,
                       "start_step": 0, "seconds": 0.0, "since": time.perf_counter()}
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            self._truncate_metrics()
        if accelerator.log_with:  # Accelerate trackers (run.trackers), besides metrics.jsonl
            accelerator.init_trackers(self.out_dir.name, config=_flat_scalars(config_to_dict(cfg)))

    @property
    def unwrapped(self) -> nn.Module:
        """The bare model (no DDP). Its mixed-precision forward wrapper stays: removing it would
        remove it from the model being trained."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------
    # One optimisation step

    def train_step(self) -> int:
        """One global minibatch (all accumulation micro-batches) and its update; returns this process's bytes."""
        accelerator, step = self.accelerator, self.step
        member = self.schedule.member(step)
        batch = next(self.batches)
        if batch.reset:
            self.states = [None] * self.cfg.train.grad_accum
        micro = batch.inputs.shape[0] // self.cfg.train.grad_accum
        n_bytes = 0
        for i, state in enumerate(self.states):
            rows = slice(i * micro, (i + 1) * micro)
            inputs, targets = batch.inputs[rows], batch.targets[rows]
            n_bytes += int(self.byte_lengths[targets.numpy()].sum())
            inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
            with accelerator.accumulate(self.model):
                logits, state = self.model(inputs, state, member=member)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                accelerator.backward(loss)
            self.states[i] = detach_state(state)
            self.window["nats"] += loss.detach().double() * targets.numel()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, self.cfg)
        self.stepper.after_backward(step)
        self.step += 1
        self.window["bytes"] += n_bytes
        return n_bytes

    # ------------------------------------------------------------------------------------------
    # The whole run

    def fit(self) -> dict[str, Any]:
        """Train to train.max_steps with logging, validation, SWA and checkpoints; export and test at the end."""
        t, every = self.cfg.train, self.cfg.checkpoint.every
        if self.is_main:
            print("\n".join(self.description), flush=True)
        self.window["since"] = time.perf_counter()  # set-up and checkpoint loading are not training
        # The bar is closed on any exit, so an error message starts on a line of its own.
        with tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step",
                  disable=not self.is_main, dynamic_ncols=True) as bar:
            while self.step < t.max_steps:
                self.train_step()
                bar.update(1)
                record: dict[str, Any] = {}
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    record.update(self._train_stats())
                    bar.set_postfix(bpc=f"{record['train_bpc']:.3f}", chars_per_s=f"{record['chars_per_s']:,.0f}")
                if self._swa_due():
                    with self._not_training():
                        self.swa.update(self.averaged_model().state_dict())
                if self.step % t.eval_every == 0:
                    with self._not_training():
                        evals = self.evaluate("valid", t.eval_bytes)
                    record["valid_bpc"] = {kind: r.bpc for kind, r in evals.items()}
                    record["valid_bytes"] = evals["averaged"].n_bytes
                    if self.is_main:
                        bar.write(f"step {self.step}: valid bpc ({record['valid_bytes']:,} bytes) " +
                                  ", ".join(f"{kind} {bpc:.4f}" for kind, bpc in record["valid_bpc"].items()))
                if record:
                    self._log({"step": self.step, **record})
                if self.step % every == 0 or self.step == t.max_steps:
                    with self._not_training():
                        self.save()
        # A sequential late phase that stops mid-cycle still applies its pending shared gradients
        # (after the last checkpoint, so a run resumed from it ends the same way).
        self.stepper.flush()
        results = self.finish()
        self.accelerator.log({f"{split}_bpc/{kind}": bpc for split in ("valid", "test")
                              for kind, bpc in results[split].items()}, step=self.step)  # a no-op without trackers
        self.accelerator.end_training()  # Accelerate's end of a script: finishes trackers, closes the process group
        return results

    def _train_stats(self) -> dict[str, Any]:
        """Train bpc and throughput since the last log line, over all processes; stops on a non-finite loss."""
        totals = torch.stack([self.window["nats"],
                              torch.tensor(float(self.window["bytes"]), dtype=torch.float64, device=self.accelerator.device)])
        nats, n_bytes = self.accelerator.reduce(totals, reduction="sum").tolist()
        self._check_finite(nats)
        now = time.perf_counter()  # after the reduction, which waits for the device's queued work
        seconds = self.window["seconds"] + now - self.window["since"]
        stats = {"train_bpc": bits_per_byte(nats, int(n_bytes)), "lr": self.optimizers[0].param_groups[0]["lr"],
                 "chars_per_s": chars_per_second(n_bytes, seconds), "phase": self.schedule.phase(self.step - 1)}
        self.window.update(nats=torch.zeros_like(self.window["nats"]), bytes=0, start_step=self.step,
                           seconds=0.0, since=now)
        return stats

    @contextlib.contextmanager
    def _not_training(self) -> Iterator[None]:
        """Work inside is left out of chars/s: the training seconds so far are banked on entry
        (after the device has finished the queued steps) and the clock restarts on exit."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        self.window["seconds"] += time.perf_counter() - self.window["since"]
        try:
            yield
        finally:
            self.window["since"] = time.perf_counter()

    def _check_finite(self, nats: float) -> None:
        if not math.isfinite(nats):
            self._stop(f"the training loss became non-finite between steps {self.window['start_step'] + 1} and {self.step}")

    def _check_finite_weights(self) -> None:
        """A non-finite gradient leaves the loss finite until the next step: before a checkpoint
        is written, its weights and pending (shared-weight) gradients must be finite too."""
        for name, p in self.unwrapped.named_parameters():
            for what, t in (("weight", p), ("pending gradient", p.grad)):
                if t is not None and not torch.isfinite(t).all():
                    self._stop(f"a non-finite {what} appeared by step {self.step} (in {name})")

    def _stop(self, problem: str) -> NoReturn:
        last = latest_checkpoint(self.out_dir)
        raise TrainingError(
            f"{problem}; the last good checkpoint is {last or 'none (no checkpoint yet)'}: lower train.lr or set "
            f"train.grad_clip, then rerun{' with --resume' if last else ''}"
        )

    def _swa_due(self) -> bool:
        return self.swa is not None and self.step >= self.swa_start and (self.step - self.swa_start) % self.cfg.swa.every == 0

    # ------------------------------------------------------------------------------------------
    # Models to evaluate and export

    def averaged_model(self) -> nn.Module:
        """The weight-space member average as an ordinary model (the model itself when plain)."""
        model = self.unwrapped
        if is_plain(model):
            return model
        if self.schedule.phase(self.step) == "tied" and num_members(model) > 1:
            # Before T0 only row 0 is trained; the tied model is row 0 copied to every row.
            model = copy.deepcopy(model)
            spawn_members(model, 0.0, torch.Generator())
        return average_members(model)

    def swa_model(self) -> nn.Module | None:
        if self.swa is None or self.swa.count == 0:
            return None
        plain = plain_like(self.unwrapped)
        plain.load_state_dict(self.swa.average())
        return plain

    @contextlib.contextmanager
    def _full_precision(self) -> Iterator[None]:
        """Scores the trained model in float32, as the averaged and SWA copies (fresh models) and
        `lm.evaluate` score theirs: for the while, its forward is the one from before
        Accelerate's mixed-precision wrapper (`_original_forward`, which `prepare` keeps)."""
        model = self.unwrapped
        original = model.__dict__.get("_original_forward")
        if original is None:  # no wrapper: a float32 run
            yield
            return
        wrapped = model.forward
        model.forward = original
        try:
            yield
        finally:
            model.forward = wrapped

    def evaluate(self, split: str, max_bytes: int | None, members: bool = False,
                 progress: bool = False) -> dict[str, Any]:
        """EvalResult of every model kind on `split` (its first `max_bytes` bytes; None: all of
        it), all in float32 whatever the training precision; `progress`: a bar per model kind."""
        with self._full_precision():
            return self._evaluate(split, max_bytes, members, progress)

    def _evaluate(self, split: str, max_bytes: int | None, members: bool, progress: bool) -> dict[str, Any]:
        cfg, data = self.cfg, self.splits[split]
        geometry = dict(family=cfg.model.family, batch_size=cfg.eval.batch_size, seq_len=cfg.train.seq_len,
                        context=cfg.eval.context, stride=cfg.eval.stride, byte_lengths=self.byte_lengths,
                        accelerator=self.accelerator, max_tokens=token_limit(data, self.byte_lengths, max_bytes))
        models: dict[str, tuple[nn.Module, int | str]] = {"averaged": (self.averaged_model(), 0)}
        if self.schedule.phase(self.step) == "late":
            models["ensemble"] = (self.unwrapped, "ensemble")
            if members:
                models.update({f"member_{k}": (self.unwrapped, k) for k in range(self.schedule.K)})
        swa = self.swa_model()
        if swa is not None:
            models["swa"] = (swa, 0)
        return {kind: evaluate_bpc(model, data, member=member, progress=f"{split} {kind}" if progress else None,
                                   **geometry)
                for kind, (model, member) in models.items()}

    def finish(self) -> dict[str, Any]:
        """Export final/ and write results.json: valid and test bpc of every model kind on the whole splits."""
        final = self.out_dir / "final"
        tmp = self.out_dir / f"final.tmp-{os.getpid()}"
        if self.is_main:
            for stale in (*self.out_dir.glob("final.tmp-*"), *self.out_dir.glob("final.old-*")):
                shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while exporting
            tmp.mkdir(parents=True)
            for kind, model in {"averaged": self.averaged_model(), "swa": self.swa_model()}.items():
                if model is not None:
                    export(model, self.cfg, tmp / kind)
            if not is_plain(self.unwrapped):
                save_model(self.unwrapped, str(tmp / "members.safetensors"))
            replace_directory(tmp, final)
        results: dict[str, Any] = {"step": self.step, "n_bytes": {}}
        for split in ("valid", "test"):
            # The whole splits, every model kind: at the paper's size this takes minutes, so it shows bars.
            evals = self.evaluate(split, None, members=self.cfg.eval.members, progress=True)
            results[split] = {kind: r.bpc for kind, r in evals.items()}
            results["n_bytes"][split] = evals["averaged"].n_bytes
        if self.is_main:
            write_text_atomically(self.out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return results

    # ------------------------------------------------------------------------------------------
    # Checkpoints, metrics

    def save(self) -> Path:
        """Checkpoint the current step (after making sure the loss and the weights are still finite)."""
        nats = self.accelerator.reduce(self.window["nats"].clone(), reduction="sum").item()
        self._check_finite(nats)
        self._check_finite_weights()
        state = {"phase": self.schedule.phase(self.step), "window_start_step": self.window["start_step"],
                 "config": config_to_dict(self.cfg)}
        main_tensors = {"stepper": self.stepper.state_dict(),
                        "swa": None if self.swa is None else self.swa.state_dict()}
        process_state = {"data": self.batches.state_dict(), "lstm_states": self.states,
                         "window_nats": self.window["nats"].cpu(), "window_bytes": self.window["bytes"],
                         "window_seconds": self.window["seconds"]}
        return save_checkpoint(self.accelerator, self.out_dir, self.step, state, main_tensors, process_state,
                               self.cfg.checkpoint.keep)

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse (one line) a config that changes what the checkpoint's weights, optimiser state and
        data position mean, or moves T0 or swa.start across its step; note any other change."""
        check_process_count(path, state, self.accelerator.num_processes)
        saved, current = state["config"], config_to_dict(self.cfg)
        saved["model"]["vocab_size"] = current["model"]["vocab_size"]  # set by the tokenizer, which the data fixes
        fixed = [*_FIXED_ON_RESUME, *(f"model.{k}" for k in current["model"] if k not in _MODEL_HOW)]
        if self.cfg.model.family == "lstm":  # each accumulation micro-batch carries its own streams' state
            fixed.append("train.grad_accum")
        for key in fixed:
            section, name = key.split(".")
            was = saved.get(section, {}).get(name, current[section][name])  # absent: written before the key existed
            if was != current[section][name]:
                raise CheckpointError(f"{path} was written with {key}={was!r}, now {current[section][name]!r}; "
                                      f"resume with {key}={was!r} (or --config {self.out_dir / 'config.yaml'}, the "
                                      f"run's own), or start a new run.out_dir")
        step = int(state["step"])
        if step > self.cfg.train.max_steps:
            raise CheckpointError(f"{path} is at step {step}, past train.max_steps={self.cfg.train.max_steps}; "
                                  f"give train.max_steps >= {step} to resume it")
        if step == self.cfg.train.max_steps and self.accelerator.is_main_process:
            print(f"note: {path} is the run's last step; exporting final/ and scoring it again")
        for key, enabled in (("late_phase.T0", self.cfg.late_phase.mode == "late_phase"),
                             ("swa.start", self.cfg.swa.enabled)):
            section, name = key.split(".")
            was = resolve_step(saved[section][name], saved["train"]["max_steps"], key)
            now = resolve_step(current[section][name], current["train"]["max_steps"], key)
            if enabled and was != now and step >= min(was, now):
                raise CheckpointError(
                    f"{path} is at step {step}, and {key} was step {was} but is now step {now} (a fraction of "
                    f"train.max_steps); give {key}={was} (a step) to keep it where the run has it")
        changed = [f"{s}.{k}" for s in current for k in current[s]
                   if s != "run" and current[s][k] != saved.get(s, {}).get(k)]
        if changed and self.accelerator.is_main_process:
            print(f"note: resuming {path} with changed settings: {', '.join(changed)}")

    def _restore(self, path: Path) -> None:
        # Loading an optimiser's state replaces its param groups, hyperparameters included: keep
        # this config's (learning rate, betas, weight decay), which a resume may change.
        settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                    for opt in self.optimizers]
        state = main_tensors = process_state = error = None
        try:  # each process reads its own files, and only one of them may be damaged
            state, main_tensors, process_state = load_checkpoint(self.accelerator, path)
        except Exception as e:  # every kind: the other processes must not be left waiting
            error = e
        raise_everywhere(error, (CheckpointError,))
        for opt, groups in zip(self.optimizers, settings):
            for group, setting in zip(opt.param_groups, groups):
                group.update(setting)
        self.step = int(state["step"])
        self.stepper.load_state_dict(main_tensors["stepper"])
        if self.swa is not None and main_tensors["swa"] is not None:
            self.swa.load_state_dict(main_tensors["swa"], device=self.accelerator.device)  # trainer.pt loads on the CPU
        self.batches.load_state_dict(process_state["data"])
        device = self.accelerator.device
        self.states = [None if s is None else tuple(x.to(device) for x in s) for s in process_state["lstm_states"]]
        self.window.update(nats=process_state["window_nats"].to(device), bytes=int(process_state["window_bytes"]),
                           start_step=int(state["window_start_step"]),
                           seconds=float(process_state.get("window_seconds", 0.0)))  # older checkpoints lack it

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log(_flat_scalars(record), step=record["step"])  # a no-op without trackers

    def _truncate_metrics(self) -> None:
        """Drop metric lines past the current step (written after the checkpoint we resume from),
        and a line torn by a killed process."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        # Bytes that are not UTF-8 (a damaged file) are replaced, which makes their line unreadable JSON: dropped.
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_text_atomically(path, "".join(kept))
