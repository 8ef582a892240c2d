"""A deterministic, enwik8-shaped synthetic corpus, so that runs and tests work offline.

The text imitates a Wikipedia XML dump: <page>/<title>/<id>/<timestamp>/<text> markup,
"== headings ==", paragraphs of sentences, [[links]], &quot;quotes&quot;, numbers and
a few multi-byte UTF-8 letters. Words are random letter strings with English-like
letter frequencies, and sentences are drawn from a fixed table of multi-word phrases
with Zipf frequencies, so a small model learns spelling, common phrases and markup
quickly: its bits per byte drop well below 8 within a few hundred steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data.prepare import DEFAULT_FRACTIONS, prepared_as, split_sizes, write_splits

# Letter frequencies of English text (percent), plus rare accented letters for UTF-8.
_LETTERS = "etaoinshrdlcumwfgypbvkjxqzéü"
_LETTER_WEIGHTS = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2,
                            2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1, 0.08, 0.05])
_VOCABULARY_SIZE = 2000
_PHRASES = 3000
_ZIPF_EXPONENT = 1.1


class _Tables:
    """Vocabulary and phrase table drawn from the seed; shared by every page."""

    def __init__(self, rng: np.random.Generator):
        letter_cdf = np.cumsum(_LETTER_WEIGHTS) / _LETTER_WEIGHTS.sum()
        lengths = np.clip(1 + rng.geometric(0.25, _VOCABULARY_SIZE), 2, 14)
        letters = np.searchsorted(letter_cdf, rng.random(lengths.sum()))
        ends = np.cumsum(lengths)
        flat = "".join(_LETTERS[i] for i in letters)
        # Short words first, so the most frequent phrases are made of short words, as in English.
        # (dict.fromkeys drops repeats deterministically; a set's order would depend on PYTHONHASHSEED.)
        words = sorted(dict.fromkeys(flat[e - n:e] for n, e in zip(lengths, ends)), key=len)
        phrase_lengths = rng.integers(1, 4, _PHRASES)
        word_ids = self._zipf(rng, len(words), phrase_lengths.sum())
        ends = np.cumsum(phrase_lengths)
        phrases = [" ".join(words[i] for i in word_ids[e - n:e]) for n, e in zip(phrase_lengths, ends)]
        # Indexed [kind][phrase]: plain, [[link]], &quot;quoted&quot;; kind 3 (plain + a number) is built per use.
        self.decorated = (phrases, [f"[[{p}]]" for p in phrases], [f"&quot;{p}&quot;" for p in phrases])
        self.titles = [" ".join(w.capitalize() for w in words[i:i + 2]) for i in rng.integers(0, 400, 500)]

    @staticmethod
    def _zipf(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
        cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** _ZIPF_EXPONENT)
        return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(size)), n - 1)

    def sentence_phrases(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self._zipf(rng, _PHRASES, size)


def _paragraph(rng: np.random.Generator, tables: _Tables) -> str:
    n_sentences = int(rng.integers(2, 7))
    lengths = rng.integers(2, 9, n_sentences)
    ids = tables.sentence_phrases(rng, int(lengths.sum()))
    kinds = np.searchsorted([0.86, 0.93, 0.96], rng.random(ids.size))
    numbers = rng.integers(1, 2025, ids.size)
    decorated = tables.decorated
    parts = [decorated[k][i] if k < 3 else f"{decorated[0][i]} {n}"
             for i, k, n in zip(ids.tolist(), kinds.tolist(), numbers.tolist())]
    sentences = []
    start = 0
    for n in lengths.tolist():
        text = " ".join(parts[start:start + n])
        start += n
        sentences.append(text[0].upper() + text[1:] + ".")
    return " ".join(sentences)


def _page(rng: np.random.Generator, tables: _Tables, page_id: int) -> str:
    title = tables.titles[int(rng.integers(len(tables.titles)))]
    sections = []
    for s in range(int(rng.integers(1, 5))):
        heading = f"== {tables.titles[int(rng.integers(len(tables.titles)))]} ==\n" if s else ""
        body = "\n\n".join(_paragraph(rng, tables) for _ in range(int(rng.integers(1, 4))))
        sections.append(heading + body)
    day, hour, minute = rng.integers(1, 29), rng.integers(0, 24), rng.integers(0, 60)
    text = "\n\n".join(sections)
    return (f"  <page>\n    <title>{title}</title>\n    <id>{page_id}</id>\n    <revision>\n"
            f"      <timestamp>2006-03-{day:02d}T{hour:02d}:{minute:02d}:00Z</timestamp>\n"
            f"      <text xml:space=\"preserve\">{text}</text>\n    </revision>\n  </page>\n")


def synthetic_corpus(n_bytes: int, seed: int = 0) -> bytes:
    """Exactly n_bytes of synthetic enwik8-like UTF-8 text (may end mid-character, as enwik8
    does); the same (n_bytes, seed) always gives the same bytes."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must be >= 0, got {n_bytes}")
    rng = np.random.default_rng(seed)
    tables = _Tables(rng)
    pages = ["<mediawiki>\n"]
    total = len(pages[0])
    while total < n_bytes:
        page = _page(rng, tables, len(pages))
        pages.append(page)
        total += len(page.encode())
    return "".join(pages).encode()[:n_bytes]


def prepare_synthetic(out_dir: str | os.PathLike, n_bytes: int, seed: int = 0) -> Path:
    """Write the synthetic corpus to out_dir split 90/5/5 (through data.prepare.write_splits);
    does nothing if out_dir already holds the same (n_bytes, seed) corpus."""
    out_dir = Path(out_dir)
    expected = {"corpus": "synthetic", "n_bytes": n_bytes, "seed": seed}
    if prepared_as(out_dir, expected):
        return out_dir
    sizes = split_sizes(n_bytes, DEFAULT_FRACTIONS)
    write_splits(synthetic_corpus(n_bytes, seed), out_dir, sizes, expected)
    return out_dir
