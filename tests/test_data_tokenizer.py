"""data.tokenizer: bits per byte, byte and SentencePiece tokenizers, cached splits."""
import math

import numpy as np
import pytest

from data.prepare import DataError, write_splits
from data.synthetic import synthetic_corpus
from data.tokenizer import ByteTokenizer, bits_per_byte, load_split, load_tokenizer

UNSEEN_WORD = "Qxqzqj"  # appears only in valid/test, so a tokenizer trained on train alone lacks it


def test_bits_per_byte_hand_checked():
    # 6 bytes predicted with probability 1/2 each: 6 ln 2 nats -> 1 bit per byte.
    assert bits_per_byte(6 * math.log(2), 6) == pytest.approx(1.0, rel=1e-15)
    # 3 tokens covering 12 bytes, each predicted with probability 1/16: 3 * 4 bits / 12 bytes.
    assert bits_per_byte(3 * math.log(16), 12) == pytest.approx(1.0, rel=1e-15)
    # uniform over 256 byte values: 8 bits per byte
    assert bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0, rel=1e-15)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_byte_tokenizer_round_trip():
    raw = np.random.default_rng().integers(0, 256, 1000).astype(np.uint8).tobytes()
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(raw)
    assert ids.dtype == np.int64 and ids.tolist() == list(raw)
    assert tokenizer.decode(ids) == raw and tokenizer.byte_lengths.tolist() == [1] * 256


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    train = synthetic_corpus(300_000, seed=int(np.random.default_rng().integers(1 << 30)))
    held_out = (f"<text>{UNSEEN_WORD} ▁ {UNSEEN_WORD}{UNSEEN_WORD}\n".encode() * 800
                + b"\xff\xfe invalid \xc3 utf-8 \xe2\x96")
    corpus = train + held_out + held_out[::-1]
    write_splits(corpus, directory, (len(train), len(held_out), len(held_out)), {"corpus": "test"})
    return directory


@pytest.fixture(scope="module")
def sp(sp_dir):
    return load_tokenizer(sp_dir, "sentencepiece", vocab_size=400)


def test_sentencepiece_trained_on_train_split_only_and_cached(sp, sp_dir):
    assert sp.vocab_size == 400 and (sp_dir / "sp400.model").is_file()
    pieces = [sp._processor.id_to_piece(i) for i in range(sp.vocab_size)]
    assert any(len(p) > 3 for p in pieces)  # it learned multi-byte pieces from train.bin
    assert not any("Qx" in p or "qz" in p for p in pieces)
    stamp = (sp_dir / "sp400.model").stat().st_mtime_ns
    again = load_tokenizer(sp_dir, "sentencepiece", vocab_size=400)
    assert (sp_dir / "sp400.model").stat().st_mtime_ns == stamp
    assert np.array_equal(again.byte_lengths, sp.byte_lengths)


def test_sentencepiece_round_trips_any_bytes_and_counts_them(sp, sp_dir):
    rng = np.random.default_rng()
    start = int(rng.integers(0, 250_000))
    samples = [rng.integers(0, 256, int(rng.integers(0, 2000))).astype(np.uint8).tobytes(),
               "text ▁▁ with the meta space, tabs\t, CR\r\n and ünïcödé 中文\n\n".encode(),
               (sp_dir / "train.bin").read_bytes()[start:start + 5000]]
    for raw in samples:
        ids = sp.encode(raw)
        assert sp.decode(ids) == raw
        assert int(sp.byte_lengths[ids].sum()) == len(raw)
    common = sp.encode(samples[2])
    assert len(common) < 0.8 * len(samples[2])  # real merges, not byte by byte


def test_byte_lengths_of_pieces(sp):
    processor = sp._processor
    for i in range(sp.vocab_size):
        piece = processor.id_to_piece(i)
        if processor.is_byte(i):
            expected = 1
        elif processor.is_control(i) or processor.is_unknown(i):
            expected = 0
        else:
            expected = len(piece.replace("\u2581", " ").encode())
        assert sp.byte_lengths[i] == expected


def test_bits_per_byte_with_sentencepiece_counts_bytes_not_tokens(sp, sp_dir):
    valid = load_split(sp_dir, "valid", sp)
    raw = (sp_dir / "valid.bin").read_bytes()
    # A model giving every target token probability 1/2 spends 1 bit per token; scored
    # targets are all tokens but the first, so bpb = (tokens - 1) / bytes of those tokens.
    targets = np.asarray(valid[1:])
    n_bytes = int(sp.byte_lengths[targets].sum())
    assert n_bytes == len(raw) - int(sp.byte_lengths[valid[0]])
    bpb = bits_per_byte(len(targets) * math.log(2), n_bytes)
    assert bpb == pytest.approx(len(targets) / n_bytes, rel=1e-12)
    assert bpb < 1.0  # fewer tokens than bytes: per byte, not per token


def test_load_split_memmaps_bytes_and_caches_tokens(sp, sp_dir):
    raw = load_split(sp_dir, "test", ByteTokenizer())
    assert isinstance(raw, np.memmap) and raw.dtype == np.uint8
    assert bytes(raw) == (sp_dir / "test.bin").read_bytes()
    tokens = load_split(sp_dir, "test", sp)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert (sp_dir / f"test.{sp.name}.tok").is_file()
    assert sp.decode(tokens) == bytes(raw)
    with pytest.raises(DataError, match="unknown split"):
        load_split(sp_dir, "dev", sp)
    with pytest.raises(DataError, match="prepare the data first"):
        load_split(sp_dir / "missing", "train", ByteTokenizer())
    with pytest.raises(DataError, match="unknown tokenizer"):
        load_tokenizer(sp_dir, "bpe")
    with pytest.raises(DataError, match="sp_vocab_size"):
        load_tokenizer(sp_dir, "sentencepiece", vocab_size=200)
    assert not list(sp_dir.glob("sp200*"))

