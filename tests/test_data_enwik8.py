"""data.enwik8 against a real HTTP server on 127.0.0.1 serving a generated zip."""
import hashlib
import http.server
import io
import socket
import threading
import zipfile

import numpy as np
import pytest
from tqdm import tqdm

from data import enwik8
from data.enwik8 import prepare_enwik8
from data.prepare import DataError, run_cli, split_sizes


class _Server(http.server.ThreadingHTTPServer):
    routes: dict  # path -> (status, body, announced Content-Length)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status, body, announced = self.server.routes.get(self.path, (404, b"", 0))
        self.send_response(status)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def corpus() -> bytes:
    rng = np.random.default_rng()
    return rng.integers(0, 256, int(rng.integers(20_000, 60_000))).astype(np.uint8).tobytes()


def _zip(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", content)
    return buffer.getvalue()


def _serve(server, path, body, status=200, announced=None) -> str:
    server.routes[path] = (status, body, len(body) if announced is None else announced)
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_download_success_splits_exactly_and_second_run_does_nothing(server, corpus, tmp_path, capsys):
    archive = _zip(corpus)
    url = _serve(server, "/ok.zip", archive)
    out = tmp_path / "enwik8"
    prepare_enwik8(out, url=url, sha256=hashlib.sha256(archive).hexdigest())
    sizes = split_sizes(len(corpus))
    start = 0
    for name, size in zip(("train", "valid", "test"), sizes):
        assert (out / f"{name}.bin").read_bytes() == corpus[start:start + size]
        start += size
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.bin", "train.bin", "valid.bin"]
    capsys.readouterr()
    del server.routes["/ok.zip"]  # a second download would now fail with 404
    prepare_enwik8(out, url=url, sha256=hashlib.sha256(archive).hexdigest())
    assert "nothing to do" in capsys.readouterr().out
    # Prepared from another file on purpose (--sha256), the directory is not the real enwik8.
    with pytest.raises(DataError, match="different corpus"):
        prepare_enwik8(out, url=url)


def _unreachable_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/enwik8.zip"


@pytest.mark.parametrize("case", ["checksum", "truncated_zip", "short_body", "server_error", "wrong_length",
                                  "unreachable"])
def test_download_failures_leave_no_bin_and_say_what_to_do(server, corpus, tmp_path, monkeypatch, case):
    archive = _zip(corpus)
    sha256 = hashlib.sha256(archive).hexdigest()
    if case == "checksum":
        url, expect = _serve(server, "/c.zip", archive), "sha256 mismatch"
        sha256 = hashlib.sha256(b"something else").hexdigest()
    elif case == "truncated_zip":  # served as announced and checksummed, but the zip itself is cut
        cut = archive[:len(archive) // 2]
        url, expect = _serve(server, "/t.zip", cut), "corrupt or truncated zip"
        sha256 = hashlib.sha256(cut).hexdigest()
    elif case == "short_body":  # the connection closes before Content-Length bytes arrived
        url, expect = _serve(server, "/s.zip", archive[:1000], announced=len(archive)), "truncated"
    elif case == "server_error":
        url, expect = _serve(server, "/e.zip", b"oops", status=500), "HTTP 500"
    elif case == "unreachable":
        url, expect = _unreachable_url(), "cannot reach"
    else:  # pin this small zip's checksum as enwik8's: then exactly 100,000,000 bytes are required
        url, expect = _serve(server, "/w.zip", archive), "should be 100,000,000 bytes"
        monkeypatch.setattr(enwik8, "SHA256", sha256)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=expect) as raised:
        prepare_enwik8(out, url=url, sha256=sha256)
    message = str(raised.value)
    assert "\n" not in message and "--source" in message
    assert not out.exists()  # this run created it for the download: nothing, not even it, is left


def test_ctrl_c_during_download_leaves_nothing(server, corpus, tmp_path, monkeypatch):
    archive = _zip(corpus)
    url = _serve(server, "/slow.zip", archive)

    class InterruptedProgress(tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    monkeypatch.setattr(enwik8, "tqdm", InterruptedProgress)
    with pytest.raises(KeyboardInterrupt):
        prepare_enwik8(tmp_path / "out", url=url, sha256=hashlib.sha256(archive).hexdigest())
    assert list(tmp_path.iterdir()) == []


def test_failed_download_keeps_a_directory_that_existed(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    with pytest.raises(DataError, match="give an http"):
        prepare_enwik8(out, url="not a url", sha256="0" * 64)
    assert out.is_dir() and list(out.iterdir()) == []


def test_out_that_is_a_file_or_not_writable_is_named_as_such(server, corpus, tmp_path, monkeypatch, capsys):
    url = _serve(server, "/f.zip", _zip(corpus))
    (tmp_path / "a_file").write_bytes(b"keep me")
    assert run_cli(enwik8._main, ["--out", str(tmp_path / "a_file"), "--url", url]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'a_file'} is a file, not a directory; pick another "
                                       "directory (--out, or data.dir when training), then run again\n")
    assert (tmp_path / "a_file").read_bytes() == b"keep me"

    def no_permission(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(enwik8, "open", no_permission, raising=False)  # root ignores a chmod'ed directory
    assert run_cli(enwik8._main, ["--out", str(tmp_path / "ro"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no permission to write {tmp_path / 'ro'}; ") and err.count("\n") == 1
    assert "disk" not in err and "make room" not in err and not (tmp_path / "ro").exists()


def test_refuses_a_directory_holding_other_files_before_downloading(server, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    url = _serve(server, "/never.zip", b"", status=500)
    with pytest.raises(DataError, match="holds files that are not prepared data"):
        prepare_enwik8(tmp_path, url=url)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_refuses_an_empty_out(corpus, tmp_path, monkeypatch, capsys):
    (tmp_path / "enwik8").write_bytes(corpus)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where an empty --out used to write the splits
    argv = ["--out", "", "--source", str(tmp_path / "enwik8"), "--sha256", hashlib.sha256(corpus).hexdigest()]
    assert run_cli(enwik8._main, argv) == 2
    assert capsys.readouterr().err == ("error: --out is empty; name the directory to write the splits to, "
                                       "e.g. --out data/enwik8\n")
    assert list((tmp_path / "cwd").iterdir()) == []


def test_local_source_zip_and_extracted(tmp_path, corpus):
    archive = _zip(corpus)
    (tmp_path / "e.zip").write_bytes(archive)
    (tmp_path / "enwik8").write_bytes(corpus)
    prepare_enwik8(tmp_path / "a", source=tmp_path / "e.zip", sha256=hashlib.sha256(archive).hexdigest())
    prepare_enwik8(tmp_path / "b", source=tmp_path / "enwik8", sha256=hashlib.sha256(corpus).hexdigest())
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()
    # The extracted file with the default checksum is checked against enwik8's sha1.
    with pytest.raises(DataError, match="not the extracted enwik8"):
        prepare_enwik8(tmp_path / "c", source=tmp_path / "enwik8")
    assert not (tmp_path / "c").exists()
    # The copy may lie in the output directory itself (offline: data/enwik8/enwik8.zip), though
    # that directory refuses other files.
    inside = tmp_path / "d" / "enwik8.zip"
    inside.parent.mkdir()
    inside.write_bytes(archive)
    prepare_enwik8(inside.parent, source=inside, sha256=hashlib.sha256(archive).hexdigest())
    assert (inside.parent / "train.bin").read_bytes() == (tmp_path / "a" / "train.bin").read_bytes()


def test_cli_error_exit_code(server, tmp_path, capsys):
    url = _serve(server, "/gone.zip", b"", status=500)
    assert run_cli(enwik8._main, ["--out", str(tmp_path / "o"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "HTTP 500" in err
