"""Tokenizers (bytes by default, optional SentencePiece), split loading, and bits per byte.

Whatever the tokenizer, results are reported in bits per BYTE of the original text:
`bits_per_byte` is the one place that number is computed, and `byte_lengths[id]` says
how many original bytes each token id stands for, so an evaluator sums the bytes of the
targets it scored.
"""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.prepare import SPLITS, DataError, file_sha256

# SentencePiece trains on a sample of train.bin: at most this many bytes, taken as evenly
# spaced chunks so the whole split is represented. Enough text for a few thousand pieces,
# and training stays under a minute on 2 cores whatever the corpus size.
SP_TRAIN_SAMPLE_BYTES = 5_000_000
_SP_SAMPLE_CHUNKS = 100
_ENCODE_BLOCK_BYTES = 1 << 22
_META_SPACE = "\u2581"  # SentencePiece's visible space "▁"
# Stretches SentencePiece cannot round-trip: bytes that are not valid UTF-8 (decoded to
# surrogate escapes) and a literal "▁" (it would come back as a space). Both are spelled
# with byte-fallback pieces instead.
_NOT_SP_TEXT = re.compile(f"[\udc80-\udcff{_META_SPACE}]+")


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Bits per byte (= bits per character on enwik8) from a summed negative log-likelihood in nats."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return total_nats / n_bytes / math.log(2)


class ByteTokenizer:
    """Identity over bytes: 256 ids, each standing for one byte."""

    name = "bytes"
    vocab_size = 256

    def __init__(self) -> None:
        self.byte_lengths = np.ones(self.vocab_size, dtype=np.int64)

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> bytes:
        return np.asarray(ids, dtype=np.uint8).tobytes()


class SentencePieceTokenizer:
    """A SentencePiece model with byte fallback and no normalisation: decode(encode(b)) == b
    for ANY bytes, including invalid UTF-8 (spelled byte by byte)."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        self._processor = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = self._processor.get_piece_size()
        # The model's hash in the name keeps token caches of a replaced model from being reused.
        self.name = f"sp{self.vocab_size}-{file_sha256(self.model_path)[:12]}"
        self._byte_ids = np.array([self._processor.piece_to_id(f"<0x{b:02X}>") for b in range(256)])
        spelled = []
        for i in range(self.vocab_size):
            if self._processor.is_byte(i):
                spelled.append(bytes([int(self._processor.id_to_piece(i)[3:5], 16)]))
            elif self._processor.is_control(i) or self._processor.is_unknown(i):
                spelled.append(b"")
            else:
                spelled.append(self._processor.id_to_piece(i).replace(_META_SPACE, " ").encode())
        self._spelled = spelled
        self.byte_lengths = np.array([len(s) for s in spelled], dtype=np.int64)

    def encode(self, data: bytes) -> np.ndarray:
        text = data.decode("utf-8", errors="surrogateescape")
        segments, position = [], 0
        for match in _NOT_SP_TEXT.finditer(text):
            segments.append((text[position:match.start()], match.group()))
            position = match.end()
        segments.append((text[position:], ""))
        encoded = self._processor.encode([plain for plain, _ in segments])
        pieces = []
        for ids, (_, raw) in zip(encoded, segments):
            pieces.append(np.array(ids, dtype=np.int64))
            raw_bytes = np.frombuffer(raw.encode("utf-8", errors="surrogateescape"), dtype=np.uint8)
            pieces.append(self._byte_ids[raw_bytes])
        return np.concatenate(pieces)

    def decode(self, ids) -> bytes:
        return b"".join(self._spelled[i] for i in np.asarray(ids).tolist())


def train_sentencepiece(data_dir: str | os.PathLike, vocab_size: int,
                        sample_bytes: int = SP_TRAIN_SAMPLE_BYTES) -> Path:
    """Train a SentencePiece model on data_dir/train.bin only (a sample of sample_bytes in
    evenly spaced chunks when the split is bigger), save it as data_dir/sp<vocab_size>.model,
    and return that path."""
    import sentencepiece as spm

    data_dir = Path(data_dir)
    train = load_split(data_dir, "train", ByteTokenizer())
    n_chunks = _SP_SAMPLE_CHUNKS if len(train) > sample_bytes else 1
    chunk = min(len(train), sample_bytes) // n_chunks
    starts = np.linspace(0, len(train) - chunk, n_chunks, dtype=np.int64)
    text = "\n".join(bytes(train[s:s + chunk]).decode("utf-8", errors="ignore") for s in starts.tolist())
    lines = [line for line in text.split("\n") if line]
    # No progress callback exists in SentencePiece's trainer; say what is happening instead.
    # On stderr: stdout may be a report (lm.evaluate --json).
    print(f"training SentencePiece ({vocab_size} pieces) on {n_chunks * chunk:,} bytes of {data_dir}/train.bin",
          file=sys.stderr)
    final = data_dir / f"sp{vocab_size}.model"
    prefix = data_dir / f"sp{vocab_size}.tmp-{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, character_coverage=0.9995,
            max_sentence_length=1 << 16, minloglevel=2)
        os.replace(f"{prefix}.model", final)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training on {data_dir}/train.bin failed ({e}); choose another "
                        "data.sp_vocab_size: above 259 (256 byte pieces + 3 control) and small enough for the text") from None
    finally:
        for leftover in (f"{prefix}.model", f"{prefix}.vocab"):
            Path(leftover).unlink(missing_ok=True)
    return final


def load_tokenizer(data_dir: str | os.PathLike, kind: str = "bytes",
                   vocab_size: int = 4096) -> ByteTokenizer | SentencePieceTokenizer:
    """The byte tokenizer, or the SentencePiece model cached in data_dir (trained on
    train.bin the first time; in a multi-process run call it on the main process first)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "sentencepiece":
        raise DataError(f"unknown tokenizer {kind!r}; use 'bytes' or 'sentencepiece'")
    model = Path(data_dir) / f"sp{vocab_size}.model"
    if not model.is_file():
        model = train_sentencepiece(data_dir, vocab_size)
    return SentencePieceTokenizer(model)


def load_split(data_dir: str | os.PathLike, split: str,
               tokenizer: ByteTokenizer | SentencePieceTokenizer) -> np.ndarray:
    """A split as a read-only np.memmap of token ids: the raw bytes for the byte tokenizer,
    else `<split>.<tokenizer.name>.tok` in data_dir (encoded once, then cached)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    raw = data_dir / f"{split}.bin"
    if not raw.is_file():
        raise DataError(f"{raw} not found; prepare the data first (python -m data.enwik8 --out {data_dir}, "
                        f"or python -m data.prepare --source FILE --out {data_dir})")
    if isinstance(tokenizer, ByteTokenizer):
        return _memmap(raw, np.uint8)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    # data.prepare.write_splits removes the caches of the splits it replaces.
    cached = data_dir / f"{split}.{tokenizer.name}.tok"
    if not cached.is_file():
        _encode_to_file(tokenizer, _memmap(raw, np.uint8), cached, dtype)
    return _memmap(cached, dtype)


def _encode_to_file(tokenizer: SentencePieceTokenizer, data: np.ndarray, path: Path, dtype: type) -> None:
    """Encode data into path (atomically), in blocks cut after a newline (or, in a longer line,
    between UTF-8 characters), with a progress bar."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f, tqdm(total=len(data), unit="B", unit_scale=True,
                                               desc=f"encode {path.name}", disable=None) as progress:
            start = 0
            while start < len(data):
                end = min(start + _ENCODE_BLOCK_BYTES, len(data))
                newlines = np.flatnonzero(np.asarray(data[start:end]) == ord("\n"))
                if end < len(data) and len(newlines):
                    end = start + int(newlines[-1]) + 1
                elif end < len(data):  # no newline: at least never cut inside a UTF-8 character
                    while end > start + 1 and data[end] & 0xC0 == 0x80:  # a continuation byte
                        end -= 1
                tokenizer.encode(bytes(data[start:end])).astype(dtype).tofile(f)
                progress.update(end - start)
                start = end
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _memmap(path: Path, dtype: type) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")
