"""data.tokenizer: bits per byte, byte and SentencePiece tokenizers, cached splits."""
import math

import numpy as np
import pytest

from data.prepare import DataError, write_splits
from data.synthetic import synthetic_corpus
from data import tokenizer as tokenizer_module
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


# Bytes of original text each piece stands for, written out by hand. "▁" is SentencePiece's
# space (3 bytes in UTF-8, one space byte in the text); a byte-fallback piece is one byte whatever
# its spelling; control pieces stand for no text. Every model trained on the synthetic corpus has
# these pieces (its markup and its frequent " [[", " </", " ==" fragments).
HAND_BYTE_LENGTHS = {"<unk>": 0, "<s>": 0, "</s>": 0, "<0x00>": 1, "<0x41>": 1, "<0xE2>": 1, "<0xFF>": 1,
                     "▁": 1, "▁[[": 3, "▁</": 3, "▁==": 3, "text": 4, "]].": 3, "t": 1}
# Rare letters of the synthetic corpus, pieces only when the sample had enough of them: 2 bytes each.
RARE_LETTER_BYTE_LENGTHS = {"é": 2, "ü": 2}


def test_byte_lengths_of_pieces(sp):
    processor = sp._processor
    for piece, expected in HAND_BYTE_LENGTHS.items():
        i = processor.piece_to_id(piece)
        assert processor.id_to_piece(i) == piece, f"{piece!r} is not in the model"
        assert sp.byte_lengths[i] == expected, piece
    for piece, expected in RARE_LETTER_BYTE_LENGTHS.items():
        i = processor.piece_to_id(piece)
        if processor.id_to_piece(i) == piece:
            assert sp.byte_lengths[i] == expected, piece
    # SentencePiece's layout: 3 control pieces, then the 256 byte pieces.
    assert sp.byte_lengths[:3].tolist() == [0, 0, 0]
    assert sp.byte_lengths[3:259].tolist() == [1] * 256


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



def _blocks_corpus(rng: np.random.Generator, block: int) -> bytes:
    """Lines with multi-byte characters (2, 3 and 4 bytes, the meta space, an invalid byte) next
    to every newline, around a newline-free stretch of 3-byte characters over 3 blocks long."""
    letters = ["a", "b", "e", "t", " ", "é", "ж", "中", "😀", "▁"]

    def line():
        body = "".join(rng.choice(letters, int(rng.integers(5, 60))).tolist())
        return (rng.choice(["é", "中", "😀"]) + body + rng.choice(["ж", "中", "😀"]) + "\n").encode()

    stretch = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, block + 100)).encode()
    assert len(stretch) > 3 * block and b"\n" not in stretch
    before = b"".join(line() for _ in range(60))
    after = b"".join(line() for _ in range(60)) + b"\xff\xfe tail \xe4\xb8"
    return before + stretch + after


def test_splits_larger_than_an_encoding_block_and_the_training_sample(tmp_path, monkeypatch):
    """Both limits (4 MiB blocks, a 5 MB sample) at 1000 bytes: the split is encoded in many
    blocks, some cut inside the newline-free stretch (between characters), and SentencePiece
    trains on evenly spaced chunks of train.bin that reach both of its ends."""
    block = 1000
    monkeypatch.setattr(tokenizer_module, "_ENCODE_BLOCK_BYTES", block)
    monkeypatch.setattr(tokenizer_module, "SP_TRAIN_SAMPLE_BYTES", block)
    # The constant is train_sentencepiece's default argument, bound when the module was loaded.
    monkeypatch.setattr(tokenizer_module.train_sentencepiece, "__defaults__", (block,))

    import sentencepiece as spm

    sentences = []
    train_spm = spm.SentencePieceTrainer.train

    def recording_train(**kwargs):
        sentences.extend(kwargs.pop("sentence_iterator"))
        return train_spm(sentence_iterator=iter(sentences), **kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", staticmethod(recording_train))

    rng = np.random.default_rng()
    # "ж" for every "e": a frequent 2-byte letter, so the sampled model has it as a piece.
    text = synthetic_corpus(30_000, seed=int(rng.integers(1 << 30))).replace(b"e", "ж".encode())
    train = b"<head>" + text + b"<tail>\n"
    held_out = _blocks_corpus(rng, block)
    write_splits(train + held_out + held_out[::-1], tmp_path, (len(train), len(held_out), len(held_out)),
                 {"corpus": "test"})
    sp = load_tokenizer(tmp_path, "sentencepiece", vocab_size=340)

    # The sample: at most 1000 bytes (newlines between chunks dropped), every line from train.bin,
    # the first chunk at its start and the last at its end.
    assert 0 < sum(len(line.encode()) for line in sentences) <= block
    train_text = train.decode("utf-8", errors="ignore")
    assert all(line in train_text for line in sentences)
    assert sentences[0].startswith("<head>") and sentences[-1].endswith("<tail>")
    zhe = sp._processor.piece_to_id("ж")
    assert sp._processor.id_to_piece(zhe) == "ж" and sp.byte_lengths[zhe] == 2

    blocks = []
    encode = sp.encode
    monkeypatch.setattr(sp, "encode", lambda data: blocks.append(data) or encode(data))
    for split, raw in (("valid", held_out), ("test", held_out[::-1])):
        blocks.clear()
        tokens = load_split(tmp_path, split, sp)
        assert sp.decode(tokens) == raw
        assert int(sp.byte_lengths[np.asarray(tokens)].sum()) == len(raw)
        assert b"".join(blocks) == raw and all(0 < len(b) <= block for b in blocks)
        assert len(blocks) > len(raw) // block
        assert any(b.endswith(b"\n") for b in blocks[:-1])
        # In reading order (valid UTF-8 up to the tail) the newline-free stretch is cut, but
        # between characters: a piece never has to straddle two blocks' halves of one character.
        if split == "valid":
            assert any(not b.endswith(b"\n") for b in blocks[:-1])
            assert not any(_ends_inside_a_character(b) for b in blocks[:-1])


def _ends_inside_a_character(data: bytes) -> bool:
    """Whether data ends with the lead byte of a UTF-8 character and fewer continuation bytes
    than that character needs."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return False
        if byte >= 0xC0:  # a lead byte: 110xxxxx, 1110xxxx or 11110xxx
            return (2 if byte < 0xE0 else 3 if byte < 0xF0 else 4) > back
    return False


def test_a_directory_prepared_again_from_another_corpus_does_not_reuse_old_tokens(sp, tmp_path):
    # Neither the old corpus's token caches nor a tokenizer trained on its train split may
    # stand in for the new corpus's.
    first, second = (synthetic_corpus(40_000, seed=seed) for seed in (3, 4))
    write_splits(first, tmp_path, (30_000, 5_000, 5_000), {"corpus": "first"})
    old = load_split(tmp_path, "valid", sp)
    old_model = load_tokenizer(tmp_path, "sentencepiece", vocab_size=400)
    (tmp_path / "manifest.json").unlink()  # prepared again, from another corpus
    write_splits(second, tmp_path, (30_000, 5_000, 5_000), {"corpus": "second"})
    assert not list(tmp_path.glob("*.tok")) and not list(tmp_path.glob("sp*.model"))
    new = load_split(tmp_path, "valid", sp)
    assert sp.decode(new) == second[30_000:35_000] != sp.decode(old)
    assert load_tokenizer(tmp_path, "sentencepiece", vocab_size=400).name != old_model.name  # trained again
