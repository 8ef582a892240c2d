"""data.synthetic: a deterministic, enwik8-shaped, learnable smoke corpus."""
import hashlib
import json
import re

import numpy as np

from data.prepare import is_prepared, split_sizes
from data.synthetic import prepare_synthetic, synthetic_corpus


def _seed():
    return int(np.random.default_rng().integers(1 << 30))


def test_deterministic_exact_length_and_seed_dependent():
    seed = _seed()
    n = int(np.random.default_rng().integers(50_000, 200_000))
    corpus = synthetic_corpus(n, seed)
    assert len(corpus) == n and corpus == synthetic_corpus(n, seed)
    assert synthetic_corpus(n // 2, seed) == corpus[:n // 2]
    assert synthetic_corpus(n, seed + 1) != corpus


def test_enwik8_shaped_markup_words_numbers_links():
    text = synthetic_corpus(200_000, _seed()).decode("utf-8", errors="ignore")
    assert text.startswith("<mediawiki>\n  <page>\n    <title>")
    for marker in ("<title>", "</title>", "<text xml:space=\"preserve\">", "</text>", "</page>", "[[", "]]",
                   "&quot;", "\n\n", "== "):
        assert marker in text, marker
    assert re.search(r" \d{1,4}[ .]", text)
    assert any(ord(c) > 127 for c in text)  # some multi-byte UTF-8
    assert text.count("<page>") >= text.count("</page>") >= 10


def test_learnable_structure_far_below_8_bits():
    data = np.frombuffer(synthetic_corpus(500_000, _seed()), dtype=np.uint8).astype(np.int64)
    # Empirical conditional entropy H(next byte | previous 2 bytes): what a tiny model can reach.
    context = data[:-2] * 256 + data[1:-1]
    joint = np.unique(context * 256 + data[2:], return_counts=True)[1]
    marginal = np.unique(context, return_counts=True)[1]
    n = len(context)
    conditional_bits = (-(joint * np.log2(joint / n)).sum() + (marginal * np.log2(marginal / n)).sum()) / n
    unigram = np.bincount(data, minlength=256) / len(data)
    unigram_bits = -(unigram[unigram > 0] * np.log2(unigram[unigram > 0])).sum()
    assert unigram_bits < 5.5 and conditional_bits < 2.3


def test_prepare_synthetic_splits_through_write_splits_and_is_idempotent(tmp_path):
    seed = _seed()
    out = prepare_synthetic(tmp_path / "smoke", 100_000, seed)
    corpus = synthetic_corpus(100_000, seed)
    manifest = json.loads((out / "manifest.json").read_text())
    start = 0
    for name, size in zip(("train", "valid", "test"), split_sizes(100_000)):
        content = (out / f"{name}.bin").read_bytes()
        assert content == corpus[start:start + size]
        assert manifest["splits"][name]["sha256"] == hashlib.sha256(content).hexdigest()
        start += size
    stamp = (out / "train.bin").stat().st_mtime_ns
    prepare_synthetic(out, 100_000, seed)
    assert (out / "train.bin").stat().st_mtime_ns == stamp and is_prepared(out)
