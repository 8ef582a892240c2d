"""Data pipeline: prepare corpora into train/valid/test byte splits, tokenize, batch.

Modules (import from them directly, e.g. `from data.batches import StreamBatches`; this
package imports none of them, so `python -m data.enwik8` runs without warnings):
prepare (any corpus -> splits, atomically), enwik8 (download + verify), synthetic (offline
smoke corpus), tokenizer (bytes / SentencePiece, bits per byte, split loading), batches
(training iterators and exact evaluation passes).
"""
