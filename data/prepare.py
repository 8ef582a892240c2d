"""Any byte corpus -> DIR/{train,valid,test}.bin (raw uint8) + DIR/manifest.json.

This is the one code path that writes a prepared data directory; data.enwik8 and
data.synthetic only decide where the bytes come from and how they are split.

    python -m data.prepare --source FILE[.gz|.zip|.dz] --out DIR [--split 0.9,0.05,0.05]

Writes are atomic: every file is written under a temporary name and renamed into
place only once all of them are complete, and the manifest (which is what
`is_prepared` trusts) is renamed last. After any failure DIR holds no partial .bin, and
is removed again if this run created it.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
MIN_SPLIT_BYTES = 2  # a split needs one context byte and one target byte

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # a zip holding no files is only its end-of-directory record
ZIP_MAGICS = (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)
# Names a data tool writes into a prepared directory besides the splits and the manifest: leftovers
# of a killed run (*.tmp-PID, enwik8.zip.download-PID), data.tokenizer's caches, hidden files (.gitkeep).
_OUR_OTHER_FILES = re.compile(r"\.(tmp|download)-\d+|\.tok$|^sp\d+\.model$|^\.")


class DataError(Exception):
    """A data problem the user can fix; the message is one line naming problem and fix."""


def read_source(path: str | os.PathLike, what: str | None = None) -> bytes:
    """The bytes of a corpus file: gzip (.gz, dictzip .dz), a zip with one file, or raw.

    The format is recognised by the file's magic bytes, not its name. `what` names the
    file in error messages (default: its path).
    """
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise DataError(f"source {path} does not exist or is not a file; check the path")
    if path.stat().st_size == 0:  # else reported below as not being the format its name promises
        raise DataError(f"{what} is empty (0 bytes); download it again or check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    # A name that promises an archive the bytes are not (an HTML error page saved as .zip, a
    # truncated download) would otherwise be prepared, and trained on, as raw text.
    promised = {".zip": "zip", ".gz": "gzip", ".dz": "gzip"}.get(path.suffix.lower())
    actual = "gzip" if magic.startswith(_GZIP_MAGIC) else "zip" if magic in ZIP_MAGICS else None
    if promised and actual != promised:
        raise DataError(f"{what} is named {path.suffix} but is not a {promised} file; download it again, "
                        f"or rename it if it really is plain text")
    if magic.startswith(_GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{what} is a corrupt or truncated gzip file ({e}); get a fresh copy") from None
    if magic in ZIP_MAGICS:
        return _read_single_zip_member(path, what)
    return path.read_bytes()


def _read_single_zip_member(path: Path, what: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if not members:
                raise DataError(f"{what} is an empty zip archive (it holds no files); download it again")
            if len(members) != 1:
                names = ", ".join(m.filename for m in members) or "nothing"
                raise DataError(f"{what} must hold exactly one file but holds {names}; "
                                "extract the one you want and pass that file instead")
            return archive.read(members[0])
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{what} is a corrupt or truncated zip file ({e}); "
                        "download it again") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check the path") from None
    return digest.hexdigest()


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' -> (0.9, 0.05, 0.05), checked by `split_sizes`' rules."""
    try:
        fractions = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r} is not three comma-separated numbers, e.g. 0.9,0.05,0.05") from None
    _check_fractions(fractions)
    return fractions  # type: ignore[return-value]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {tuple(fractions)} must be three positive numbers "
                        "summing to 1 (train, valid, test), e.g. 0.9,0.05,0.05")


def split_sizes(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Byte counts (train, valid, test) of an n-byte corpus: valid and test are rounded,
    train takes the rest, so the three always add up to n (enwik8: 90M/5M/5M)."""
    _check_fractions(fractions)
    valid = round(n * fractions[1])
    test = round(n * fractions[2])
    sizes = (n - valid - test, valid, test)
    if min(sizes) < MIN_SPLIT_BYTES:
        raise DataError(f"a {n}-byte corpus split {tuple(fractions)} gives splits of {sizes} bytes; "
                        f"each needs at least {MIN_SPLIT_BYTES}: use a bigger corpus (or other fractions: "
                        f"python -m data.prepare --split)")
    return sizes


def write_splits(data: bytes | np.ndarray, out_dir: str | os.PathLike, sizes: tuple[int, int, int],
                 source_info: dict) -> dict:
    """Write train/valid/test.bin (consecutive slices of `data` of the given sizes) and
    manifest.json into out_dir, atomically; returns the manifest."""
    out_dir = Path(out_dir)
    view = memoryview(data).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
    if sum(sizes) != len(view) or min(sizes) < 0:
        raise ValueError(f"split sizes {sizes} do not add up to the data length {len(view)}")
    manifest = {"format": "raw uint8 bytes", "total_bytes": len(view), "source": source_info, "splits": {}}
    temporaries: list[tuple[Path, Path]] = []
    with removed_if_left_empty(out_dir):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            start = 0
            for name, size in zip(SPLITS, sizes):
                final = out_dir / f"{name}.bin"
                chunk = view[start:start + size]
                start += size
                temporaries.append((_write_temporary(final, chunk), final))
                manifest["splits"][name] = {"file": final.name, "bytes": size,
                                            "sha256": hashlib.sha256(chunk).hexdigest()}
            manifest_text = (json.dumps(manifest, indent=2) + "\n").encode()
            temporaries.append((_write_temporary(out_dir / MANIFEST, manifest_text), out_dir / MANIFEST))
            # An old manifest must not vouch for a half-swapped set of files.
            (out_dir / MANIFEST).unlink(missing_ok=True)
            # Nor may a tokenizer trained on the old splits, or their token caches, serve the new ones.
            for derived in (*out_dir.glob("sp*.model"), *out_dir.glob("*.tok")):
                derived.unlink()
            for temporary, final in temporaries:
                os.replace(temporary, final)
        except OSError as e:
            raise DataError(write_problem(out_dir, e)) from None
        finally:
            for temporary, _ in temporaries:
                temporary.unlink(missing_ok=True)
    return manifest


def write_problem(out_dir: Path, e: OSError) -> str:
    """'problem; fix' for a failed write into out_dir, worded from its cause: a full disk is
    only one of them. Reached from `--out` and from training's data.dir alike."""
    fix = "pick another directory (--out, or data.dir when training), then run again"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # out_dir, or one of its parents, is a file
        blocker = next((p for p in (out_dir, *out_dir.parents) if p.is_file()), out_dir)
        return f"{blocker} is a file, not a directory; {fix}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {out_dir}; change its permissions or {fix}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"could not write {out_dir}: {e.strerror or e}; make room there or {fix}"
    return f"could not write {out_dir}: {e.strerror or e}; {fix}"


@contextlib.contextmanager
def removed_if_left_empty(out_dir: Path) -> Iterator[None]:
    """If the block fails, remove out_dir and those of its parents that did not exist before it,
    as long as they are empty: a failed run leaves no empty directory behind, and never removes
    one that existed or holds anything."""
    created = list(itertools.takewhile(lambda p: not p.exists(), (out_dir, *out_dir.parents)))
    try:
        yield
    except BaseException:
        for directory in created:  # deepest first
            try:
                directory.rmdir()
            except OSError:  # not empty, or never created
                break
        raise


def _write_temporary(final: Path, content: memoryview | bytes) -> Path:
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a completely prepared out_dir, or None if it is not (fully) prepared.

    Complete means: the manifest parses and every split file exists with the byte count
    it records (sizes are checked, not hashes, so this is cheap enough to call often).
    """
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        for name in SPLITS:
            entry = manifest["splits"][name]
            if (out_dir / entry["file"]).stat().st_size != entry["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def is_prepared(out_dir: str | os.PathLike) -> bool:
    """True if out_dir holds a complete set of splits and its manifest."""
    return read_manifest(out_dir) is not None


def prepared_as(out_dir: str | os.PathLike, expected_source: dict,
                source: str | os.PathLike | None = None) -> bool:
    """True if out_dir is prepared from the corpus described by expected_source (every key
    given must match the manifest's source entry); False if it is not prepared at all.

    Raises DataError if out_dir holds a different corpus, so one is never silently used
    for, or overwritten by, another; or, not prepared, holds files no data tool wrote, so
    `--out configs` does not scatter splits among someone else's files. The `source` file
    being prepared may lie in out_dir (data/enwik8/enwik8.zip).
    """
    manifest = read_manifest(out_dir)
    if manifest is None:
        foreign = _foreign_files(Path(out_dir), None if source is None else Path(source))
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise DataError(f"{out_dir} holds files that are not prepared data ({listed}); pick a new or "
                            "empty directory (--out, or data.dir when training)")
        return False
    recorded = manifest.get("source", {})
    differences = [f"{k}={recorded.get(k)!r}, not {v!r}" for k, v in expected_source.items() if recorded.get(k) != v]
    if differences:
        raise DataError(f"{out_dir} already holds a different corpus ({'; '.join(differences)}); "
                        "choose another directory or delete this one")
    return True


def _foreign_files(out_dir: Path, source: Path | None) -> list[str]:
    """Names in out_dir that no data tool writes there, the source file aside."""
    try:
        paths = sorted(out_dir.iterdir())
    except OSError:  # missing, or not a directory: writing there says what is wrong
        return []
    ours = {f"{name}.bin" for name in SPLITS} | {MANIFEST}
    return [p.name for p in paths if p.name not in ours and not _OUR_OTHER_FILES.search(p.name)
            and not (source is not None and source.exists() and p.samefile(source))]


def prepare_corpus(source: str | os.PathLike, out_dir: str | os.PathLike,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Path:
    """Prepare out_dir from a corpus file; does nothing if out_dir is already prepared from it."""
    source, out_dir = Path(source), Path(out_dir)
    expected = {"corpus": "file", "sha256": file_sha256(source), "fractions": list(fractions)}
    if prepared_as(out_dir, expected, source=source):
        print(f"{out_dir} is already prepared from {source}; nothing to do")
        return out_dir
    data = read_source(source)
    sizes = split_sizes(len(data), fractions)
    write_splits(data, out_dir, sizes, {**expected, "path": str(source)})
    print(f"prepared {out_dir}: train {sizes[0]:,} / valid {sizes[1]:,} / test {sizes[2]:,} bytes")
    return out_dir


def out_dir_arg(text: str, example: str) -> Path:
    """A CLI's --out as a Path; an empty one (an unset shell variable) would mean the current
    directory."""
    if not text.strip():
        raise DataError(f"--out is empty; name the directory to write the splits to, e.g. --out {example}")
    return Path(text)


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a data CLI's main: user errors become one `error: ...` line on stderr, exit 2."""
    try:
        main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system problem no step above anticipated (permissions, ...)
        print(f"error: {e.filename or ''}: {e.strerror or e}; check the paths and permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no partial files were left behind, run the command again", file=sys.stderr)
        return 130
    return 0


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description="Split any byte corpus into DIR/train.bin, valid.bin, test.bin (raw uint8, consecutive "
                    "slices in that order) and DIR/manifest.json (byte counts and sha256 of each). "
                    "Does nothing if DIR is already prepared from the same file.")
    parser.add_argument("--source", required=True,
                        help="corpus file: gzip (.gz, dictzip .dz), a zip holding one file, or raw bytes")
    parser.add_argument("--out", required=True, help="output directory DIR")
    parser.add_argument("--split", default=",".join(str(f) for f in DEFAULT_FRACTIONS),
                        help="train,valid,test fractions summing to 1 (default: %(default)s)")
    args = parser.parse_args(argv)
    prepare_corpus(args.source, out_dir_arg(args.out, "data/mycorpus"), parse_fractions(args.split))


if __name__ == "__main__":
    sys.exit(run_cli(_main))
