"""Training and evaluation batches over a token array (usually an np.memmap of a split).

Only the rows of a batch are read from the array, so a 90 MB split is never loaded per
step. All tensors are int64 on the CPU; the trainer moves them to its device.

Training
- `StreamBatches` (stateful LSTM): the split is cut into `batch_size` contiguous streams
  and each step takes the next window of every stream, so hidden state carries over.
- `WindowBatches` (Transformer): random windows; step t's global batch is a pure function
  of (seed, t), so any step is reproducible without replaying the earlier ones.
In both, `batch_size` is GLOBAL: rank i of world_size W takes rows [i*b, (i+1)*b), b =
batch_size // W, so the W shares together are exactly the batch one process would see.
`state_dict()` holds no rank or world size: the same state resumes every rank, and even a
different number of processes continues with the same global batches.

Evaluation
The first token of a split has no context and is never a target; every later position
1..N-1 is scored exactly once, across all ranks together (`count_scored(N)` = N - 1).
Every rank yields the same number of batches of the same shapes (rows with nothing to
score are fully masked), so collective calls in an eval loop stay in step.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from data.prepare import DataError


class Batch(NamedTuple):
    inputs: torch.Tensor  # (b, T) int64
    targets: torch.Tensor  # (b, T) int64, inputs shifted by one
    reset: bool  # True when the streams (re)start: a stateful model zeroes its state


class EvalBatch(NamedTuple):
    inputs: torch.Tensor  # (b, T) int64
    targets: torch.Tensor  # (b, T) int64
    mask: torch.Tensor  # (b, T) bool, True where the target is scored
    reset: bool  # True on a pass's first batch (stream eval) / every batch (window eval)


def count_scored(n_tokens: int) -> int:
    """Targets scored by a full evaluation pass over n_tokens tokens (the first has no context)."""
    return max(n_tokens - 1, 0)


def count_windows(n_targets: int, context: int, stride: int) -> int:
    """Sliding windows of `context` tokens, `stride` apart, that score n_targets targets."""
    return 1 + math.ceil(max(n_targets - context, 0) / stride) if n_targets else 0


def _rows_per_rank(batch_size: int, rank: int, world_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or batch_size % world_size:
        raise DataError(f"batch_size {batch_size} must be a positive multiple of the number of processes "
                        f"{world_size}; change train.batch_size")
    return batch_size // world_size


def _gather(data: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows data[s : s+length] for each start s, as an int64 tensor (reads only those bytes)."""
    rows = np.stack([np.asarray(data[s:s + length]) for s in starts.tolist()])
    return torch.from_numpy(rows.astype(np.int64))


def _check_geometry(name: str, state: dict, expected: dict) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise DataError(f"cannot resume {name}: the saved iterator has {key}={state.get(key)!r} but this "
                            f"run has {value!r}; resume with the same data and batch settings")


class StreamBatches:
    """Contiguous streams for stateful models: consecutive BPTT windows, forever.

    The split's first stream_len * batch_size tokens are cut into batch_size streams of
    stream_len = len(data) // batch_size tokens. An epoch is the floor((stream_len - 1) /
    seq_len) full windows of every stream; the few tokens left at each stream's end are
    skipped so every batch has the same shape. The next epoch starts again with reset=True.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        self.data, self.seq_len = data, seq_len
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch = _rows_per_rank(batch_size, rank, world_size)
        self.stream_len = len(data) // batch_size
        self.windows_per_epoch = (self.stream_len - 1) // seq_len if seq_len >= 1 else 0
        if self.windows_per_epoch < 1:
            raise DataError(f"a split of {len(data):,} tokens is too short for {batch_size} streams of "
                            f"{seq_len + 1} tokens; lower batch_size or seq_len, or use more data")
        streams = np.arange(rank * self.local_batch, (rank + 1) * self.local_batch)
        self.stream_starts = streams * self.stream_len
        self.epoch = 0
        self.window = 0

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> Batch:
        offset = self.window * self.seq_len
        rows = _gather(self.data, self.stream_starts + offset, self.seq_len + 1)
        batch = Batch(rows[:, :-1], rows[:, 1:], reset=self.window == 0)
        self.window += 1
        if self.window == self.windows_per_epoch:
            self.epoch, self.window = self.epoch + 1, 0
        return batch

    def _geometry(self) -> dict:
        return {"kind": "stream", "n_tokens": len(self.data), "batch_size": self.batch_size, "seq_len": self.seq_len}

    def state_dict(self) -> dict:
        return {**self._geometry(), "epoch": self.epoch, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        _check_geometry("StreamBatches", state, self._geometry())
        self.epoch, self.window = int(state["epoch"]), int(state["window"])


class WindowBatches:
    """Random windows of seq_len + 1 tokens; step t's global batch comes from a generator
    seeded by (seed, t), and rank i takes rows [i*b, (i+1)*b) of it."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch = _rows_per_rank(batch_size, rank, world_size)
        if len(data) < seq_len + 1 or seq_len < 1:
            raise DataError(f"a split of {len(data):,} tokens is too short for windows of {seq_len + 1} tokens; "
                            "lower seq_len or use more data")
        self.step = 0

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` (every rank draws the same ones)."""
        generator = np.random.default_rng([self.seed, step])
        return generator.integers(0, len(self.data) - self.seq_len, size=self.batch_size)

    def batch(self, step: int) -> Batch:
        mine = self.starts(step)[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
        rows = _gather(self.data, mine, self.seq_len + 1)
        # Every window is independent, so a stateful model must start each one from zero state.
        return Batch(rows[:, :-1], rows[:, 1:], reset=True)

    def __iter__(self) -> WindowBatches:
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def _geometry(self) -> dict:
        return {"kind": "window", "n_tokens": len(self.data), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "seed": self.seed}

    def state_dict(self) -> dict:
        return {**self._geometry(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        _check_geometry("WindowBatches", state, self._geometry())
        self.step = int(state["step"])


def _eval_rows(n_rows: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(first, end, padded_rows): rank's contiguous share [first, end) of n_rows rows, and
    the rows every rank's batches have (equal on all ranks; extra rows are masked)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    per_rank = math.ceil(n_rows / world_size)
    first = min(rank * per_rank, n_rows)
    return first, min(first + per_rank, n_rows), per_rank


def _masked_rows(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int,
                 n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs/targets (n_rows, width): row r holds data[starts[r] + j] -> data[starts[r] + j + 1]
    for j < lengths[r], zeros after; rows beyond len(starts) are all padding."""
    inputs = np.zeros((n_rows, width), dtype=np.int64)
    targets = np.zeros((n_rows, width), dtype=np.int64)
    valid = np.zeros((n_rows, width), dtype=bool)
    for r, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if length > 0:
            row = np.asarray(data[start:start + length + 1])
            inputs[r, :length], targets[r, :length] = row[:-1], row[1:]
            valid[r, :length] = True
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(valid)


def _truncate(data: np.ndarray, max_tokens: int | None) -> np.ndarray:
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
    return data if max_tokens is None else data[:max_tokens]


def stream_eval_batches(data: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                        max_tokens: int | None = None) -> Iterator[EvalBatch]:
    """A stateful evaluation pass for LSTMs: the N-1 targets are cut into batch_size
    contiguous streams (lengths differ by at most one), read window by window.

    Stream j predicts positions a_j+1 .. a_{j+1} from inputs a_j .. a_{j+1}-1; the model
    carries its state across windows and zeroes it only on the first batch (reset=True).
    Each stream starts cold at its first token, so one stream (batch_size=1) is the exact
    sequential pass; more streams trade a little context at batch_size-1 cut points for speed.
    Ranks take disjoint contiguous sets of streams; past each stream's end the mask is False.
    """
    # Arguments are checked here, at the call; the batches come from a generator.
    data = _truncate(data, max_tokens)
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n_targets = count_scored(len(data))
    bounds = np.array([j * n_targets // batch_size for j in range(batch_size + 1)])
    first, end, rows = _eval_rows(batch_size, rank, world_size)
    longest = int(np.diff(bounds).max())  # over ALL streams, so every rank yields the same batches
    return _stream_windows(data, bounds[first:end], np.diff(bounds)[first:end], longest, seq_len, rows)


def _stream_windows(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, longest: int, seq_len: int,
                    rows: int) -> Iterator[EvalBatch]:
    for offset in range(0, longest, seq_len):
        width = min(seq_len, longest - offset)
        window_lengths = np.clip(lengths - offset, 0, width)
        inputs, targets, mask = _masked_rows(data, starts + offset, window_lengths, width, rows)
        yield EvalBatch(inputs, targets, mask, reset=offset == 0)


def window_eval_batches(data: np.ndarray, batch_size: int, context: int, stride: int, rank: int = 0,
                        world_size: int = 1, max_tokens: int | None = None) -> Iterator[EvalBatch]:
    """A sliding-window evaluation pass for stateless models (Transformer).

    Window k reads inputs k*stride .. k*stride+context-1. The first window scores all its
    targets; every later window scores only its last `stride` targets, which get at least
    context-stride tokens of context; windows that run past the end are cut short (masked).
    Each global batch holds batch_size consecutive windows; rank i takes a contiguous share.
    """
    # Arguments are checked here, at the call; the batches come from a generator.
    if not 1 <= stride <= context:
        raise DataError(f"eval stride {stride} must be between 1 and the context {context}; change eval.stride")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = _truncate(data, max_tokens)
    n_targets = count_scored(len(data))
    n_windows = count_windows(n_targets, context, stride)
    return _sliding_windows(data, n_targets, n_windows, batch_size, context, stride,
                            *_eval_rows(batch_size, rank, world_size))


def _sliding_windows(data: np.ndarray, n_targets: int, n_windows: int, batch_size: int, context: int, stride: int,
                     first: int, end: int, rows: int) -> Iterator[EvalBatch]:
    for first_window in range(0, n_windows, batch_size):
        windows = np.arange(first_window, min(first_window + batch_size, n_windows))
        starts = windows * stride
        lengths = np.minimum(context, n_targets - starts)  # targets each window has
        width = int(lengths.max())
        inputs, targets, mask = _masked_rows(data, starts[first:end], lengths[first:end], width, rows)
        # Targets before context-stride were scored by the previous window (all of window 0's are new).
        already_scored = np.where(windows[first:end] == 0, 0, context - stride)
        mask[: len(already_scored)] &= torch.arange(width)[None, :] >= torch.from_numpy(already_scored)[:, None]
        yield EvalBatch(inputs, targets, mask, reset=True)
