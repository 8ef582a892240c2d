"""enwik8: download (or take a local copy), verify, split 90M/5M/5M into DIR.

    python -m data.enwik8 --out DIR [--url URL] [--sha256 HEX] [--source PATH]

Checks, in order: the zip's sha256 (the pinned one unless --sha256 overrides it), that
the zip holds one readable file, and that it is exactly 100,000,000 bytes. With a
non-default --sha256 (another file on purpose, e.g. a test corpus) any length is
accepted and split by the fractions 0.9/0.05/0.05, which for 100,000,000 bytes is the
standard 90M/5M/5M. The splitting and atomic writing are data.prepare's.

--source may be the .zip (checked like a download) or the extracted file: with the
default checksum the extracted file is checked against enwik8's pinned sha1, with a
non-default --sha256 against that sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from data.prepare import (DEFAULT_FRACTIONS, ZIP_MAGICS, DataError, file_sha256, out_dir_arg, prepared_as,
                          read_source, removed_if_left_empty, run_cli, split_sizes, write_problem, write_splits)

URL = "http://mattmahoney.net/dc/enwik8.zip"
SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"  # of enwik8.zip
EXTRACTED_SHA1 = "57b8363b814821dc9d47aa4d41f58733519076b2"  # of the extracted 100,000,000-byte file
LENGTH = 100_000_000
DOWNLOAD_TIMEOUT_S = 60
_SOURCE_HINT = "download enwik8.zip elsewhere and pass it with --source PATH"


class SourceError(DataError):
    """The download or the local copy cannot be used (unlike the output directory): training
    words its fix with data.source instead of this command's flags."""


def prepare_enwik8(out_dir: str | os.PathLike, url: str = URL, sha256: str = SHA256,
                   source: str | os.PathLike | None = None) -> Path:
    """Prepare DIR/{train,valid,test}.bin + manifest.json from enwik8; no work if already done."""
    out_dir = Path(out_dir)
    sha256 = sha256.lower()
    # The checksum too: a directory prepared from another file on purpose (--sha256) is not enwik8.
    if prepared_as(out_dir, {"corpus": "enwik8", "zip_sha256": sha256}, source=source):
        print(f"{out_dir} already holds enwik8; nothing to do")
        return out_dir
    # The download creates out_dir before write_splits does: a failure anywhere removes it again.
    with removed_if_left_empty(out_dir):
        if source is not None:
            data = _read_local(Path(source), sha256)
            origin = str(source)
        else:
            data = _download_and_read(url, out_dir, sha256)
            origin = url
        if sha256 == SHA256 and len(data) != LENGTH:
            raise SourceError(f"enwik8 should be {LENGTH:,} bytes but the file holds {len(data):,}; "
                            f"the copy is damaged: {_SOURCE_HINT}")
        sizes = split_sizes(len(data), DEFAULT_FRACTIONS)
        write_splits(data, out_dir, sizes, {"corpus": "enwik8", "origin": origin, "zip_sha256": sha256})
    print(f"prepared {out_dir}: train {sizes[0]:,} / valid {sizes[1]:,} / test {sizes[2]:,} bytes")
    return out_dir


def _read_local(source: Path, sha256: str) -> bytes:
    if not source.is_file():
        raise SourceError(f"--source {source} does not exist or is not a file; check the path")
    with open(source, "rb") as f:
        is_zip = f.read(4) in ZIP_MAGICS
    if is_zip:
        _check_sha256(file_sha256(source), sha256, str(source))
        try:
            return read_source(source)
        except DataError as e:
            raise SourceError(str(e)) from None
    data = source.read_bytes()
    if sha256 == SHA256:
        actual = hashlib.sha1(data).hexdigest()
        if actual != EXTRACTED_SHA1:
            raise SourceError(f"{source} is not the extracted enwik8 (sha1 {actual}, expected {EXTRACTED_SHA1}); "
                            "pass the original enwik8.zip or an undamaged extracted copy")
    else:
        _check_sha256(hashlib.sha256(data).hexdigest(), sha256, str(source))
    return data


def _check_sha256(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise SourceError(f"sha256 mismatch for {what}: expected {expected}, got {actual}; the file is corrupt "
                        f"or not the expected one: retry, or {_SOURCE_HINT} (or give --sha256 if you meant "
                        "another file)")


def _download_and_read(url: str, out_dir: Path, sha256: str) -> bytes:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(write_problem(out_dir, e)) from None
    partial = out_dir / f"enwik8.zip.download-{os.getpid()}"
    try:
        actual = _download(url, partial)
        _check_sha256(actual, sha256, f"the download of {url}")
        try:
            return read_source(partial, what=f"the download of {url}")
        except DataError as e:
            raise SourceError(f"{e}, or {_SOURCE_HINT}") from None
    finally:
        partial.unlink(missing_ok=True)


def _download(url: str, dest: Path) -> str:
    """Stream url to dest with a progress bar; returns the sha256 of what arrived."""
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as f:
            announced = response.headers.get("Content-Length")
            expected_bytes = int(announced) if announced and announced.isdigit() else None
            with tqdm(total=expected_bytes, unit="B", unit_scale=True, desc=f"download {url}",
                      disable=None) as progress:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    digest.update(block)
                    received += len(block)
                    progress.update(len(block))
    except urllib.error.HTTPError as e:
        raise SourceError(f"download of {url} failed: HTTP {e.code} {e.reason}; retry later, check --url, "
                        f"or {_SOURCE_HINT}") from None
    except urllib.error.URLError as e:
        raise SourceError(f"cannot reach {url} ({e.reason}); check the network and --url, or {_SOURCE_HINT}") from None
    except (socket.timeout, ConnectionError, ssl.SSLError, http.client.HTTPException) as e:
        raise SourceError(f"download of {url} broke off ({e}); retry, or {_SOURCE_HINT}") from None
    except ValueError as e:  # malformed URL
        raise SourceError(f"bad --url {url!r} ({e}); give an http(s) URL") from None
    except OSError as e:  # writing dest: the network's errors are all caught above
        raise DataError(write_problem(dest.parent, e)) from None
    if expected_bytes is not None and received != expected_bytes:
        raise SourceError(f"download of {url} was truncated ({received:,} of {expected_bytes:,} bytes); "
                        f"retry, or {_SOURCE_HINT}")
    return digest.hexdigest()


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.enwik8",
        description="Download (or take a local copy of) enwik8, verify it and write DIR/train.bin (first 90M "
                    "bytes), valid.bin (next 5M), test.bin (last 5M) and manifest.json. Safe to rerun: a "
                    "complete DIR is left alone, and a failed run leaves no partial .bin behind.")
    parser.add_argument("--out", required=True, help="output directory DIR")
    parser.add_argument("--url", default=URL, help="where to download enwik8.zip (default: %(default)s)")
    parser.add_argument("--sha256", default=SHA256,
                        help="expected sha256 of the zip, or of an extracted --source file (default: the pinned "
                             "enwik8.zip checksum; an extracted enwik8 is then checked by its pinned sha1); another "
                             "value takes another file on purpose, of any length, split 0.9/0.05/0.05")
    parser.add_argument("--source", help="local enwik8.zip or extracted enwik8 file, instead of downloading")
    args = parser.parse_args(argv)
    prepare_enwik8(out_dir_arg(args.out, "data/enwik8"), url=args.url, sha256=args.sha256, source=args.source)


if __name__ == "__main__":
    sys.exit(run_cli(_main))
