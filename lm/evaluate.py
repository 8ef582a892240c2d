"""Bits per character of trained models over a whole split (`python -m lm.evaluate`).

This is the one place evaluation log-likelihoods are summed. Every target position of the
split is scored exactly once, as `data.batches` defines the pass (the first token has no
context and is never a target): the LSTM as stateful streams, none shorter than
MIN_STREAM_TOKENS (each starts without context), the Transformer by sliding windows. Totals
are float64 and assembled across processes through Accelerate, so any number of processes
gives the bpc of one, and bpc itself comes from `data.tokenizer.bits_per_byte` (total nats /
bytes / ln 2).
"""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm

from data.batches import EvalBatch, count_scored, count_windows, stream_eval_batches, window_eval_batches
from data.prepare import DataError
from data.tokenizer import bits_per_byte, load_split, load_tokenizer
from kernels.cli import positive_int
from lm.accelerator import main_process_first, make_accelerator, use_tf32
from lm.cli import ArgumentParser, exit_process, leave_silently, speaks
from lm.config import Config, ConfigError, config_from_dict, load_config
from lm.late_phase import ensemble_log_probs, num_members
from lm.models import ExportError, build_model, first_problem, load_exported


@dataclass(frozen=True)
class EvalResult:
    bpc: float
    nats: float  # total -log p(target) over every scored target, float64
    n_bytes: int  # original bytes the scored targets stand for
    n_targets: int  # scored target tokens (== n_bytes for the byte tokenizer)


class EvalError(Exception):
    """A problem with the evaluation request, reported as one line naming the fix."""


# The LSTM's shortest evaluation stream, in tokens. Every stream starts from a zero state, and
# that cold start cost a trained LSTM (gcide, 256 units, seq_len 128) about 50 bits whatever
# the stream's length: on the first 64,000 bytes of its valid split, 1.707 bpc as one stream,
# 1.720 with streams of 4,000 bytes, 1.756 at 1,000, 2.096 at 127 (one BPTT window) and 3.40 at
# 15. From 4,096 tokens on, the cold starts add about 0.01 bpc, so a figure does not depend on
# how many streams ran; more streams than the split has room for are not run.
MIN_STREAM_TOKENS = 4096


def eval_batch_size(family: str, n_tokens: int, batch_size: int, *, context: int | None = None,
                    stride: int | None = None, min_stream_tokens: int = MIN_STREAM_TOKENS) -> int:
    """The batch an evaluation pass over `n_tokens` tokens really runs for a requested `batch_size`.

    LSTM: at most one stream per `min_stream_tokens` targets (at least one stream), so that cold
    starts do not inflate the bpc. Transformer: at most as many rows as the pass has windows;
    more would only be masked padding (the figure is the same, the memory is not). The result
    depends only on the arguments, so every process of a distributed pass gets the same one.
    """
    n_targets = count_scored(n_tokens)
    if family == "lstm":
        return max(1, min(batch_size, n_targets // min_stream_tokens))
    if family == "transformer" and context is not None and stride is not None and stride >= 1:
        return max(1, min(batch_size, count_windows(n_targets, context, stride)))
    return batch_size  # _eval_batches reports what is missing


def evaluate_bpc(
    model: nn.Module,
    data: np.ndarray,
    *,
    family: str,
    member: int | str = 0,
    batch_size: int,
    seq_len: int | None = None,
    context: int | None = None,
    stride: int | None = None,
    byte_lengths: np.ndarray | None = None,
    accelerator: Accelerator | None = None,
    max_tokens: int | None = None,
    progress: str | None = None,
    min_stream_tokens: int = MIN_STREAM_TOKENS,
) -> EvalResult:
    """Score every target of `data` (token ids) once and return the bits per byte.

    `member`: an int evaluates that member (0 for plain models); "ensemble" averages the
    members' probabilities (not their logits). `family` "lstm" streams `batch_size` states
    through windows of `seq_len`, but no more streams than leave each `min_stream_tokens`
    targets (MIN_STREAM_TOKENS; 1 runs exactly `batch_size`); "transformer" scores sliding
    windows of `context` tokens that advance by `stride`, at most as many per batch as exist
    (`eval_batch_size`). `byte_lengths[token]` is the number of bytes a token stands for
    (None: one byte each). With an `accelerator`, this process scores its share of the split
    and the returned totals are those of the whole split, identical on every process.
    `progress`: the label of a tqdm bar on the main process (None: no bar).
    """
    rank, world_size = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    if accelerator is not None:
        # DDP's forward may broadcast buffers (a collective): processes score different numbers
        # of batches, so evaluate the bare module. The mixed-precision wrapper is kept.
        model = accelerator.unwrap_model(model)
    device = next(model.parameters()).device
    n_tokens = len(data) if max_tokens is None else min(len(data), max_tokens)
    batch_size = eval_batch_size(family, n_tokens, batch_size, context=context, stride=stride,
                                 min_stream_tokens=min_stream_tokens)
    batches = _eval_batches(data, family, batch_size, seq_len, context, stride, rank, world_size, max_tokens)

    show = progress is not None and rank == 0
    bar = tqdm(
        desc=progress,
        unit="B",  # bytes, not tokens: bpc is per byte and the CLI reports bytes scored
        unit_scale=True,
        # None: no bar when stderr is not a terminal, where its redraws and final erase would
        # leave lines of carriage returns and spaces in logs.
        disable=None if show else True,
        leave=False,
    )
    if not bar.disable:
        # This process's own share, which the others' need not equal: counted from its batches'
        # targets alone (no model), a small cost beside the pass it measures.
        own = _eval_batches(data, family, batch_size, seq_len, context, stride, rank, world_size, max_tokens)
        bar.total = sum(_scored_bytes(batch, byte_lengths) for batch in own)
        bar.refresh()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, targets
    was_training = model.training
    model.eval()
    state = None
    try:
        # no_grad rather than inference_mode: a model may cache tensors (e.g. rotary tables)
        # during evaluation that training later needs for autograd.
        with torch.no_grad():
            for batch in batches:
                if batch.reset:
                    state = None
                batch_bytes = _scored_bytes(batch, byte_lengths)  # on the CPU, before the copy: no device sync
                inputs, targets, mask = (t.to(device, non_blocking=True) for t in batch[:3])
                nll, state = _target_nats(model, inputs, targets, state, member)
                totals[0] += torch.where(mask, nll.double(), 0.0).sum()
                totals[1] += batch_bytes
                totals[2] += mask.sum()
                bar.update(batch_bytes)
    finally:
        model.train(was_training)
        bar.close()

    if accelerator is not None and world_size > 1:
        # Our eval iterators are not Accelerate dataloaders, so gather_for_metrics drops no
        # rows here: each process contributes exactly its own totals.
        totals = accelerator.gather_for_metrics(totals.unsqueeze(0)).sum(dim=0)
    nats, n_bytes, n_targets = totals.tolist()
    n_bytes, n_targets = int(n_bytes), int(n_targets)
    if n_targets == 0:
        raise EvalError("nothing to score: the split has fewer than 2 tokens; use a larger split or --max-bytes")
    return EvalResult(bpc=bits_per_byte(nats, n_bytes), nats=nats, n_bytes=n_bytes, n_targets=n_targets)


def _scored_bytes(batch: EvalBatch, byte_lengths: np.ndarray | None) -> int:
    """Bytes that the scored targets of one evaluation batch stand for."""
    targets = batch.targets[batch.mask].numpy()
    return len(targets) if byte_lengths is None else int(np.asarray(byte_lengths)[targets].sum())


def _eval_batches(data, family, batch_size, seq_len, context, stride, rank, world_size, max_tokens) -> Iterator[EvalBatch]:
    if family == "lstm":
        if seq_len is None:
            raise ValueError("evaluate_bpc: family 'lstm' needs seq_len")
        return stream_eval_batches(data, batch_size, seq_len, rank=rank, world_size=world_size, max_tokens=max_tokens)
    if family == "transformer":
        if context is None or stride is None:
            raise ValueError("evaluate_bpc: family 'transformer' needs context and stride")
        return window_eval_batches(
            data, batch_size, context, stride, rank=rank, world_size=world_size, max_tokens=max_tokens
        )
    raise ValueError(f"evaluate_bpc: unknown family {family!r}; use 'lstm' or 'transformer'")


def _target_nats(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state, member: int | str):
    """-log p(target) at every position (float32, (B, T)) and the model's next state."""
    if member == "ensemble":
        logits_all, state = model(inputs, state=state, member="all")
        log_probs = ensemble_log_probs(logits_all.float())
    elif isinstance(member, int):
        logits, state = model(inputs, state=state, member=member)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
    else:
        raise ValueError(f"evaluate_bpc: member must be an int or 'ensemble', got {member!r}")
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), state


# --------------------------------------------------------------------------- CLI

MODEL_KINDS = ("averaged", "ensemble", "members", "swa")
DEFAULT_KINDS = ("averaged", "ensemble", "swa")  # members: K more passes, on request


@dataclass
class ModelSource:
    """What a directory offers to evaluate: its config and where each model kind lives."""

    cfg: Config
    exported: dict[str, Path]  # kind -> exported plain-model directory (config.json + model.safetensors)
    members: Path | None  # the late-phase model with all members (final/members.safetensors)
    # The kinds it should have, so that only a missing one of these is worth a note: an exported
    # directory holds its one model, a run what its config trains (no ensemble for a plain run).
    expected: frozenset[str]


def find_models(path: Path) -> ModelSource:
    """Read a run directory (OUT/ with final/) or one exported model directory."""
    if not path.is_dir():
        raise EvalError(f"{path} is not a directory: pass --run OUT (a training run) or an exported model directory")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        kind = path.name if path.name in ("averaged", "swa") else "averaged"
        try:
            cfg = config_from_dict(json.loads((path / "config.json").read_text()))
        except (ValueError, ConfigError) as e:  # JSON errors are ValueErrors
            raise EvalError(f"{path / 'config.json'} is not a valid run config ({e}); restore it from the run's "
                            f"final/ or re-run training") from None
        return ModelSource(cfg, {kind: path}, None, frozenset({kind}))
    root = path.parent if path.name == "final" and not (path / "final").is_dir() else path
    final = root / "final"
    if not final.is_dir():
        if (root / "checkpoints").is_dir() and (root / "config.yaml").is_file():
            # The run's own config and directory, whatever the working directory and its saved run.out_dir.
            raise EvalError(
                f"{root} is an unfinished run (it has checkpoints/ but no final/): finish it with "
                f"python train_lm.py --config {shlex.quote(str(root / 'config.yaml'))} "
                f"run.out_dir={shlex.quote(str(root))} --resume"
            )
        raise EvalError(
            f"{path} has no final/ directory and no config.json + model.safetensors: "
            "pass a finished run's out_dir or an exported model directory"
        )
    if not (root / "config.yaml").is_file():
        raise EvalError(f"{root} has final/ but no config.yaml: pass the run's out_dir (the directory train_lm.py wrote)")
    exported = {
        kind: final / kind for kind in ("averaged", "swa") if (final / kind / "model.safetensors").is_file()
    }
    members = final / "members.safetensors"
    cfg = load_config(str(root / "config.yaml"), [])
    expected = {"averaged", *(["ensemble"] if cfg.late_phase.mode == "late_phase" else []),
                *(["swa"] if cfg.swa.enabled else [])}
    return ModelSource(cfg, exported, members if members.is_file() else None, frozenset(expected))


def _available_kinds(source: ModelSource) -> list[str]:
    kinds = list(source.exported)
    if source.members is not None:
        kinds += ["ensemble", "members"]
    return kinds


def _load_model(source: ModelSource, kind: str) -> nn.Module:
    """The plain exported model of `kind`, or (kind "ensemble"/"members") the model with all members."""
    if kind in source.exported:
        try:
            return load_exported(source.exported[kind])
        except ExportError as e:
            raise EvalError(str(e)) from None
    model = build_model(source.cfg.model, source.cfg.late_phase)
    try:
        load_model(model, str(source.members))
    except SafetensorError as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EvalError(f"cannot load the {kind} model from {source.members} ({reason}): the file is damaged; "
                        "restore it from a copy or re-run training") from None
    except RuntimeError as e:
        config = source.members.parent.parent / "config.yaml"  # RUN/final/members.safetensors -> RUN/config.yaml
        raise EvalError(f"cannot load the {kind} model from {source.members}: it does not match {config} "
                        f"({first_problem(e)}); restore the run's own final/ and config.yaml, or re-run "
                        f"training") from None
    return model


def token_limit(data: np.ndarray, byte_lengths: np.ndarray, max_bytes: int | None) -> int | None:
    """How many leading tokens of `data` fit in `max_bytes` bytes (every token is >= 1 byte)."""
    if max_bytes is None:
        return None
    spans = np.cumsum(np.asarray(byte_lengths)[np.asarray(data[:max_bytes])], dtype=np.int64)
    return int(np.searchsorted(spans, max_bytes, side="right"))


def evaluate_run(
    path: Path,
    *,
    split: str = "valid",
    kinds: list[str] | None = None,
    max_bytes: int | None = None,
    data_dir: str | None = None,
    batch_size: int | None = None,
    context: int | None = None,
    stride: int | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> tuple[dict[str, EvalResult], list[str], int]:
    """Evaluate the requested model kinds of `path` on `split`: (results by row name, notes, bytes of
    the split evaluated: all of them, or the first `max_bytes`).

    `kinds` None means every default kind the directory has (unavailable ones become notes);
    an explicitly requested kind that the directory lacks is an error.
    """
    source = find_models(path)
    available = _available_kinds(source)
    notes: list[str] = []
    if kinds is None:
        wanted = [k for k in DEFAULT_KINDS if k in available]
        notes += [f"no {k} model in {path}; skipped" for k in DEFAULT_KINDS
                  if k not in available and k in source.expected]
    else:
        if not kinds:
            raise EvalError(f"--models names no model kind; choose from {','.join(MODEL_KINDS)}")
        for kind in kinds:
            if kind not in MODEL_KINDS:
                raise EvalError(f"unknown model kind {kind!r} in --models; choose from {','.join(MODEL_KINDS)}")
            if kind not in available:
                raise EvalError(
                    f"--models {kind}: {path} has no {kind} model (it has: {','.join(available) or 'none'})"
                )
        wanted = list(kinds)
    if max_bytes is not None and max_bytes < 2:
        raise EvalError(f"--max-bytes {max_bytes}: need at least 2 bytes (the first byte is never scored)")

    cfg = source.cfg
    flags = [name for name, value in (("--context", context), ("--stride", stride)) if value is not None]
    if cfg.model.family == "lstm" and flags:
        raise EvalError(f"{'/'.join(flags)}: an LSTM is scored as stateful streams, not windows; "
                        f"drop {' and '.join(flags)} (they set Transformer windows)")
    # Errors name each window setting as the user gave it: a flag, or the run's config.
    context_name = "eval.context" if context is None else "--context"
    stride_name = "eval.stride" if stride is None else "--stride"
    context = cfg.eval.context if context is None else context
    stride = cfg.eval.stride if stride is None else stride
    if cfg.model.family == "transformer":
        if context > cfg.model.max_seq_len:
            raise EvalError(f"{context_name} {context} is longer than the model's max_seq_len "
                            f"{cfg.model.max_seq_len}; pass a shorter --context")
        if stride > context:
            raise EvalError(f"{stride_name} {stride} is longer than {context_name} {context}, so bytes between "
                            f"windows would go unscored; pass --stride {context} or less")
    use_tf32(cfg.train.tf32)  # the precision the run trained in
    data_path = Path(data_dir if data_dir is not None else cfg.data.dir).expanduser()
    split_file = data_path / f"{split}.bin"
    if not split_file.is_file():
        raise EvalError(
            f"no {split}.bin in data directory {data_path}: pass --data-dir DIR with the run's prepared splits"
        )
    def load_data():  # a SentencePiece model missing from the directory is trained once, by the main process
        tokenizer = load_tokenizer(data_path, cfg.data.tokenizer, cfg.data.sp_vocab_size)
        return tokenizer, load_split(data_path, split, tokenizer)

    tokenizer, data = (load_data() if accelerator is None else
                       main_process_first(accelerator, load_data, (DataError, ConfigError)))
    batch_name = "eval.batch_size" if batch_size is None else "--batch-size"
    batch_size = cfg.eval.batch_size if batch_size is None else batch_size
    max_tokens = token_limit(data, tokenizer.byte_lengths, max_bytes)
    if cfg.model.family == "lstm":
        # evaluate_bpc caps the streams itself; this only says so, once for all kinds.
        n_tokens = len(data) if max_tokens is None else min(len(data), max_tokens)
        streams = eval_batch_size("lstm", n_tokens, batch_size)
        if streams < batch_size:
            notes.append(f"{batch_name} {batch_size}: ran {streams} LSTM stream{'s' if streams > 1 else ''} instead, "
                         f"so that each has at least {MIN_STREAM_TOKENS:,} tokens (a stream starts without context, "
                         "and shorter ones inflate the bpc)")
    geometry = dict(
        family=cfg.model.family,
        batch_size=batch_size,
        seq_len=cfg.train.seq_len,
        context=context,
        stride=stride,
        byte_lengths=tokenizer.byte_lengths,
        max_tokens=max_tokens,
        accelerator=accelerator,
    )
    device = torch.device("cpu") if accelerator is None else accelerator.device

    results: dict[str, EvalResult] = {}
    for kind in wanted:
        model = _load_model(source, kind).to(device)
        if kind in source.exported:
            rows = {kind: 0}
        elif kind == "ensemble":
            rows = {kind: "ensemble"}
        else:
            rows = {f"member_{k}": k for k in range(num_members(model))}
        for name, member in rows.items():
            results[name] = evaluate_bpc(model, data, member=member, progress=name if progress else None, **geometry)
    split_bytes = split_file.stat().st_size
    return results, notes, split_bytes if max_bytes is None else min(split_bytes, max_bytes)


def format_table(results: dict[str, EvalResult]) -> str:
    width = max(len("model"), *(len(name) for name in results))
    lines = [f"{'model':<{width}}  {'bpc':>8}  {'bytes scored':>14}"]
    lines += [f"{name:<{width}}  {r.bpc:8.4f}  {r.n_bytes:>14,}" for name, r in results.items()]
    return "\n".join(lines)


def coverage_line(split: str, n_bytes: int, split_bytes: int, max_bytes_given: bool) -> str:
    """How many of the split's bytes were scored, and why the rest were not."""
    line = f"{split} split: {n_bytes:,} of {split_bytes:,} bytes scored"
    if split_bytes - n_bytes == 1:
        return f"{line} (every byte but the first, which has no context)"
    # A multi-byte first token (SentencePiece) leaves all of its bytes unscored, and --max-bytes
    # keeps whole tokens only.
    cut = ", nor a token cut by --max-bytes" if max_bytes_given else ""
    return f"{line} (not the first token, which has no context{cut})"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m lm.evaluate",
        description="Bits per character of a trained run's models over a whole split (every byte scored once, "
        "except the first, which has no context).",
        epilog="Several processes share the split and give the same totals as one: "
        "torchrun --nproc_per_node N -m lm.evaluate -- --run DIR (torchrun needs the -- before --run), "
        "or accelerate launch -m lm.evaluate --run DIR.",
    )
    parser.add_argument("--run", required=True, type=Path, help="run out_dir (with final/) or an exported model dir")
    parser.add_argument("--split", default="valid", choices=("valid", "test"), help="split to score (default valid)")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated kinds from {','.join(MODEL_KINDS)} (default: those of "
        f"{','.join(DEFAULT_KINDS)} that the run has; members = each member separately)",
    )
    parser.add_argument("--max-bytes", type=positive_int, default=None,
                        help="score only the first N bytes of the split")
    parser.add_argument("--data-dir", default=None, help="prepared data directory (default: the run's data.dir)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="streams/windows per batch, over all processes (default eval.batch_size); an LSTM "
                        f"runs at most one stream per {MIN_STREAM_TOKENS:,} tokens of the split (each stream "
                        "starts without context, so shorter ones would inflate the bpc), a Transformer at most "
                        "as many windows as the split has")
    parser.add_argument("--context", type=positive_int, default=None,
                        help="Transformer window length (default eval.context)")
    parser.add_argument("--stride", type=positive_int, default=None,
                        help="Transformer window stride, <= context (default eval.stride)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    try:
        accelerator = make_accelerator()
    except ConfigError as e:
        if speaks():
            print(f"error: {e}", file=sys.stderr)
        leave_silently()
        return 2
    except KeyboardInterrupt:  # e.g. while a multi-process launch waits for its other processes
        if speaks():
            print("error: interrupted", file=sys.stderr)
        return 130
    try:
        kinds = None if args.models is None else [k.strip() for k in args.models.split(",") if k.strip()]
        results, notes, split_bytes = evaluate_run(
            args.run,
            split=args.split,
            kinds=kinds,
            max_bytes=args.max_bytes,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            context=args.context,
            stride=args.stride,
            accelerator=accelerator,
            progress=True,
        )
    except (EvalError, ConfigError, DataError) as e:
        if speaks():
            print(f"error: {e}", file=sys.stderr)
        leave_silently()
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, as train_lm.py says it, and the shell's code for SIGINT
        if accelerator.is_main_process:
            print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        accelerator.end_training()  # Accelerate's end of a script: closes the process group
    if not accelerator.is_main_process:
        return 0
    if args.json:  # the notes go in the JSON only, so they are printed once
        print(json.dumps({"run": str(args.run), "split": args.split, "split_bytes": split_bytes, "notes": notes,
                          "results": {name: asdict(r) for name, r in results.items()}}, indent=2))
        return 0
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    n_bytes = next(iter(results.values())).n_bytes
    print(coverage_line(args.split, n_bytes, split_bytes, args.max_bytes is not None))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    exit_process(main())
