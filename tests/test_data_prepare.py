"""data.prepare: reading corpora, split sizes, atomic writes, manifest, idempotence, CLI."""
import errno
import gzip
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from data import prepare
from data.prepare import (DataError, is_prepared, prepare_corpus, read_source, run_cli, split_sizes,
                          write_splits)


@pytest.fixture
def corpus() -> bytes:
    rng = np.random.default_rng()
    return rng.integers(0, 256, int(rng.integers(5_000, 20_000))).astype(np.uint8).tobytes()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def test_read_source_recognises_gzip_zip_and_raw_by_content(tmp_path, corpus):
    (tmp_path / "a.dz").write_bytes(gzip.compress(corpus))
    (tmp_path / "b.zip").write_bytes(_zip_bytes({"enwik8": corpus}))
    (tmp_path / "c.txt").write_bytes(corpus)
    for name in ("a.dz", "b.zip", "c.txt"):
        assert read_source(tmp_path / name) == corpus


@pytest.mark.parametrize("content, problem", [
    (lambda c: _zip_bytes({"x": c, "y": c}), "exactly one file"),
    (lambda c: _zip_bytes({"x": c})[:-200], "corrupt or truncated zip"),
    (lambda c: gzip.compress(c)[:-50], "corrupt or truncated gzip"),
])
def test_read_source_rejects_bad_archives_in_one_line(tmp_path, corpus, content, problem):
    path = tmp_path / "source"
    path.write_bytes(content(corpus))
    with pytest.raises(DataError, match=problem) as raised:
        read_source(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name, content, problem", [
    ("corpus.zip", _zip_bytes({}), "is an empty zip archive"),  # only an end record, no PK\x03\x04
    ("corpus", _zip_bytes({}), "is an empty zip archive"),  # recognised by content, not read as raw text
    ("corpus.gz", b"", "is empty"),
    ("corpus.txt", b"", "is empty"),
], ids=["empty.zip", "empty-zip-unnamed", "0-byte.gz", "0-byte.txt"])
def test_read_source_says_an_empty_archive_or_file_is_empty(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=problem) as raised:
        read_source(path)
    assert "\n" not in str(raised.value) and "not a" not in str(raised.value)


def test_read_source_says_a_zip_of_only_folders_is_empty(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("enwik8/", b"")
    (tmp_path / "folders.zip").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="is an empty zip archive"):
        read_source(tmp_path / "folders.zip")


@pytest.mark.parametrize("name, content, promised", [
    ("enwik8.zip", lambda c: b"<html>404 Not Found</html>" + c, "zip"),
    ("corpus.gz", lambda c: c, "gzip"),
    ("gcide.dict.dz", lambda c: _zip_bytes({"x": c}), "gzip"),
])
def test_read_source_refuses_a_name_that_promises_another_format(tmp_path, corpus, name, content, promised):
    path = tmp_path / name
    path.write_bytes(content(corpus))
    with pytest.raises(DataError, match=f"is named {path.suffix} but is not a {promised} file") as raised:
        read_source(path)
    assert "\n" not in str(raised.value)


def test_split_sizes_enwik8_and_ragged():
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    n = int(np.random.default_rng().integers(1_000, 10**7))
    sizes = split_sizes(n, (0.8, 0.15, 0.05))
    assert sum(sizes) == n and sizes[1] == round(0.15 * n) and sizes[2] == round(0.05 * n)
    with pytest.raises(DataError, match="at least"):
        split_sizes(20)
    with pytest.raises(DataError, match="summing to 1"):
        split_sizes(1000, (0.9, 0.2, 0.05))


def test_write_splits_exact_slices_and_manifest(tmp_path, corpus):
    sizes = split_sizes(len(corpus), (0.7, 0.2, 0.1))
    manifest = write_splits(corpus, tmp_path / "out", sizes, {"corpus": "test"})
    start = 0
    for name, size in zip(("train", "valid", "test"), sizes):
        content = (tmp_path / "out" / f"{name}.bin").read_bytes()
        assert content == corpus[start:start + size]
        assert manifest["splits"][name] == {"file": f"{name}.bin", "bytes": size,
                                            "sha256": hashlib.sha256(content).hexdigest()}
        start += size
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert is_prepared(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "test.bin", "train.bin",
                                                                    "valid.bin"]


@pytest.mark.parametrize("failure, raised", [(OSError(28, "No space left on device"), DataError),
                                              (KeyboardInterrupt(), KeyboardInterrupt)])
def test_write_failure_or_ctrl_c_leaves_no_bin(tmp_path, corpus, monkeypatch, failure, raised):
    calls = []

    def fail_on_third_file(final, content):
        calls.append(final.name)
        if len(calls) == 3:
            raise failure
        return real_write(final, content)

    real_write = prepare._write_temporary
    monkeypatch.setattr(prepare, "_write_temporary", fail_on_third_file)
    with pytest.raises(raised) as info:
        write_splits(corpus, tmp_path, split_sizes(len(corpus)), {"corpus": "test"})
    if raised is DataError:  # the fix for either way here: `data.prepare --out` or training's data.dir
        assert str(info.value) == (f"could not write {tmp_path}: No space left on device; make room there or pick "
                                   "another directory (--out, or data.dir when training), then run again")
    assert calls[:3] == ["train.bin", "valid.bin", "test.bin"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure, hint", [
    (OSError(errno.EACCES, "Permission denied"), "no permission to write {out}; change its permissions or pick "
                                                 "another directory (--out, or data.dir when training)"),
    (OSError(errno.EROFS, "Read-only file system"), "could not write {out}: Read-only file system; pick another "
                                                    "directory (--out, or data.dir when training)"),
])
def test_write_failure_hint_follows_the_cause(tmp_path, corpus, monkeypatch, failure, hint):
    def fail(final, content):
        raise failure

    monkeypatch.setattr(prepare, "_write_temporary", fail)
    with pytest.raises(DataError) as raised:
        write_splits(corpus, tmp_path, split_sizes(len(corpus)), {"corpus": "test"})
    assert str(raised.value).startswith(hint.format(out=tmp_path)) and "make room" not in str(raised.value)


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_out_that_is_a_file_is_named_as_such(tmp_path, corpus, out):
    (tmp_path / "a_file").write_bytes(b"keep me")
    with pytest.raises(DataError) as raised:
        write_splits(corpus, tmp_path / out, split_sizes(len(corpus)), {"corpus": "test"})
    assert str(raised.value) == (f"{tmp_path / 'a_file'} is a file, not a directory; pick another directory "
                                 "(--out, or data.dir when training), then run again")
    assert (tmp_path / "a_file").read_bytes() == b"keep me"


@pytest.mark.parametrize("failure, raised", [(OSError(errno.ENOSPC, "No space left on device"), DataError),
                                              (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failed_write_removes_only_the_empty_directories_it_created(tmp_path, corpus, monkeypatch, failure,
                                                                     raised):
    def fail(final, content):
        raise failure

    monkeypatch.setattr(prepare, "_write_temporary", fail)
    (tmp_path / "existing").mkdir()
    with pytest.raises(raised):
        write_splits(corpus, tmp_path / "existing" / "new" / "out", split_sizes(len(corpus)), {"corpus": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and not list((tmp_path / "existing").iterdir())


def test_ctrl_c_in_the_cli_leaves_no_out_directory(tmp_path, corpus, monkeypatch, capsys):
    def interrupt(final, content):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_write_temporary", interrupt)
    (tmp_path / "corpus.bin").write_bytes(corpus)
    assert run_cli(prepare._main, ["--source", str(tmp_path / "corpus.bin"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.startswith("error: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin"]


def test_refuses_a_directory_holding_other_files_and_accepts_its_own(tmp_path, corpus):
    source = tmp_path / "corpus.txt"
    source.write_bytes(corpus)
    foreign = tmp_path / "configs"
    foreign.mkdir()
    (foreign / "smoke.yaml").write_text("model: {}\n")
    with pytest.raises(DataError) as raised:
        prepare_corpus(source, foreign)
    assert str(raised.value) == (f"{foreign} holds files that are not prepared data (smoke.yaml); pick a new or "
                                 "empty directory (--out, or data.dir when training)")
    assert [p.name for p in foreign.iterdir()] == ["smoke.yaml"]
    # What a data tool leaves in its directory (splits, leftovers of a killed run, tokenizer caches, a
    # .gitkeep) does not count: a half-prepared directory can be prepared again.
    ours = tmp_path / "ours"
    ours.mkdir()
    for name in ("train.bin", "valid.bin.tmp-123", "enwik8.zip.download-9", "sp400.model", "sp400.tmp-7.vocab",
                 "train.sp400-0123456789ab.tok", ".gitkeep"):
        (ours / name).write_bytes(b"x")
    prepare_corpus(source, ours)
    assert is_prepared(ours)


def test_is_prepared_detects_missing_or_truncated_split(tmp_path, corpus):
    write_splits(corpus, tmp_path, split_sizes(len(corpus)), {"corpus": "test"})
    with open(tmp_path / "valid.bin", "r+b") as f:
        f.truncate(10)
    assert not is_prepared(tmp_path)
    (tmp_path / "valid.bin").unlink()
    assert not is_prepared(tmp_path)


def test_prepare_corpus_is_idempotent_and_refuses_another_corpus(tmp_path, corpus, capsys):
    source = tmp_path / "corpus.gz"
    source.write_bytes(gzip.compress(corpus))
    out = tmp_path / "out"
    prepare_corpus(source, out)
    assert b"".join((out / f"{s}.bin").read_bytes() for s in ("train", "valid", "test")) == corpus
    stamp = (out / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    prepare_corpus(source, out)
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    other = tmp_path / "other.txt"
    other.write_bytes(corpus[::-1])
    with pytest.raises(DataError, match="different corpus"):
        prepare_corpus(other, out)


def test_cli_help_success_and_one_line_error(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit) as raised:
        prepare._main(["--help"])
    assert raised.value.code == 0 and "--split" in capsys.readouterr().out
    source = tmp_path / "corpus.bin"
    source.write_bytes(corpus)
    assert run_cli(prepare._main, ["--source", str(source), "--out", str(tmp_path / "out"),
                                   "--split", "0.5,0.25,0.25"]) == 0
    assert len((tmp_path / "out" / "valid.bin").read_bytes()) == round(len(corpus) / 4)
    capsys.readouterr()
    assert run_cli(prepare._main, ["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err


@pytest.mark.parametrize("out", ["", "  "])
def test_cli_refuses_an_empty_out(tmp_path, corpus, monkeypatch, capsys, out):
    (tmp_path / "corpus.bin").write_bytes(corpus)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where an empty --out used to write the splits
    assert run_cli(prepare._main, ["--source", str(tmp_path / "corpus.bin"), "--out", out]) == 2
    assert capsys.readouterr().err == ("error: --out is empty; name the directory to write the splits to, "
                                       "e.g. --out data/mycorpus\n")
    assert list((tmp_path / "cwd").iterdir()) == []


def test_cli_turns_unexpected_file_system_errors_into_one_line(capsys):
    def main(argv):
        raise PermissionError(13, "Permission denied", "/data/enwik8/train.bin")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err
    assert err == "error: /data/enwik8/train.bin: Permission denied; check the paths and permissions\n"
